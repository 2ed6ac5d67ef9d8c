"""The catalog of definitions: daemons publish what they serve; starts by name (Python
without the code, the CLI, SQL durable.start) take kind, queue, defaults and version from
it; names nobody published are refused; versioned tasks go only to daemons with their
version; `durable definitions` lists it all.

The definitions here are built without the decorators, so that they are not in this
process's registry: only the daemons given them have their code, as in a deployment where
the caller imports nothing of the worker's."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from durable.admin import Admin
from durable.errors import UnknownDefinition
from durable.registry import Definition, Registry, code_digest
from durable.retry import RetryPolicy
from tests.support.helpers import durable_cli, fetchval, running_daemon, wait_for


async def _charge(order_id: str) -> str:
    return f"charged {order_id}"


async def _fulfill(ctx: durable.Context, order_id: str) -> dict[str, Any]:
    charge = await ctx.step("charge", _charge, order_id)
    return {"order": order_id, "charge": charge}


async def _send(to: str) -> str:
    return f"sent to {to}"


FULFILL: Definition[Any, Any] = Definition(
    name="fulfill", fn=_fulfill, kind="workflow", queue="orders", max_attempts=5,
    timeout=60.0, priority=4, retry=RetryPolicy(base=0.5), digest=code_digest(_fulfill),
)  # fmt: skip
KEYED: Definition[Any, Any] = Definition(
    name="cat_keyed", fn=_send, queue="orders", concurrency_key=lambda to: to, key_limit=2,
    key_rate=(10, 60.0), digest=code_digest(_send),
)  # fmt: skip


TIMED: Definition[Any, Any] = Definition(
    name="cat_timed", fn=_send, queue="orders", deadline=600.0, idempotency="active",
    digest=code_digest(_send),
)  # fmt: skip


def registry_of(*definitions: Definition[Any, Any]) -> Registry:
    reg = Registry()
    for d in definitions:
        reg.add(d)
    return reg


async def task_row(dsn: str, task_id: int) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "select queue, kind, max_attempts, timeout, priority, version, key_limit,"
            " key_rate_limit, key_rate_period, status, worker_id from durable.tasks where id = $1",
            task_id,
        )
        assert row is not None
        return row
    finally:
        await conn.close()


def from_catalog(row: asyncpg.Record) -> None:
    assert (row["queue"], row["kind"], row["max_attempts"], row["timeout"], row["priority"]) == (
        "orders", "workflow", 5, 60.0, 4,
    )  # fmt: skip


async def count_tasks(dsn: str) -> int:
    return int(await fetchval(dsn, "select count(*) from durable.tasks"))


# -- the four start paths --------------------------------------------------------------------


async def test_the_readme_outbox_example_runs_on_a_daemon_serving_only_orders(dsn: str) -> None:
    assert durable.registry.registry.get("fulfill") is None  # this process has no code for it
    async with durable.connect(dsn) as client, running_daemon(
        dsn, reg=registry_of(FULFILL), queues="orders=8"
    ):
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():  # the caller's own transaction: an outbox
                task_id = await conn.fetchval("""select durable.start('fulfill', '["order-17"]')""")
        finally:
            await conn.close()
        assert await client.result(task_id, timeout=20) == {
            "order": "order-17", "charge": "charged order-17",
        }  # fmt: skip
        from_catalog(await task_row(dsn, task_id))
        # Explicit arguments win over the catalog's defaults.
        other = await fetchval(
            dsn, "select durable.start('fulfill', '[\"o-2\"]', max_attempts => 2, priority => 9)"
        )
        row = await task_row(dsn, other)
        assert (row["queue"], row["kind"], row["max_attempts"], row["priority"]) == (
            "orders", "workflow", 2, 9,
        )  # fmt: skip
        assert await client.result(other, timeout=20) is not None


async def test_python_without_the_code_takes_the_definition_from_the_catalog(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(
        dsn, reg=registry_of(FULFILL), queues="orders=8"
    ):
        handle = await client.start("fulfill", "o-3")
        assert (await handle.result(timeout=20))["order"] == "o-3"
        from_catalog(await task_row(dsn, handle.id))
        override = await client.start("fulfill", "o-4", max_attempts=1, timeout=5)
        row = await task_row(dsn, override.id)
        assert (row["queue"], row["kind"], row["max_attempts"], row["timeout"]) == (
            "orders", "workflow", 1, 5.0,
        )  # fmt: skip
        many = await client.start_many("fulfill", [["o-5"], ["o-6"]])
        for h in many:
            from_catalog(await task_row(dsn, h.id))
            assert (await h.result(timeout=20))["order"] in ("o-5", "o-6")


async def test_python_with_the_code_takes_its_own_definition_and_version(dsn: str) -> None:
    v3 = dataclasses.replace(FULFILL, version="3")
    async with durable.connect(dsn) as client, running_daemon(
        dsn, reg=registry_of(v3), queues="orders=8"
    ):
        handle = await client.start(v3, "o-7")
        assert (await handle.result(timeout=20))["order"] == "o-7"
        row = await task_row(dsn, handle.id)
        from_catalog(row)
        assert row["version"] == "3"


async def test_the_cli_takes_the_definition_from_the_catalog(dsn: str) -> None:
    async with running_daemon(dsn, reg=registry_of(FULFILL), queues="orders=8"):
        # In a thread: the daemon runs in this event loop.
        done = await anyio.to_thread.run_sync(lambda: durable_cli(
            "start", "fulfill", '["o-8"]', "--wait", "--timeout", "30s", dsn=dsn))  # fmt: skip
        assert done.returncode == 0, done.stderr
        task_id, result = done.stdout.splitlines()
        assert json.loads(result)["order"] == "o-8"
        from_catalog(await task_row(dsn, int(task_id)))


# -- names nobody published ---------------------------------------------------------------


async def test_a_name_nobody_published_is_refused_on_every_path(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        before = await count_tasks(dsn)
        with pytest.raises(UnknownDefinition, match="no daemon has published a definition named 'nosuchtask'"):
            await client.start("nosuchtask")
        with pytest.raises(UnknownDefinition):
            await client.start_many("nosuchtask", [[1]])
        with pytest.raises(asyncpg.InvalidParameterValueError, match="no daemon has published"):
            await fetchval(dsn, "select durable.start('nosuchtask')")
        refused = durable_cli("start", "nosuchtask", dsn=dsn)
        assert refused.returncode == 2
        assert refused.stderr.count("\n") == 1 and "--allow-unknown" in refused.stderr
        assert "nosuchtask" in refused.stderr
        assert await count_tasks(dsn) == before

        # An explicit queue, or allow_unknown, starts it anyway: it waits for its code.
        a = await client.start("nosuchtask", queue="later")
        b = await client.start("nosuchtask", allow_unknown=True)
        c = await fetchval(dsn, "select durable.start('nosuchtask', queue => 'later')")
        d = await fetchval(dsn, "select durable.start('nosuchtask', allow_unknown => true)")
        e = durable_cli("start", "nosuchtask", "--allow-unknown", dsn=dsn)
        f = durable_cli("start", "nosuchtask", "--queue", "later", dsn=dsn)
        assert e.returncode == 0 and f.returncode == 0, (e.stderr, f.stderr)
        queues = [(await task_row(dsn, i))["queue"] for i in
                  (a.id, b.id, c, d, int(e.stdout), int(f.stdout))]  # fmt: skip
        assert queues == ["later", "default", "later", "default", "default", "later"]
        # Waiting on it says which task did not finish, and how it stands.
        waited = durable_cli("start", "nosuchtask", "--allow-unknown", "--wait", "--timeout",
                             "0.2s", dsn=dsn)  # fmt: skip
        assert waited.returncode == 1
        assert waited.stderr.strip().endswith("did not finish within 0.2s (it is queued)")


async def test_a_start_by_name_takes_the_deadline_and_the_idempotency_scope(dsn: str) -> None:
    async with running_daemon(dsn, reg=registry_of(TIMED), queues="elsewhere=1"):
        pass  # published; nobody serves "orders", so the tasks stay queued
    left = ("select extract(epoch from deadline - created_at) from durable.tasks"
            " where id = $1")
    async with durable.connect(dsn) as client:
        by_python = (await client.start("cat_timed", "a")).id
        by_sql = await fetchval(dsn, "select durable.start('cat_timed', '[\"b\"]')")
        by_cli = int(durable_cli("start", "cat_timed", '["c"]', dsn=dsn).stdout)
        given = await fetchval(dsn, "select durable.start('cat_timed', deadline => 5)")
        for task_id in (by_python, by_sql, by_cli):
            assert 600 <= await fetchval(dsn, left, task_id) < 601
        assert 5 <= await fetchval(dsn, left, given) < 6  # the caller's wins

        # The definition's idempotency="active": a key frees once its task has finished.
        keyed = "select durable.start('cat_timed', '[\"d\"]', idempotency_key => $1)"
        first = await fetchval(dsn, keyed, "k-sql")
        assert await fetchval(dsn, keyed, "k-sql") == first
        await client.cancel(first)
        assert await fetchval(dsn, keyed, "k-sql") != first
        handle = await client.start("cat_timed", "e", idempotency_key="k-py")
        await client.cancel(handle.id)
        assert (await client.start("cat_timed", "e", idempotency_key="k-py")).id != handle.id
    listed = durable_cli("definitions", "--json", dsn=dsn)
    [row] = [json.loads(line) for line in listed.stdout.splitlines()
             if json.loads(line)["name"] == "cat_timed"]
    assert (row["deadline"], row["idempotency"]) == (600.0, "active")


async def test_a_schedule_of_a_name_nobody_published_is_refused(dsn: str) -> None:
    cron = ("--cron", "0 3 * * *")
    refused = durable_cli("schedules", "add", "nightly", "--task", "nosuchtask", *cron, dsn=dsn)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "'nosuchtask'" in refused.stderr and "--allow-unknown" in refused.stderr
    assert durable_cli("schedules", "--json", dsn=dsn).stdout.strip() == ""
    async with running_daemon(dsn, reg=registry_of(FULFILL), queues="orders=8"):
        pass  # published
    known = durable_cli("schedules", "add", "fulfil-nightly", "--task", "fulfill", *cron, dsn=dsn)
    later = durable_cli("schedules", "add", "a", "--task", "nosuchtask", "--queue", "later",
                        *cron, dsn=dsn)  # fmt: skip
    anyway = durable_cli("schedules", "add", "b", "--task", "nosuchtask", "--allow-unknown",
                         *cron, dsn=dsn)  # fmt: skip
    for ok in (known, later, anyway):
        assert ok.returncode == 0, ok.stderr
    listed = durable_cli("schedules", "--json", dsn=dsn)
    assert sorted(json.loads(line)["name"] for line in listed.stdout.splitlines()) == [
        "a", "b", "fulfil-nightly"]


async def test_a_name_stays_known_after_its_daemons_are_gone(dsn: str) -> None:
    async with running_daemon(dsn, reg=registry_of(FULFILL), queues="orders=8"):
        pass
    async with durable.connect(dsn) as client:
        waiting = await client.start("fulfill", "o-9")  # no daemon now: it waits, visibly
        row = await task_row(dsn, waiting.id)
        from_catalog(row)
        assert row["status"] == "queued"
    queues = durable_cli("queues", "--json", dsn=dsn)
    orders = [json.loads(line) for line in queues.stdout.splitlines()]
    assert {"queue": "orders", "unserved": ["fulfill"]}.items() <= next(
        q for q in orders if q["queue"] == "orders").items()  # fmt: skip


async def test_a_keyed_definition_needs_its_key_without_the_code(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(
        dsn, reg=registry_of(KEYED), queues="orders=8"
    ):
        with pytest.raises(durable.DurableError, match="concurrency key"):
            await client.start("cat_keyed", "a@b.c")
        with pytest.raises(asyncpg.InvalidParameterValueError, match="concurrency_key"):
            await fetchval(dsn, "select durable.start('cat_keyed', '[\"a@b.c\"]')")
        keyed = await fetchval(
            dsn, "select durable.start('cat_keyed', '[\"a@b.c\"]', concurrency_key => 'a@b.c')"
        )
        row = await task_row(dsn, keyed)
        assert (row["queue"], row["key_limit"], row["key_rate_limit"], row["key_rate_period"]) == (
            "orders", 2, 10, 60.0,
        )  # fmt: skip
        assert await client.result(keyed, timeout=20) == "sent to a@b.c"


async def _orders(ctx: durable.Context, order_id: str) -> Any:
    return await ctx.run("fulfill", order_id)


ORDERS: Definition[Any, Any] = Definition(
    name="cat_orders", fn=_orders, kind="workflow", queue="parents", digest=code_digest(_orders)
)


async def test_a_child_and_a_schedule_by_name_take_the_definition_from_the_catalog(
    dsn: str,
) -> None:
    """A daemon without a name's code starts it (a workflow's child, a schedule's tick)
    with what the catalog says, not the defaults: the daemons that have the code serve
    only its own queue."""
    async with running_daemon(dsn, reg=registry_of(FULFILL), queues="orders=8"):
        pass  # published, then gone
    async with durable.connect(dsn) as client, running_daemon(
        dsn, reg=registry_of(ORDERS), queues="parents=4"
    ):
        parent = await client.start(ORDERS, "o-20")

        async def child() -> Any:
            return await fetchval(
                dsn, "select id from durable.tasks where parent_id = $1", parent.id
            )

        child_id = await wait_for(child)
        from_catalog(await task_row(dsn, child_id))
        await Admin(client.store).add_schedule(
            "cat_nightly", "fulfill", "0 3 * * *", "UTC", ["o-21"], None,
            first=client.store.now(),
        )  # fmt: skip

        async def fired() -> Any:
            return await fetchval(
                dsn, "select last_task_id from durable.schedules where name = 'cat_nightly'"
            )

        tick = await wait_for(fired)
        from_catalog(await task_row(dsn, tick))
        async with running_daemon(dsn, reg=registry_of(FULFILL), queues="orders=8"):
            assert await parent.result(timeout=20) == {
                "order": "o-20", "charge": "charged o-20",
            }  # fmt: skip
            assert (await client.result(tick, timeout=20))["order"] == "o-21"


# -- publication -----------------------------------------------------------------------------


async def definitions_row(dsn: str, name: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "select max_attempts, version, published_by, published_at, xmin::text as xmin"
            " from durable.definitions where name = $1",
            name,
        )
        assert row is not None
        return row
    finally:
        await conn.close()


async def test_unchanged_publications_write_nothing(dsn: str) -> None:
    async with running_daemon(dsn, reg=registry_of(FULFILL), queues="orders=8") as daemon:
        store = daemon.store
        assert store is not None
        before = await definitions_row(dsn, "fulfill")
        from durable.catalog import publication

        # Each heartbeat's publication, as many times as a large fleet would send it.
        for _ in range(5):
            assert await store.publish_definitions(daemon.id, publication([FULFILL]), 5.0) == []
        after = await definitions_row(dsn, "fulfill")
        assert (after["xmin"], after["published_at"]) == (before["xmin"], before["published_at"])


async def test_the_newest_daemon_wins_and_the_disagreement_is_shown(dsn: str) -> None:
    old = dataclasses.replace(FULFILL, max_attempts=2)
    new = dataclasses.replace(FULFILL, max_attempts=7)
    async with running_daemon(dsn, reg=registry_of(old), queues="orders=8") as first:
        assert (await definitions_row(dsn, "fulfill"))["max_attempts"] == 2
        async with running_daemon(dsn, reg=registry_of(new), queues="orders=8") as second:
            row = await definitions_row(dsn, "fulfill")
            assert (row["max_attempts"], row["published_by"]) == (7, second.id)
            listed = durable_cli("definitions", "--json", dsn=dsn)
            assert listed.returncode == 0, listed.stderr
            [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
            assert entry["max_attempts"] == 7
            assert {d["id"] for d in entry["daemons"]} == {str(first.id), str(second.id)}
            assert any("disagree" in p for p in entry["problems"])
            # The older daemon's heartbeats do not take it back while the newer one lives.
            assert first.store is not None
            from durable.catalog import publication

            assert await first.store.publish_definitions(first.id, publication([old]), 5.0) == []

        # The newer one stopped: the older one's next heartbeat takes the row back.
        async def reverted() -> bool:
            return bool((await definitions_row(dsn, "fulfill"))["max_attempts"] == 2)

        await wait_for(reverted)
        assert (await definitions_row(dsn, "fulfill"))["published_by"] == first.id


# -- versions --------------------------------------------------------------------------------


async def _version_one(ctx: durable.Context) -> str:
    return str(await ctx.step("v", _tag, "one"))


async def _version_two(ctx: durable.Context) -> str:
    return str(await ctx.step("v", _tag, "two"))


async def _tag(tag: str) -> str:
    return tag


V1: Definition[Any, Any] = Definition(
    name="cat_flow", fn=_version_one, kind="workflow", queue="flows", version="1",
    digest=code_digest(_version_one),
)  # fmt: skip
V2 = dataclasses.replace(V1, fn=_version_two, version="2", digest=code_digest(_version_two))


async def test_a_versioned_run_goes_only_to_a_daemon_with_its_version(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(
        dsn, reg=registry_of(V1), queues="flows"
    ) as one:
        async with running_daemon(dsn, reg=registry_of(V2), queues="flows") as two:
            # By name: the catalog's version, the newest daemon's.
            by_name = [await client.start("cat_flow") for _ in range(6)]
            old = [await client.start(V1) for _ in range(6)]
            assert [await h.result(timeout=20) for h in by_name] == ["two"] * 6
            assert [await h.result(timeout=20) for h in old] == ["one"] * 6
            for h in by_name:
                row = await task_row(dsn, h.id)
                assert (row["version"], row["worker_id"]) == ("2", two.id)
            for h in old:
                row = await task_row(dsn, h.id)
                assert (row["version"], row["worker_id"]) == ("1", one.id)
            # An unversioned task of the name runs on either.
            plain = await client.start(dataclasses.replace(V1, version=None))
            assert await plain.result(timeout=20) in ("one", "two")
        # Version 1 only, now: a version-2 run waits, and says why.
        stranded = await client.start(V2)
        fine = await client.start(V1)
        assert await fine.result(timeout=20) == "one"
        assert (await task_row(dsn, stranded.id))["status"] == "queued"

        listed = durable_cli("ls", "--json", dsn=dsn)
        rows = {r["id"]: r for r in map(json.loads, listed.stdout.splitlines())}
        assert rows[stranded.id]["waiting_for"] == "a daemon with version 2"
        assert "waiting_for" not in rows[fine.id]
        queues = [json.loads(line) for line in durable_cli("queues", "--json", dsn=dsn).stdout.splitlines()]
        assert next(q for q in queues if q["queue"] == "flows")["unserved"] == ["cat_flow@2"]
        [entry] = [json.loads(line) for line in durable_cli(
            "definitions", "--name", "cat_flow", "--json", dsn=dsn).stdout.splitlines()]  # fmt: skip
        assert entry["versions"] == ["1"]
        assert entry["tasks"]["2"] == {"queued": 1, "running": 0, "waiting": 0}
        assert entry["problems"] == ["no live daemon has version 2"]
        assert [d["id"] for d in entry["daemons"]] == [str(one.id)]
        table = durable_cli("definitions", dsn=dsn)
        assert table.returncode == 0 and "cat_flow" in table.stdout


async def _child(n: int) -> int:
    return n * 2


CHILD: Definition[Any, Any] = Definition(
    name="cat_child", fn=_child, queue="flows", version="3", digest=code_digest(_child)
)


async def _parent(ctx: durable.Context, n: int) -> int:
    return int(await ctx.run(CHILD, n))


PARENT: Definition[Any, Any] = Definition(
    name="cat_parent", fn=_parent, kind="workflow", queue="flows", digest=code_digest(_parent)
)


async def test_a_child_records_the_version_of_the_code_that_started_it(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(
        dsn, reg=registry_of(PARENT, CHILD), queues="flows"
    ):
        handle = await client.start("cat_parent", 21)
        assert await handle.result(timeout=20) == 42
        child = await fetchval(dsn, "select id from durable.tasks where parent_id = $1", handle.id)
        assert (await task_row(dsn, child))["version"] == "3"
        assert (await task_row(dsn, handle.id))["version"] is None


async def test_a_task_of_another_version_is_not_due_for_a_daemon(dsn: str) -> None:
    """An idle queue loop sleeps until the next task it can claim is due: a task of a
    version it lacks must not keep it polling."""
    from durable.catalog import claim_names

    async with durable.connect(dsn) as client:
        await client.start(V2)
        store = client.store
        assert await store.next_due("flows", claim_names([V1])) is None
        assert await store.next_due("flows", claim_names([V2])) is not None
        await client.start(dataclasses.replace(V1, version=None))  # runs on any version
        assert await store.next_due("flows", claim_names([V1])) is not None


async def test_an_older_daemon_whose_publish_began_first_does_not_overwrite_a_newer_one(
    dsn: str,
) -> None:
    """The older daemon's publish statement took its snapshot, then waited (here for a row
    another session holds); meanwhile a newer daemon registered and published the name.
    The older one's snapshot does not show the newer daemon, but the row it meets does:
    it leaves it."""
    from durable.catalog import publication
    from durable.store import Store

    other: Definition[Any, Any] = Definition(
        name="cat_other", fn=_tag, queue="orders", digest=code_digest(_tag)
    )
    old = dataclasses.replace(FULFILL, max_attempts=2)
    new = dataclasses.replace(FULFILL, max_attempts=7)
    older_id, newer_id = uuid.uuid4(), uuid.uuid4()
    # The older daemon's statement takes its rows in the order it was given them (a hash
    # anti-join may take them in another): it meets the held row before it writes fulfill.
    older = await Store.open(
        dsn, server_settings={"enable_hashjoin": "off", "enable_mergejoin": "off"}
    )
    newer = await Store.open(dsn)
    try:
        await older.register_worker(older_id, {"orders": 1}, ["cat_other", "fulfill"])
        await older.register_definitions(older_id, publication([other, old]))
        await older.publish_definitions(older_id, publication([other]), 5.0)
        holder = await asyncpg.connect(dsn)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "select 1 from durable.definitions where name = 'cat_other' for update"
            )
            changed = dataclasses.replace(other, max_attempts=9)  # so it writes cat_other
            publishing = asyncio.ensure_future(
                older.publish_definitions(older_id, publication([changed, old]), 5.0)
            )

            async def waiting() -> int:
                return int(await fetchval(
                    dsn, "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                    " and query like '%durable.definitions%'",
                ))  # fmt: skip

            await wait_for(waiting)
            await newer.register_worker(newer_id, {"orders": 1}, ["fulfill"])
            await newer.register_definitions(newer_id, publication([new]))
            # Its own task: had the older statement written fulfill before it waited, this
            # one would wait for that (and the test must not).
            published = asyncio.ensure_future(
                newer.publish_definitions(newer_id, publication([new]), 5.0)
            )

            async def settled() -> bool:
                return published.done() or await waiting() >= 2

            await wait_for(settled)
            await tx.rollback()
            assert await published == ["fulfill"]
            await publishing
        finally:
            await holder.close()
    finally:
        await older.close()
        await newer.close()
    row = await definitions_row(dsn, "fulfill")
    assert (row["max_attempts"], row["published_by"]) == (7, newer_id)

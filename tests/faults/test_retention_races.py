"""Attacks on retention (pruning finished task trees) against a real Postgres.

Interleavings are forced with row locks held open in other transactions and waits on
the server's state (a session waiting on a lock), or with prune's own progress callback
between two of its statements; never with sleeps. Ages are set in the tables (the
database's clock is the one prune reads) rather than waited out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from durable.errors import DurableError
from durable.models import PruneResult
from durable.store import Store
from tests.apps import retention_races_app as app
from tests.support.helpers import running_daemon, wait_for, wait_status

DAY = 86400.0
BOTH = f"{app.PARENT_QUEUE}=4,{app.CHILD_QUEUE}=4"


@asynccontextmanager
async def connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def store_of(dsn: str) -> AsyncIterator[Store]:
    store = await Store.open(dsn, max_size=2)
    try:
        yield store
    finally:
        await store.close()


async def make(
    conn: asyncpg.Connection, status: str, *, finished: str = "2 days",
    parent: int | None = None, root: int | None = None, kind: str = "task",
    idempotency_key: str | None = None,
) -> int:
    """A task row in ``status``, finished ``finished`` ago when finished."""
    done = status in ("completed", "failed", "cancelled")
    return int(await conn.fetchval(
        """
        insert into durable.tasks (queue, name, kind, status, parent_id, root_id, created_at,
                                   finished_at, claim_token, lease_until, idempotency_key)
        values ('nobody_serves_this', 'ar_row', $6, $1::text, $2, $3, now() - interval '3 days',
                case when $4 then now() - $5::text::interval end,
                case when $1 = 'running' then 1 end,
                case when $1 = 'running' then now() + interval '1 hour' end, $7)
        returning id
        """,
        status, parent, root, done, finished, kind, idempotency_key,
    ))  # fmt: skip


async def age_tree(conn: asyncpg.Connection, root: int) -> None:
    """Make every task of ``root``'s tree look finished two days ago."""
    await conn.execute(
        "update durable.tasks set finished_at = now() - interval '2 days'"
        " where (id = $1 or root_id = $1) and finished_at is not null", root,
    )  # fmt: skip


async def lock_waiters(probe: asyncpg.Connection) -> int:
    """Sessions of this database waiting on a heavyweight lock."""
    return int(await probe.fetchval(
        "select count(*) from pg_stat_activity where datname = current_database()"
        " and wait_event_type = 'Lock'"
    ))  # fmt: skip


async def until_blocked(probe: asyncpg.Connection, pending: asyncio.Future[Any]) -> bool:
    """Wait until some session of this database waits on a lock (True), or ``pending``
    has finished without blocking (False)."""

    async def check() -> str | None:
        if pending.done():
            return "done"
        return "blocked" if await lock_waiters(probe) else None

    return bool(await wait_for(check, interval=0.005) == "blocked")


async def prune(store: Store, older_than: float, **options: Any) -> PruneResult:
    """``store.prune``, which answers None only when another pruner holds the lock."""
    done = await store.prune(older_than, **options)
    assert done is not None, "another pruner held the lock"
    return done


def in_thread(dsn: str, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    """Run ``work`` on a connection of its own in another thread, to completion, and
    return its value: called from prune's progress callback, it lands exactly between
    two of prune's statements (the callback blocks prune's event loop meanwhile)."""
    out: list[Any] = []

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            out.append(await work(conn))
        except BaseException as exc:
            out.append(exc)
        finally:
            await conn.close()

    t = threading.Thread(target=lambda: asyncio.run(main()))
    t.start()
    t.join(30)
    assert out, "the work between two prune statements did not finish"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


# -- a retry racing a prune statement ---------------------------------------------------------


async def test_retry_of_a_child_racing_a_prune_statement_keeps_the_retried_child(dsn: str) -> None:
    # Prune locks only a tree's root; a child retried while the statement waits on the
    # child's row is checked again once the retry commits, and stays with its tree.
    async with connection(dsn) as conn, connection(dsn) as probe, store_of(dsn) as store:
        root = await make(conn, "completed", kind="workflow")
        child = await make(conn, "failed", parent=root, root=root)
        # `durable retry CHILD` (client.retry): its transaction holds the child's row.
        retry = conn.transaction()
        await retry.start()
        assert await conn.fetchval("select durable.restart($1, 'retry')", child) == 0
        pruning = asyncio.ensure_future(prune(store, DAY))
        try:
            # The prune statement, whose snapshot saw the child failed, waits on its row.
            assert await until_blocked(probe, pruning)
        finally:
            await retry.commit()
        done = await pruning
        status = await probe.fetchval("select status from durable.tasks where id = $1", child)
        # Promised: a queued task is never deleted, nor anything else in its tree.
        assert (status, done.tasks) == ("queued", 0), (
            f"the retried child is {status or 'gone'}; prune deleted {done.tasks} task(s)"
        )


async def test_retry_of_a_root_racing_a_prune_statement_keeps_the_tree(dsn: str) -> None:
    # The same race on the root: prune locks the root and re-checks it, so the retried
    # root and its children stay.
    async with connection(dsn) as conn, connection(dsn) as probe, store_of(dsn) as store:
        root = await make(conn, "failed", kind="workflow")
        child = await make(conn, "completed", parent=root, root=root)
        retry = conn.transaction()
        await retry.start()
        await conn.fetchval("select durable.restart($1, 'retry')", root)
        pruning = asyncio.ensure_future(prune(store, DAY))
        try:
            assert await until_blocked(probe, pruning)
        finally:
            await retry.commit()
        assert await pruning == PruneResult()
        rows = await probe.fetch("select id, status from durable.tasks order by id")
        assert [tuple(r) for r in rows] == [(root, "queued"), (child, "completed")]


async def test_retry_of_a_task_prune_deletes_first_is_a_clear_error(dsn: str) -> None:
    # Prune's statement waits on the task's row (held open here); `durable retry` queues
    # behind it and, once the task is gone, says so rather than hang or restart nothing.
    async with connection(dsn) as conn, connection(dsn) as holder, connection(dsn) as probe, \
            store_of(dsn) as store, durable.connect(dsn) as client:  # fmt: skip
        task = await make(conn, "failed")
        hold = holder.transaction()
        await hold.start()
        await holder.execute("select 1 from durable.tasks where id = $1 for update", task)
        pruning = asyncio.ensure_future(prune(store, DAY))
        retrying: asyncio.Future[int] | None = None
        try:
            assert await until_blocked(probe, pruning)
            retrying = asyncio.ensure_future(client.retry(task))

            async def both_blocked() -> bool:
                return await lock_waiters(probe) >= 2 or retrying.done()

            await wait_for(both_blocked, interval=0.005)
        finally:
            await hold.commit()
        assert (await pruning).tasks == 1
        with pytest.raises(DurableError, match=f"no task {task}"):
            await retrying


# -- a retry landing between two statements of one prune pass ---------------------------------


@pytest.mark.timeout(120)
async def test_root_retried_between_two_prune_statements_still_finishes(dsn: str) -> None:
    # A tree goes over several statements; a root retried between two of them has lost
    # some of its children. The retry runs again the children that no longer exist (a
    # workflow that waited on them waited for ever, claimed and suspended in a loop).
    async with durable.connect(dsn) as client, connection(dsn) as conn:
        # A fan-out whose children never ran: the parent suspends on them, then is
        # cancelled, which cancels them; its log keeps their events pending.
        async with running_daemon(dsn, queues=f"{app.PARENT_QUEUE}=2") as _:
            handle = await client.start(app.ar_fan_out, 3)
            await wait_status(dsn, handle.id, "waiting")
        await client.cancel(handle.id)
        await wait_status(dsn, handle.id, "cancelled")
        kids = [r["id"] for r in await conn.fetch(
            "select id from durable.tasks where parent_id = $1 order by id", handle.id)]
        assert len(kids) == 3
        await age_tree(conn, handle.id)

        retried: list[int] = []

        def between(done: PruneResult) -> None:
            # After prune's first statement (one child deleted), `durable retry ROOT`.
            if not retried:
                retried.append(in_thread(dsn, lambda c: c.fetchval(
                    "select durable.restart($1, 'retry')", handle.id)))

        async with store_of(dsn) as store:
            done = await prune(store, DAY, batch=1, progress=between)
        assert retried and done.tasks == 1
        left = {r["id"] for r in await conn.fetch("select id from durable.tasks")}
        assert handle.id in left and len(left & set(kids)) == 2
        # The retried workflow runs again, children and all: retrying a cancelled fan-out
        # starts its cancelled children afresh.
        async with running_daemon(dsn, queues=BOTH):
            with anyio.move_on_after(10):
                assert await client.result(handle.id) == [0, 10, 20]
                return
            info = await client.get(handle.id)
            attempts = info.attempt
        pytest.fail(f"the retried workflow never finished: {info.status} after attempt {attempts}")



# -- a parent that has not yet seen its finished child ----------------------------------------


@pytest.mark.timeout(120)
async def test_finished_child_survives_prune_until_its_parent_resumes_and_replays_cold(
    dsn: str,
) -> None:
    app.GATE.clear()
    async with durable.connect(dsn) as client, connection(dsn) as conn, store_of(dsn) as store:
        async with running_daemon(dsn, queues=BOTH):
            handle = await client.start(app.ar_child_then_event, 7)
            await wait_status(dsn, handle.id, "waiting")
            child = await conn.fetchval("select id from durable.tasks where parent_id = $1",
                                        handle.id)  # fmt: skip
            # The parent's queue is paused: the child finishes, the parent is woken
            # (queued) but cannot resume before the prune passes below.
            await store.set_queue_paused(app.PARENT_QUEUE, True)
            app.GATE.set()
            await wait_status(dsn, child, "completed")
            await wait_status(dsn, handle.id, "queued")
            await conn.execute("update durable.tasks set finished_at = now() - interval '2 days'"
                               " where id = $1", child)  # fmt: skip
            # Pruning everything finished before now, then everything older than a day:
            # the child, finished "two days ago", goes with its tree only.
            assert (await prune(store, 0.0)).tasks == 0
            assert (await prune(store, DAY)).tasks == 0
        # A new daemon (nothing cached): the parent resumes from its log and the child row.
        await store.set_queue_paused(app.PARENT_QUEUE, False)
        async with running_daemon(dsn, queues=BOTH):

            async def waits_for_go() -> bool:
                return await conn.fetchval(
                    "select waiting_event = 'go' from durable.tasks where id = $1", handle.id
                ) is True  # fmt: skip

            await wait_for(waits_for_go)
        assert (await prune(store, 0.0)).tasks == 0
        assert await conn.fetchval("select status from durable.tasks where id = $1",
                                   child) == "completed"  # fmt: skip
        # And a cold replay once more, past another prune pass: the child's result comes
        # from the parent's own log.
        async with running_daemon(dsn, queues=BOTH):
            assert await client.send_event(handle.id, "go", "p")
            with anyio.fail_after(30):
                assert await client.result(handle.id) == [700, "p"]
        done = await prune(store, 0.0)
        assert done.tasks == 2 and not await conn.fetchval("select count(*) from durable.tasks")
        assert not await conn.fetchval("select count(*) from durable.events")


@pytest.mark.timeout(120)
async def test_a_parent_whose_child_was_deleted_runs_it_again(dsn: str) -> None:
    # A child deleted before its parent saw its outcome (by hand, or pruned with a tree
    # restarted meanwhile) counts as failed, recorded in the parent's log; the attempt
    # fails on it and the next one starts the child again. Waiting on it would wait for
    # ever (claimed, suspended as ready, claimed again, in a loop).
    app.GATE.clear()
    async with durable.connect(dsn) as client, connection(dsn) as conn, store_of(dsn) as store:
        async with running_daemon(dsn, queues=BOTH):
            handle = await client.start(app.ar_child_then_event, 3)
            await wait_status(dsn, handle.id, "waiting")
            child = await conn.fetchval("select id from durable.tasks where parent_id = $1",
                                        handle.id)  # fmt: skip
            await store.set_queue_paused(app.PARENT_QUEUE, True)
            app.GATE.set()
            await wait_status(dsn, handle.id, "queued")
            await conn.execute("delete from durable.tasks where id = $1", child)
            await store.set_queue_paused(app.PARENT_QUEUE, False)

            async def waits_for_go() -> bool:
                return await conn.fetchval(
                    "select waiting_event = 'go' from durable.tasks where id = $1", handle.id
                ) is True  # fmt: skip

            await wait_for(waits_for_go)
            assert await client.send_event(handle.id, "go", "p")
            assert await client.result(handle.id, timeout=30) == [300, "p"]
        info = await client.get(handle.id)
        children = await conn.fetchval(
            "select count(*) from durable.tasks where parent_id = $1", handle.id
        )
    assert (info.attempt, children) == (2, 1)


# -- continue-as-new chains -------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_an_old_run_of_a_live_chain_is_pruned_and_the_chain_goes_on(dsn: str) -> None:
    # Retention applies to each run of a chain (docs/workflows.md): an earlier run that
    # finished long enough ago goes, its id with it; the chain's current run stays, its
    # idempotency key finds it, and it finishes.
    async with (
        durable.connect(dsn) as client,
        connection(dsn) as conn,
        store_of(dsn) as store,
        running_daemon(dsn, queues=BOTH),
    ):
        handle = await client.start(app.ar_chain, 1, idempotency_key="chain")
        _, nxt = await wait_for(lambda: _next(client, handle.id))

        async def waits_for_go() -> bool:
            return await conn.fetchval(
                "select waiting_event = 'go' from durable.tasks where id = $1", nxt
            ) is True  # fmt: skip

        await wait_for(waits_for_go)
        await conn.execute("update durable.tasks set finished_at = now() - interval '2 days'"
                           " where id = $1", handle.id)  # fmt: skip
        assert (await prune(store, DAY)).tasks == 1
        with pytest.raises(DurableError, match=f"no task {handle.id}"):
            await client.result(handle.id, timeout=5)
        again = await client.start(app.ar_chain, 1, idempotency_key="chain")
        assert (again.id, again.created) == (nxt, False)
        assert await client.send_event(nxt, "go", 1)
        assert await client.result(nxt, timeout=30) == "done:1"


async def _next(client: durable.Client, task_id: int) -> tuple[int, int] | None:
    _, nxt = await client.chain(task_id)
    return (task_id, nxt) if nxt is not None else None


# -- several pruners at once ------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_three_daemons_pruning_at_once_count_every_task_once(dsn: str) -> None:
    from durable.daemon import Daemon
    from durable.registry import registry
    from tests.support.helpers import settings

    trees = 400
    async with connection(dsn) as conn:
        # Trees of a root and two children (one failed), each with events and a signal;
        # and, among them, unfinished trees that must stay.
        await conn.execute(
            """
            with roots as (
                insert into durable.tasks (queue, name, kind, status, created_at, finished_at)
                select 'nobody', 'ar_row', 'workflow',
                       case when g % 50 = 0 then 'waiting' else 'completed' end,
                       now() - interval '3 days',
                       case when g % 50 = 0 then null else now() - interval '2 days' end
                  from generate_series(1, $1) g
                returning id, status
            ), kids as (
                insert into durable.tasks (queue, name, kind, status, parent_id, root_id,
                                           created_at, finished_at)
                select 'nobody', 'ar_row', 'task', case when k = 1 then 'failed' else 'completed' end,
                       r.id, r.id, now() - interval '3 days', now() - interval '2 days'
                  from roots r cross join generate_series(1, 2) k
                returning id
            ), ev as (
                insert into durable.events (task_id, branch, seq, kind, name, digest, status, attempt)
                select r.id, 0, s, 'step', 's', 'd', 'completed', 1
                  from roots r cross join generate_series(0, 2) s
                returning 1
            )
            insert into durable.signals (task_id, name) select id, 'go' from roots
            """,
            trees,
        )  # fmt: skip
        total = await conn.fetchval("select count(*) from durable.tasks")
        kept = await conn.fetchval(
            "select count(*) from durable.tasks t where t.status = 'waiting'"
            " or t.root_id in (select id from durable.tasks where status = 'waiting')"
        )
        kept_events = await conn.fetchval(
            "select count(*) from durable.events e join durable.tasks t on t.id = e.task_id"
            " where t.status = 'waiting'"
        )
        daemons = [Daemon(settings(retention="1d", queues="nothing_here"), registry, dsn)
                   for _ in range(3)]  # fmt: skip
        for d in daemons:
            d.retention_interval = 0.01
        async with anyio.create_task_group() as tg:
            for d in daemons:
                await tg.start(d.run)
            try:

                async def settled() -> bool:
                    return (await conn.fetchval("select count(*) from durable.tasks") == kept
                            and sum(d.metrics.tasks_pruned for d in daemons) == total - kept
                            and all(d.prune_runs >= 3 for d in daemons))  # fmt: skip

                await wait_for(settled, timeout=60)
            finally:
                for d in daemons:
                    d.stop()
        assert sum(d.metrics.tasks_pruned for d in daemons) == total - kept
        assert await conn.fetchval("select count(*) from durable.events") == kept_events
        assert await conn.fetchval("select count(*) from durable.signals") == trees // 50


# -- clock skew -------------------------------------------------------------------------------

from tests.faults.test_clock_skew import LIBFAKETIME  # noqa: E402
from tests.support.helpers import kill, spawn_daemon_logged  # noqa: E402


@pytest.mark.timeout(90)
@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="libfaketime is not installed")
@pytest.mark.parametrize("skew", ["-1h", "+1h"])
async def test_a_skewed_daemon_prunes_by_the_databases_clock(
    dsn: str, tmp_path: Any, skew: str
) -> None:
    async with connection(dsn) as conn:
        old = await make(conn, "completed", finished="100 minutes")
        young = await make(conn, "completed", finished="20 minutes")
        proc = spawn_daemon_logged(
            dsn, "tests.apps.retention_races_app", tmp_path / "daemon.log",
            DURABLE_QUEUES=app.PARENT_QUEUE, DURABLE_RETENTION="1h",
            LD_PRELOAD=str(LIBFAKETIME), FAKETIME=skew, FAKETIME_DONT_FAKE_MONOTONIC="1",
        )  # fmt: skip
        try:

            async def old_gone() -> bool:
                return not await conn.fetchval("select count(*) from durable.tasks where id = $1", old)

            await wait_for(old_gone, timeout=45)
            # The pass that deleted the old one left the young one (20 minutes by the
            # database's clock: 80 or -40 by the daemon's).
            assert [r["id"] for r in await conn.fetch("select id from durable.tasks")] == [young]
        finally:
            kill(proc)
            proc.wait(timeout=30)


# -- DURABLE_RETENTION at its bounds ----------------------------------------------------------

from durable.errors import ConfigurationError  # noqa: E402
from durable.settings import Settings  # noqa: E402


@pytest.mark.parametrize("raw", ["0", "0s", "-1", "-7d", "abc", "7 days", "1e3", "inf", "nan"])
def test_retention_out_of_bounds_is_one_line_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env({"DURABLE_RETENTION": raw})
    message = str(err.value)
    assert message.startswith("DURABLE_RETENTION:") and "\n" not in message


@pytest.mark.parametrize("raw", ["1000000d", "100000000d", "9" * 60 + "d"])
async def test_a_retention_too_long_to_prune_with_is_refused_at_startup(dsn: str, raw: str) -> None:
    # Past a century the cutoff is a date PostgreSQL or Python cannot hold: refused, in
    # one line, rather than accepted and failing every prune pass.
    try:
        retention = Settings.from_env({"DURABLE_RETENTION": raw}).retention
    except ConfigurationError as exc:
        assert str(exc).startswith("DURABLE_RETENTION:")
        return
    # Accepted: then every pass the daemon makes under it must at least work.
    assert retention is not None
    async with store_of(dsn) as store:
        try:
            await prune(store, retention)
        except Exception as exc:
            pytest.fail(f"DURABLE_RETENTION={raw} was accepted, but every prune pass fails: "
                        f"{type(exc).__name__}: {exc}")


# -- idempotency keys, results and events of a task being pruned ------------------------------


async def test_a_forever_key_racing_the_prune_of_its_task_starts_one_new_task(dsn: str) -> None:
    # Prune's statement waits on the keyed task's row (held open here), and a start with
    # the key queues behind it on the same row: once the task is gone the key is free
    # ("as long as that task exists"), and the start makes exactly one new task.
    async with connection(dsn) as conn, connection(dsn) as holder, connection(dsn) as probe, \
            store_of(dsn) as store, durable.connect(dsn) as client:  # fmt: skip
        old = await make(conn, "completed", idempotency_key="k-forever")
        hold = holder.transaction()
        await hold.start()
        await holder.execute("select 1 from durable.tasks where id = $1 for update", old)
        pruning = asyncio.ensure_future(prune(store, DAY))
        starting: asyncio.Future[Any] | None = None
        try:
            assert await until_blocked(probe, pruning)
            starting = asyncio.ensure_future(client.start(
                "ar_row", queue="nobody_serves_this", idempotency_key="k-forever"))

            async def both_blocked() -> bool:
                return await lock_waiters(probe) >= 2 or starting.done()

            await wait_for(both_blocked, interval=0.005)
        finally:
            await hold.commit()
        assert (await pruning).tasks == 1
        handle = await starting
        again = await client.start("ar_row", queue="nobody_serves_this", idempotency_key="k-forever")
        assert handle.created and handle.id != old
        assert (again.id, again.created) == (handle.id, False)
        rows = await probe.fetch("select id, status from durable.tasks")
        assert [tuple(r) for r in rows] == [(handle.id, "queued")]


async def test_result_and_events_of_a_task_being_pruned_are_clear_answers(dsn: str) -> None:
    # client.result and send_event queue behind prune's statement on the task's row;
    # once it is gone they answer at once ("no task", False), neither hangs.
    async with connection(dsn) as conn, connection(dsn) as holder, connection(dsn) as probe, \
            store_of(dsn) as store, durable.connect(dsn) as client:  # fmt: skip
        task = await make(conn, "completed", kind="workflow")
        hold = holder.transaction()
        await hold.start()
        await holder.execute("select 1 from durable.tasks where id = $1 for update", task)
        pruning = asyncio.ensure_future(prune(store, DAY))
        asked: list[asyncio.Future[Any]] = []
        try:
            assert await until_blocked(probe, pruning)
            asked.append(asyncio.ensure_future(client.result(task, timeout=20)))
            asked.append(asyncio.ensure_future(client.send_event(task, "go", 1, idempotency_key="e")))

            async def all_blocked() -> bool:
                return await lock_waiters(probe) >= 3 or any(a.done() for a in asked)

            await wait_for(all_blocked, interval=0.005)
        finally:
            await hold.commit()
        assert (await pruning).tasks == 1
        with anyio.fail_after(10):
            with pytest.raises(DurableError, match=f"no task {task}"):
                await asked[0]
            assert await asked[1] is False
        assert not await probe.fetchval("select count(*) from durable.signals")

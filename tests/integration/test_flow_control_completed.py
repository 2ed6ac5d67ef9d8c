"""Flow control, completed: send_event idempotency keys, idempotency scope "active", and
pausing a queue fleet-wide. Each race is staged with a lock held in a third session, and
the test waits until the racers are blocked on it (pg_stat_activity), never on a sleep."""

from __future__ import annotations

import json
import uuid

import anyio
import asyncpg
import pytest

import durable
from durable.admin import Admin
from durable.metrics import Metrics
from durable.validation import InvalidValue
from tests.support.helpers import durable_cli, fetchval, running_daemon, wait_for, wait_status


@durable.workflow(name="fc_waiter", max_attempts=1)
async def fc_waiter(ctx: durable.Context) -> list[object]:
    first = await ctx.wait_for_event("go")
    second = await ctx.wait_for_event("go", timeout=0.01)  # a duplicate would arrive here
    return [first, second]


@durable.task(name="fc_job", queue="fc_q")
async def fc_job(n: int) -> int:
    return n


@durable.task(name="fc_other", queue="fc_other")
async def fc_other() -> str:
    return "other"


@durable.task(name="fc_active", idempotency="active")
async def fc_active(n: int) -> int:
    return n


async def blocked(dsn: str, count: int, like: str) -> None:
    """Until ``count`` sessions wait for a lock while running a statement like ``like``."""

    async def check() -> bool:
        n = await fetchval(
            dsn,
            "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
            "and query like $1 and pid <> pg_backend_pid()",
            like,
        )
        return bool(n >= count)

    await wait_for(check)


# -- send_event(..., idempotency_key) ------------------------------------------------------


async def test_two_producers_racing_one_event_key_deliver_once(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handle = await client.start(fc_waiter)
        lock = await asyncpg.connect(dsn)
        results: list[bool] = []
        try:
            tx = lock.transaction()
            await tx.start()
            # Both producers queue behind this lock on the task's row, then run one after
            # the other: the second must see the first's delivery.
            await lock.execute("select 1 from durable.tasks where id = $1 for update", handle.id)

            async def produce(payload: str) -> None:
                async with durable.connect(dsn) as producer:
                    results.append(
                        await producer.send_event(handle.id, "go", payload, idempotency_key="order-7")
                    )

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce, "a")
                tg.start_soon(produce, "b")
                await blocked(dsn, 2, "%send_event%")
                await tx.commit()
        finally:
            await lock.close()
        assert results == [True, True]
        assert await fetchval(dsn, "select count(*) from durable.signals") == 1
        async with running_daemon(dsn):
            with pytest.raises(durable.TaskFailed, match="EventTimeout"):
                await handle.result(timeout=30)  # the second wait got nothing
        # A retry after the task finished still answers "delivered"; a new key does not.
        assert await client.send_event(handle.id, "go", "c", idempotency_key="order-7") is True
        assert await client.send_event(handle.id, "go", "d", idempotency_key="order-8") is False
        assert await fetchval(dsn, "select count(*) from durable.signals") == 1


async def test_one_key_per_task_and_bad_keys_refused(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        a = await client.start(fc_waiter)
        b = await client.start(fc_waiter)
        assert await client.send_event(a.id, "go", 1, idempotency_key="k") is True
        assert await client.send_event(b.id, "go", 2, idempotency_key="k") is True
        assert await fetchval(dsn, "select count(*) from durable.signals") == 2
        with pytest.raises(InvalidValue, match="idempotency_key must be at most 2000 bytes"):
            await client.send_event(a.id, "go", idempotency_key="x" * 2001)
        with pytest.raises(InvalidValue, match="idempotency_key"):
            await client.send_event(a.id, "go", idempotency_key="")
    with pytest.raises(asyncpg.InvalidParameterValueError, match="idempotency_key must be 1 to 2000"):
        await fetchval(dsn, "select durable.send_event($1, 'go', null, '')", a.id)
    cli = durable_cli("event", str(a.id), "go", "3", "--idempotency-key", "k", dsn=dsn)
    assert cli.returncode == 0, cli.stderr
    assert await fetchval(dsn, "select count(*) from durable.signals") == 2


# -- idempotency="active" ------------------------------------------------------------------


async def test_an_active_key_returns_the_unfinished_task_then_frees(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        first = await client.start(fc_active, 1, idempotency_key="sync-42")
        again = await client.start(fc_active, 2, idempotency_key="sync-42")
        assert (again.id, again.created) == (first.id, False)
        async with running_daemon(dsn):
            assert await first.result(timeout=30) == 1
        after = await client.start(fc_active, 3, idempotency_key="sync-42")
        assert after.created and after.id != first.id
        # The start option wins over the decorator's scope: "forever" sees the old task
        # only under the permanent key, which the active one never took.
        forever = await client.start(fc_job, 4, idempotency_key="sync-42", idempotency="forever")
        assert forever.created
        assert (await client.start(fc_job, 5, idempotency_key="sync-42")).id == forever.id
        with pytest.raises(InvalidValue, match="idempotency must be 'forever' or 'active'"):
            await client.start(fc_job, idempotency_key="x", idempotency="sometimes")
        with pytest.raises(InvalidValue, match="idempotency= needs an idempotency_key"):
            await client.start(fc_job, idempotency="active")
    with pytest.raises(durable.ConfigurationError, match="idempotency must be"):

        @durable.task(name="fc_bad_scope", idempotency="never")
        async def fc_bad_scope() -> None: ...


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_an_active_key_reused_exactly_as_the_first_finishes(dsn: str, outcome: str) -> None:
    async with durable.connect(dsn) as client:
        first = await client.start(fc_active, 1, idempotency_key="race")
        finisher = await asyncpg.connect(dsn)
        got: list[durable.Handle] = []
        try:
            tx = finisher.transaction()
            await tx.start()
            await finisher.execute(
                "update durable.tasks set status = 'completed', finished_at = now() where id = $1",
                first.id,
            )

            async def start_again() -> None:
                async with durable.connect(dsn) as other:
                    got.append(
                        await other.start(fc_active, 2, idempotency_key="race", idempotency="active")
                    )

            async with anyio.create_task_group() as tg:
                tg.start_soon(start_again)
                await blocked(dsn, 1, "%insert into durable.tasks%")  # behind the finish
                await (tx.commit() if outcome == "commit" else tx.rollback())
        finally:
            await finisher.close()
        (second,) = got
        if outcome == "commit":  # finished: the key is free, a new task
            assert second.created and second.id != first.id
        else:  # still queued: the same task
            assert (second.id, second.created) == (first.id, False)
        unfinished = await fetchval(
            dsn,
            "select count(*) from durable.tasks where active_key = 'race' "
            "and status in ('queued', 'running', 'waiting')",
        )
        assert unfinished == 1


# -- durable queues pause / resume ------------------------------------------------------------


async def claim(dsn: str, queue: str, names: list[str]) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select id from durable.claim($1, $2, 10, 30, $3)", queue, names, uuid.uuid4()
        )
        return [r["id"] for r in rows]
    finally:
        await conn.close()


async def test_a_paused_queue_claims_nothing_until_resumed(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handle = await client.start(fc_job, 1)
        ops = Admin(client.store)
        await ops.pause_queue("fc_q")
        assert await claim(dsn, "fc_q", ["fc_job"]) == []
        metrics = Metrics()
        await metrics.refresh_depth(client.store)
        assert 'durable_queue_paused{queue="fc_q"} 1.0' in metrics.render().decode()
        await ops.resume_queue("fc_q")
        assert await claim(dsn, "fc_q", ["fc_job"]) == [handle.id]


@pytest.mark.parametrize("limit", ["concurrency", "keyed"])
async def test_a_pause_issued_while_a_claim_waits_for_its_lock(dsn: str, limit: str) -> None:
    """The claim read the queue's row (not paused) and then waited for the queue's lock;
    the pause committed meanwhile. Once it has the lock, it claims nothing, and the pause,
    which waits for the claims in flight, returns after it."""
    if limit == "concurrency":
        await fetchval(dsn, "insert into durable.queues (name, concurrency) values ('fc_q', 5)")
        lock_key = "durable.queue:fc_q"
        await fetchval(dsn, "insert into durable.tasks (queue, name) values ('fc_q', 'fc_job')")
    else:
        lock_key = "durable.keys"
        await fetchval(
            dsn,
            "insert into durable.tasks (queue, name, concurrency_key) values ('fc_q', 'fc_job', 'c')",
        )
    holder = await asyncpg.connect(dsn)
    claimed: list[list[int]] = []
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("select pg_advisory_xact_lock(hashtextextended($1, 0))", lock_key)

        async def claimer() -> None:
            claimed.append(await claim(dsn, "fc_q", ["fc_job"]))

        async def pause() -> None:
            cli = await anyio.to_thread.run_sync(
                lambda: durable_cli("queues", "pause", "fc_q", dsn=dsn)
            )
            assert cli.returncode == 0, cli.stderr
            assert "paused" in cli.stdout

        async with anyio.create_task_group() as tg:
            tg.start_soon(claimer)
            await blocked(dsn, 1, "%durable.claim%")
            tg.start_soon(pause)
            # The flag has committed; the pause waits for the claim in flight.
            await blocked(dsn, 1, "%durable.pause:%")
            await tx.commit()
    finally:
        await holder.close()
    assert claimed == [[]]
    assert await fetchval(dsn, "select count(*) from durable.tasks where status = 'queued'") == 1


async def test_daemons_stop_claiming_a_paused_queue_and_resume_at_once(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        ops = Admin(client.store)
        await ops.pause_queue("fc_q")
        # A poll interval far past the test's timeout: only the resume's notification can
        # wake the paused queue's loop in time.
        async with running_daemon(dsn, queues="fc_q=2,fc_other=2", poll_interval="600"):
            paused = await client.start(fc_job, 7)
            other = await client.start(fc_other)
            assert await other.result(timeout=30) == "other"  # the daemon is serving
            assert (await client.get(paused.id)).status == "queued"
            listing = durable_cli("queues", "--json", dsn=dsn)
            rows = {r["queue"]: r for r in map(json.loads, listing.stdout.splitlines())}
            assert rows["fc_q"]["paused"] is True and rows["fc_q"].get("queued") == 1
            await ops.resume_queue("fc_q")
            assert await paused.result(timeout=30) == 7
        await wait_status(dsn, paused.id, "completed")
    assert durable_cli("queues", "resume", dsn=dsn).returncode == 2  # no NAME
    assert durable_cli("queues", "pause", "", dsn=dsn).returncode == 2

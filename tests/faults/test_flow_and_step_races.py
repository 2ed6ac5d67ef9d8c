"""Flow control and step policies under nasty interleavings: claims that wait on a limit's
lock, a pause that lands while tasks are held ahead of a slot, a transaction's commit that
outlives its step timeout, and fleet-wide limits under retries and a limit lowered while
tasks run.

Task names here start with ``fsr_``; every queue too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

import durable
from durable import worker as worker_module
from durable.retry import RetryPolicy
from durable.store import Store
from tests.support.helpers import execute, fetchval, running_daemon, wait_for, wait_status

# -- rate windows ---------------------------------------------------------------------------

RATE_STARTS: dict[str, float] = {}
"""When each rate-limited task really started (this process's monotonic clock)."""


@durable.task(name="fsr_rate", queue="fsr_rate", max_attempts=1)
async def fsr_rate(tag: str) -> str:
    RATE_STARTS[tag] = time.monotonic()
    return tag


KEY_STARTS: dict[str, float] = {}


@durable.task(
    name="fsr_key_rate", queue="fsr_key", max_attempts=1,
    concurrency_key=lambda key, tag: key, key_rate=(1, 3),
)
async def fsr_key_rate(key: str, tag: str) -> str:
    KEY_STARTS[tag] = time.monotonic()
    return tag


async def _claim_blocked_on_advisory(probe: asyncpg.Connection) -> Any:
    """The transaction start of the daemon's claim once it waits on an advisory lock."""

    async def check() -> Any:
        return await probe.fetchval(
            "select xact_start from pg_stat_activity"
            " where wait_event_type = 'Lock' and wait_event = 'advisory'"
            "   and pid <> pg_backend_pid()"
        )

    return await wait_for(check, timeout=20)


async def _db_clock_past(probe: asyncpg.Connection, since: Any, seconds: float) -> None:
    """Wait until the database's clock reads ``seconds`` past ``since`` (a state of the
    server's clock, which is what rate windows are measured on)."""

    async def check() -> bool:
        return bool(await probe.fetchval(
            "select clock_timestamp() >= $1::timestamptz + make_interval(secs => $2)",
            since, seconds,
        ))  # fmt: skip

    await wait_for(check, timeout=20, interval=0.01)


@pytest.mark.timeout(60)
async def test_queue_rate_holds_when_a_claim_waited_on_the_queue_lock(dsn: str) -> None:
    period = 3.0
    RATE_STARTS.clear()
    store = await Store.open(dsn)
    try:
        await store.set_queue_limits("fsr_rate", None, 1, period)
    finally:
        await store.close()
    probe = await asyncpg.connect(dsn)
    locker = await asyncpg.connect(dsn)
    try:
        async with durable.connect(dsn) as client, running_daemon(dsn, queues="fsr_rate=4") as d:
            await d.workers["fsr_rate"].claimed_once.wait()
            # Another claimer of the queue holds its lock (a slow claim, a busy fleet).
            tx = locker.transaction()
            await tx.start()
            await locker.execute(
                "select pg_advisory_xact_lock(hashtextextended('durable.queue:' || $1, 0))",
                "fsr_rate",
            )
            first = await client.start(fsr_rate, "first")
            began = await _claim_blocked_on_advisory(probe)
            # The daemon's claim has waited most of a window when the lock comes free.
            await _db_clock_past(probe, began, period - 0.4)
            await tx.commit()
            assert await first.result(timeout=20) == "first"
            second = await client.start(fsr_rate, "second")
            assert await second.result(timeout=20) == "second"
        gap = RATE_STARTS["second"] - RATE_STARTS["first"]
        # "at most 1 start in any 3-second window"
        assert gap >= period * 0.9, f"two starts {gap:.2f}s apart under a 1/{period:g}s rate"
    finally:
        await probe.close()
        await locker.close()


@pytest.mark.timeout(60)
async def test_key_rate_holds_when_a_claim_waited_on_the_keys_lock(dsn: str) -> None:
    period = 3.0
    KEY_STARTS.clear()
    probe = await asyncpg.connect(dsn)
    locker = await asyncpg.connect(dsn)
    try:
        async with durable.connect(dsn) as client, running_daemon(dsn, queues="fsr_key=4") as d:
            await d.workers["fsr_key"].claimed_once.wait()
            tx = locker.transaction()
            await tx.start()
            await locker.execute("select pg_advisory_xact_lock(hashtextextended('durable.keys', 0))")
            first = await client.start(fsr_key_rate, "acme", "first")
            began = await _claim_blocked_on_advisory(probe)
            await _db_clock_past(probe, began, period - 0.4)
            await tx.commit()
            assert await first.result(timeout=20) == "first"
            second = await client.start(fsr_key_rate, "acme", "second")
            assert await second.result(timeout=20) == "second"
        gap = KEY_STARTS["second"] - KEY_STARTS["first"]
        assert gap >= period * 0.9, f"two starts of key acme {gap:.2f}s apart under 1/{period:g}s"
    finally:
        await probe.close()
        await locker.close()


# -- pause vs tasks held ahead of a slot ----------------------------------------------------

PA_GATE = asyncio.Event()
PA_BLOCKING = asyncio.Event()
PA_RAN: list[str] = []


@durable.task(name="fsr_pa_block", queue="fsr_pa", priority=10)
async def fsr_pa_block() -> str:
    PA_BLOCKING.set()
    await PA_GATE.wait()
    return "unblocked"


@durable.task(name="fsr_pa_follow", queue="fsr_pa")
async def fsr_pa_follow(key: str) -> str:
    PA_RAN.append(key)
    return key


@pytest.mark.timeout(60)
async def test_a_paused_queue_starts_no_task_held_ahead_of_a_slot(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Held tasks go back after HOLD_LIMIT; long enough here that the slot frees first.
    monkeypatch.setattr(worker_module, "HOLD_LIMIT", 60.0)
    PA_GATE.clear()
    PA_BLOCKING.clear()
    PA_RAN.clear()
    store = await Store.open(dsn)
    try:
        async with durable.connect(dsn) as client:
            blocker = await client.start(fsr_pa_block)
            follow = await client.start(fsr_pa_follow, "after-pause")
            async with running_daemon(dsn, queues="fsr_pa=1", claim_ahead="1") as daemon:
                w = daemon.workers["fsr_pa"]
                await PA_BLOCKING.wait()
                await wait_for(lambda: _true(len(w.waiting) == 1))
                assert (await client.get(follow.id)).status == "running"  # held ahead
                await store.set_queue_paused("fsr_pa", True)
                # The daemon hears of the pause and hands back what it holds unstarted.
                await wait_status(dsn, follow.id, "queued")
                assert not w.waiting
                PA_GATE.set()
                assert await blocker.result(timeout=20) == "unblocked"
                await wait_for(lambda: _true(w._releases >= 1 and w.in_flight == 0))
                # "running tasks finish, and tasks started meanwhile stay queued"
                assert PA_RAN == [] and (await client.get(follow.id)).status == "queued"
                await store.set_queue_paused("fsr_pa", False)
                assert await follow.result(timeout=20) == "after-pause"
            # Handed back without spending an attempt.
            assert (await client.get(follow.id)).attempt == 1
    finally:
        await store.close()


# -- a fleet-wide limit under retries, two daemons and a limit lowered mid-run -------------

LIVE = {"now": 0, "max": 0, "max_after_lower": 0}
LIM_GATE = asyncio.Event()
LOWERED = asyncio.Event()


@durable.task(
    name="fsr_lim", queue="fsr_lim", max_attempts=3, retry=RetryPolicy(base=0, jitter=0)
)
async def fsr_lim(i: int) -> int:
    LIVE["now"] += 1
    LIVE["max"] = max(LIVE["max"], LIVE["now"])
    if LOWERED.is_set():
        LIVE["max_after_lower"] = max(LIVE["max_after_lower"], LIVE["now"])
    try:
        await LIM_GATE.wait()
        if i % 3 == 0 and durable.current().attempt == 1:
            raise RuntimeError("fails once, retried at once: frees a slot and wants one")
        return i
    finally:
        LIVE["now"] -= 1


@pytest.mark.timeout(120)
async def test_queue_limit_holds_across_daemons_retries_and_a_lowered_limit(dsn: str) -> None:
    LIVE.update(now=0, max=0, max_after_lower=0)
    LIM_GATE.clear()
    LOWERED.clear()
    store = await Store.open(dsn)
    try:
        await store.set_queue_limits("fsr_lim", 3, None, None)
        async with durable.connect(dsn) as client:
            handles = await client.start_many(fsr_lim, [[i] for i in range(60)])
            async with running_daemon(dsn, queues="fsr_lim=8", claim_ahead="4"), \
                    running_daemon(dsn, queues="fsr_lim=8", claim_ahead="4"):
                # Both daemons at the limit, every slot but three empty.
                await wait_for(lambda: _true(LIVE["now"] == 3))
                assert await fetchval(
                    dsn, "select count(*) from durable.tasks where status = 'running'"
                ) <= 3 + 0  # tasks held ahead count as running: none beyond the limit
                LIM_GATE.set()
                await wait_for(lambda: fetchval(
                    dsn, "select count(*) >= 20 from durable.tasks where status = 'completed'"
                ))  # fmt: skip
                # Lowered while tasks run: once at most one runs, never more than one again.
                await store.set_queue_limits("fsr_lim", 1, None, None)
                await wait_for(lambda: fetchval(
                    dsn, "select count(*) <= 1 from durable.tasks"
                    " where queue = 'fsr_lim' and status = 'running'"
                ))  # fmt: skip
                LOWERED.set()
                results = [await h.result(timeout=60) for h in handles]
        assert sorted(results) == list(range(60))
        assert LIVE["max"] <= 3, LIVE
        assert LIVE["max_after_lower"] <= 1, LIVE
    finally:
        await store.close()


# -- a transaction whose commit outlives its step timeout -----------------------------------

SLOW_COMMIT_SQL = """
create table fsr_ledger (id bigserial primary key, note text not null);
create function fsr_slow_commit() returns trigger language plpgsql as $$
begin
    -- A commit that takes long and cannot be called back once under way (as one waiting
    -- for a synchronous standby): the cancel sent at the timeout is swallowed, and the
    -- transaction commits.
    begin
        perform pg_advisory_xact_lock(4242);
    exception when query_canceled then
        null;
    end;
    return null;
end $$;
create constraint trigger fsr_slow after insert on fsr_ledger
    deferrable initially deferred for each row execute function fsr_slow_commit();
"""


async def _pay(conn: Any, note: str) -> str:
    await conn.execute("insert into fsr_ledger (note) values ($1)", note)
    return note


@durable.workflow(name="fsr_txn_timeout", queue="fsr_txn", max_attempts=1)
async def fsr_txn_timeout(ctx: durable.Context, note: str) -> str:
    paid = await ctx.transaction(
        "pay", _pay, note, timeout=1.0, retry=RetryPolicy(max_attempts=3, base=0, jitter=0)
    )
    return f"paid {paid}"


@pytest.mark.timeout(90)
async def test_a_transaction_whose_commit_outlasts_its_timeout_is_written_once(dsn: str) -> None:
    """A step's timeout bounds the transaction's own code, not its commit: a commit still
    under way when the timeout passes (held here on a lock, as one waiting for a
    synchronous standby) goes through, and the try is done, once. Cut short, its outcome
    would be unknown: the try was recorded failed at a position the commit had filled,
    and the attempt was abandoned as if its lease were lost."""
    await execute(dsn, SLOW_COMMIT_SQL)
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute("select pg_advisory_lock(4242)")
        async with durable.connect(dsn) as client, running_daemon(dsn, queues="fsr_txn=2"):
            handle = await client.start(fsr_txn_timeout, "order-1")

            async def commit_held_past_the_timeout() -> bool:
                # The commit waits on the lock, for longer than the step's timeout of 1 s.
                return bool(await holder.fetchval(
                    "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                    " and query = 'COMMIT;' and now() - query_start > interval '1.5 s'"
                ))  # fmt: skip

            await wait_for(commit_held_past_the_timeout, timeout=30)
            await holder.execute("select pg_advisory_unlock(4242)")
            assert await handle.result(timeout=30) == "paid order-1"
        ledger = await fetchval(dsn, "select count(*) from fsr_ledger")
        events = await fetchval(
            dsn,
            "select string_agg(seq || ':' || kind || ':' || status, ',' order by seq)"
            " from durable.events where task_id = $1",
            handle.id,
        )
        assert (ledger, events) == (1, "0:transaction:completed")
    finally:
        await holder.close()


async def _slow_then_fast(conn: Any, note: str) -> str:
    await conn.execute("insert into fsr_ledger (note) values ($1)", note)
    SLOW_TRIES.append(note)
    if len(SLOW_TRIES) == 1:
        await conn.execute("select pg_sleep(30)")  # the first try outlives its timeout
    return note


SLOW_TRIES: list[str] = []


@durable.workflow(name="fsr_txn_slow_code", queue="fsr_txn", max_attempts=1)
async def fsr_txn_slow_code(ctx: durable.Context, note: str) -> str:
    paid = await ctx.transaction(
        "pay", _slow_then_fast, note, timeout=0.5, retry=RetryPolicy(max_attempts=3, base=0, jitter=0)
    )
    return f"paid {paid}"


@pytest.mark.timeout(90)
async def test_a_transaction_whose_code_outlasts_its_timeout_rolls_back_and_is_tried_again(
    dsn: str,
) -> None:
    await execute(dsn, "create table fsr_ledger (id bigserial primary key, note text not null)")
    SLOW_TRIES.clear()
    async with durable.connect(dsn) as client, running_daemon(dsn, queues="fsr_txn=2"):
        handle = await client.start(fsr_txn_slow_code, "order-2")
        assert await handle.result(timeout=30) == "paid order-2"
    events = await fetchval(
        dsn,
        "select string_agg(seq || ':' || kind || ':' || status, ',' order by seq)"
        " from durable.events where task_id = $1",
        handle.id,
    )
    # Two tries ran the code; the first rolled back at its timeout, its write with it.
    assert len(SLOW_TRIES) == 2
    assert await fetchval(dsn, "select count(*) from fsr_ledger") == 1
    assert events == "0:transaction:failed,1:transaction:completed"


async def _true(value: bool) -> bool:
    await asyncio.sleep(0)
    return value

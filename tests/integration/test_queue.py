"""The task queue against a real Postgres: results, slots, retries, order, NOTIFY, reconnect.

Every task name here starts with ``q_`` (the registry is process-wide). Task bodies talk to
the tests through module state (counters, events) because the daemon runs in this event
loop; nothing waits on a timer to synchronise.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import anyio
import anyio.lowlevel
import asyncpg
import pytest

import durable
from durable.retry import RetryPolicy
from tests.support.helpers import (
    execute,
    fetchval,
    run_burst,
    running_daemon,
    wait_for,
    wait_status,
)

CALLS: Counter[str] = Counter()
"""How many times each test's task body ran, by a key the test passes."""

FAST = RetryPolicy(base=0.01, factor=2, jitter=0)


class QBoomError(Exception):
    """A failure raised on purpose by a task body."""


@durable.task
async def q_echo(value: object) -> object:
    return value


@durable.task
async def q_hello(name: str) -> str:
    return f"hello {name}"


async def test_hello_world_completes_with_its_result(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn) as daemon:
        handle = await client.start(q_hello, "world")
        assert handle.created
        assert await handle.result(timeout=10) == "hello world"
        info = await client.get(handle.id)
    assert info.status == "completed"
    assert info.result == "hello world"
    assert info.args == ["world"] and info.kwargs == {}
    assert info.attempt == 1 and info.error is None
    assert info.worker_id == daemon.id
    assert info.started_at is not None and info.finished_at is not None
    assert info.created_at <= info.started_at <= info.finished_at
    assert info.lease_until is None  # a finished task holds no lease


# -- slots -------------------------------------------------------------------------------


@dataclass
class Gauge:
    """What the bodies of q_slot see: how many of them run at once."""

    limit: int
    now: int = 0
    peak: int = 0
    full: asyncio.Event = field(default_factory=asyncio.Event)


GAUGE = Gauge(limit=0)


@durable.task
async def q_slot(i: int) -> int:
    g = GAUGE
    g.now += 1
    g.peak = max(g.peak, g.now)
    if g.now >= g.limit:
        g.full.set()
    try:
        # Hold the first wave until every slot is taken, so the bound is really tested;
        # the limit only keeps a broken daemon from hanging the test.
        with anyio.move_on_after(20):
            await g.full.wait()
        await anyio.lowlevel.checkpoint()  # let the others interleave
    finally:
        g.now -= 1
    return i


@pytest.mark.timeout(120)
async def test_thousand_tasks_never_exceed_the_slots(dsn: str) -> None:
    global GAUGE
    GAUGE = Gauge(limit=100)
    async with durable.connect(dsn) as client:
        handles = await client.start_many(q_slot, [[i] for i in range(1000)])
        assert len(handles) == 1000
        async with running_daemon(dsn, queues="default=100"):

            async def all_done() -> bool:
                n = await fetchval(
                    dsn, "select count(*) from durable.tasks where status = 'completed'"
                )
                return bool(n == 1000)

            await wait_for(all_done, timeout=90)
    assert GAUGE.full.is_set(), f"never 100 in flight (peak {GAUGE.peak})"
    assert GAUGE.peak == 100
    assert GAUGE.now == 0
    wrong = await fetchval(
        dsn,
        "select count(*) from durable.tasks"
        " where status <> 'completed' or result <> args -> 0 or attempt <> 1",
    )
    assert wrong == 0


# -- retries, failures, timeouts -----------------------------------------------------------


@durable.task(max_attempts=4, retry=FAST)
async def q_flaky(key: str, failures: int) -> str:
    CALLS[key] += 1
    if CALLS[key] <= failures:
        raise ConnectionError(f"flake {CALLS[key]}")
    return f"ok after {CALLS[key]}"


async def test_fails_k_times_then_completes_on_attempt_k_plus_1(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        two = await client.start(q_flaky, "flaky-2", 2)
        none = await client.start(q_flaky, "flaky-0", 0)
        assert await two.result(timeout=20) == "ok after 3"
        assert await none.result(timeout=20) == "ok after 1"
        info = await client.get(two.id)
        assert (await client.get(none.id)).attempt == 1
    assert CALLS["flaky-2"] == 3
    assert info.status == "completed" and info.attempt == 3 and info.max_attempts == 4
    assert info.error is None  # the earlier attempts' error is gone once it succeeded


@durable.task(max_attempts=2, retry=FAST)
async def q_always_fails(key: str) -> None:
    CALLS[key] += 1
    raise QBoomError(f"boom {key}")


async def test_each_retry_of_a_failed_task_grants_its_attempts_once_more(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(q_always_fails, "budget")
        for restarts in range(3):
            await wait_status(dsn, handle.id, "failed")
            info = await client.get(handle.id)
            # Two attempts per start: 2, then 2 more, then 2 more (not 2, 4, 8).
            assert CALLS["budget"] == 2 * (restarts + 1)
            assert (info.status, info.attempt) == ("failed", 2 * (restarts + 1))
            assert info.max_attempts == 2 * (restarts + 1)
            if restarts < 2:
                await client.retry(handle.id)


async def test_always_failing_task_records_the_error(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(q_always_fails, "always")
        with pytest.raises(durable.TaskFailed) as caught:
            await handle.result(timeout=20)
        info = await client.get(handle.id)
    assert CALLS["always"] == 2
    assert info.status == "failed" and info.attempt == 2
    assert info.finished_at is not None and info.lease_until is None
    assert info.error is not None
    assert info.error["type"] == f"{__name__}.QBoomError"
    assert info.error["message"] == "boom always"
    trace = info.error["traceback"]
    assert "Traceback (most recent call last)" in trace
    assert "in q_always_fails" in trace and "QBoomError: boom always" in trace
    exc = caught.value
    assert exc.task_id == handle.id
    assert (exc.type, exc.message, exc.traceback) == (
        info.error["type"],
        "boom always",
        trace,
    )


@durable.task(max_attempts=5, retry=FAST)
async def q_non_retryable(key: str) -> None:
    CALLS[key] += 1
    raise durable.NonRetryable("the card was declined")


async def test_non_retryable_fails_after_one_attempt(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(q_non_retryable, "nonretryable")
        with pytest.raises(durable.TaskFailed) as caught:
            await handle.result(timeout=20)
        info = await client.get(handle.id)
    assert CALLS["nonretryable"] == 1
    assert info.status == "failed" and info.attempt == 1 and info.max_attempts == 5
    assert caught.value.type == "durable.errors.NonRetryable"
    assert caught.value.message == "the card was declined"


@durable.task(timeout=0.2, max_attempts=2, retry=FAST)
async def q_hangs(key: str) -> None:
    CALLS[key] += 1
    await asyncio.Event().wait()  # nothing ever sets it: only the timeout ends this


async def test_timeout_fails_the_attempt(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn) as daemon:
        handle = await client.start(q_hangs, "hangs")
        with pytest.raises(durable.TaskFailed) as caught:
            await handle.result(timeout=20)
        info = await client.get(handle.id)
        assert not daemon.attempts  # the cancelled coroutines are gone
    assert CALLS["hangs"] == 2  # each attempt timed out and counted
    assert info.status == "failed" and info.attempt == 2
    assert caught.value.type == "builtins.TimeoutError"
    assert "0.2" in caught.value.message and "timeout" in caught.value.message
    assert info.started_at is not None and info.finished_at is not None
    assert info.finished_at - info.started_at >= timedelta(seconds=0.4)


BACKOFF: list[asyncpg.Record] = []


@durable.task(max_attempts=4, retry=RetryPolicy(base=0.1, factor=2, jitter=0))
async def q_backoff(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "select attempt, run_at, clock_timestamp() as failed_at from durable.tasks"
            " where name = 'q_backoff' and status = 'running'"
        )
    finally:
        await conn.close()
    assert row is not None
    BACKOFF.append(row)
    raise QBoomError("again")


async def test_backoff_delays_grow_in_the_database(dsn: str) -> None:
    BACKOFF.clear()
    async with durable.connect(dsn) as client, running_daemon(dsn, poll_interval="60"):
        handle = await client.start(q_backoff, dsn)
        with pytest.raises(durable.TaskFailed):
            await handle.result(timeout=20)
    assert [r["attempt"] for r in BACKOFF] == [1, 2, 3, 4]
    # The delay each failure chose: the next attempt's run_at minus when the body failed.
    delays = [
        (nxt["run_at"] - cur["failed_at"]).total_seconds()
        for cur, nxt in itertools.pairwise(BACKOFF)
    ]
    for observed, expected in zip(delays, (0.1, 0.2, 0.4), strict=True):
        assert expected <= observed < expected + 0.1, delays
    assert delays == sorted(delays)
    # And the run_at values themselves spread further apart each time.
    run_ats: list[datetime] = [r["run_at"] for r in BACKOFF]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(run_ats)]
    assert gaps[0] < gaps[1] < gaps[2], gaps


@durable.task(max_attempts=3)
async def q_retry_request(key: str) -> int:
    CALLS[key] += 1
    if CALLS[key] == 1:
        raise durable.Retry(0.3)
    return CALLS[key]


async def test_retry_exception_requeues_after_its_delay(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, poll_interval="60"):
        handle = await client.start(q_retry_request, "retry-request")
        assert await handle.result(timeout=20) == 2
        info = await client.get(handle.id)
    assert info.attempt == 2 and info.status == "completed"
    assert info.started_at is not None
    # run_at was pushed back by the requested delay from the first attempt.
    assert info.run_at - info.started_at >= timedelta(seconds=0.3)


# -- order and scheduling --------------------------------------------------------------------

ORDER: list[str] = []  # labels, in the order q_order ran them


@durable.task
async def q_order(label: str) -> str:
    ORDER.append(label)
    return label


async def test_priority_first_then_fifo_within_a_priority(dsn: str) -> None:
    ORDER.clear()
    plan = [
        ("a0", 0), ("b5", 5), ("c0", 0), ("d10", 10), ("e5", 5), ("f-1", -1),
        ("g0", 0), ("h10", 10), ("i-1", -1), ("j5", 5),
    ]  # fmt: skip
    async with durable.connect(dsn) as client:
        for label, priority in plan:
            await client.start(q_order, label, priority=priority)
        later = await client.start(q_order, "scheduled", priority=100, delay=3600)
        await run_burst(dsn, queues="default=1")
        info = await client.get(later.id)
    indexed = list(enumerate(plan))
    expected = [label for _, (label, _) in sorted(indexed, key=lambda x: (-x[1][1], x[0]))]
    ran = list(ORDER)
    assert ran == expected
    assert ran[:3] == ["d10", "h10", "b5"]
    # The high-priority task scheduled for later did not jump the queue.
    assert info.status == "queued" and info.started_at is None


async def test_one_claim_takes_every_priority_level_down_to_the_lowest(dsn: str) -> None:
    """A claim that empties a level goes on to the next one down, to the lowest level
    that has queued tasks, and stops there."""
    import uuid

    from durable.store import Store

    plan = [("x", 0), ("y", 10), ("z", -5), ("w", 5), ("v", 5)]
    store = await Store.open(dsn)
    try:
        async with durable.connect(dsn) as client:
            for label, priority in plan:
                await client.start(q_order, label, priority=priority, queue="levels")
        claimed = await store.claim("levels", ["q_order"], 10, 30.0, uuid.uuid4())
        again = await store.claim("levels", ["q_order"], 10, 30.0, uuid.uuid4())
    finally:
        await store.close()
    assert [c.args for c in claimed] == ['["y"]', '["w"]', '["v"]', '["x"]', '["z"]']
    assert again == []


async def test_delayed_task_waits_for_run_at_then_starts_promptly(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, poll_interval="60"):
        now = await client.start(q_echo, "now")
        later = await client.start(q_echo, "later", delay=0.7)
        assert await now.result(timeout=10) == "now"
        assert (await client.get(later.id)).status == "queued"
        assert await later.result(timeout=10) == "later"
        info = await client.get(later.id)
    assert info.started_at is not None
    assert info.run_at - info.created_at >= timedelta(seconds=0.6)
    assert info.started_at >= info.run_at  # not early
    # Prompt: the loop sleeps until the due time, not until the next 60 s poll.
    assert info.started_at - info.run_at < timedelta(seconds=0.5)


# -- NOTIFY and the listener -------------------------------------------------------------------


async def started_after_created(client: durable.Client, task_id: int) -> float:
    info = await client.get(task_id)
    assert info.started_at is not None
    return (info.started_at - info.created_at).total_seconds()


async def test_notify_starts_work_without_polling(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, poll_interval="60") as daemon:
        worker = daemon.workers["default"]
        warm = await client.start(q_echo, 0)
        assert await warm.result(timeout=10) == 0
        for i in range(1, 4):
            before = worker.wakeups["notify"]
            handle = await client.start(q_echo, i)
            assert await handle.result(timeout=10) == i
            assert await started_after_created(client, handle.id) < 1.0
            assert worker.wakeups["notify"] > before


async def test_listener_reconnects_after_its_connection_is_terminated(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, poll_interval="60") as daemon:
        listener = daemon.listener
        assert listener is not None and listener.reconnects == 0
        old_pid = listener.backend_pid
        assert old_pid is not None
        assert await fetchval(dsn, "select pg_terminate_backend($1)", old_pid)

        async def reconnected() -> bool:
            return listener.reconnects == 1 and listener.connected

        await wait_for(reconnected, timeout=10)
        assert listener.backend_pid != old_pid
        assert (
            await fetchval(
                dsn,
                "select count(*) from pg_stat_activity"
                " where pid = $1 and application_name = 'durable-listener'",
                listener.backend_pid,
            )
            == 1
        )
        # New work is announced on the new connection (no poll within 60 s).
        handle = await client.start(q_echo, "after")
        assert await handle.result(timeout=10) == "after"
        assert await started_after_created(client, handle.id) < 1.0


async def test_catch_up_poll_after_a_reconnect_finds_unannounced_work(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, poll_interval="60") as daemon:
        listener = daemon.listener
        assert listener is not None
        hidden = await client.start("q_not_registered_anywhere", "hidden", allow_unknown=True)
        warm = await client.start(q_echo, "warm")
        assert await warm.result(timeout=10) == "warm"
        # Ready work that no notification announces: renaming a queued task changes
        # neither its status nor its run_at, so the trigger stays silent.
        await execute(dsn, "update durable.tasks set name = 'q_echo' where id = $1", hidden.id)
        assert (await client.get(hidden.id)).status == "queued"
        cut_at = await fetchval(
            dsn,
            "select clock_timestamp() from (select pg_terminate_backend($1)) as t",
            listener.backend_pid,
        )
        assert await client.result(hidden.id, timeout=10) == "hidden"
        info = await client.get(hidden.id)
        assert listener.reconnects == 1
    assert info.started_at is not None and info.started_at >= cut_at


# -- results that are not JSON ---------------------------------------------------------------


@durable.task(max_attempts=3)
async def q_returns_a_set(key: str) -> object:
    CALLS[key] += 1
    return {1, 2}


@durable.task(max_attempts=3)
async def q_returns_nan(key: str) -> object:
    CALLS[key] += 1
    return [math.nan]


async def test_non_json_result_fails_clearly_and_the_daemon_keeps_serving(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        bad_set = await client.start(q_returns_a_set, "set")
        bad_nan = await client.start(q_returns_nan, "nan")
        for handle, name in ((bad_set, "q_returns_a_set"), (bad_nan, "q_returns_nan")):
            with pytest.raises(durable.TaskFailed) as caught:
                await handle.result(timeout=10)
            assert caught.value.type == "durable.errors.PayloadError"
            assert f"the result of {name!r} must be JSON" in caught.value.message
            info = await client.get(handle.id)
            assert info.status == "failed" and info.attempt == 1  # retrying cannot help
        assert "NaN" in caught.value.message
        good = await client.start(q_echo, {"still": "serving"})
        assert await good.result(timeout=10) == {"still": "serving"}
    assert CALLS["set"] == 1 and CALLS["nan"] == 1


# -- burst mode --------------------------------------------------------------------------------


@durable.task(max_attempts=3)
async def q_retry_at_once(key: str) -> int:
    CALLS[key] += 1
    if CALLS[key] == 1:
        raise durable.Retry(0)
    return CALLS[key]


@pytest.mark.timeout(60)
async def test_burst_runs_due_retries_and_returns_once_the_work_is_done(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        # A 60 s poll: each burst must end because the work is done, not on a timer.
        for i in range(5):
            # Alone in its burst: the retry is written just as the last slot frees.
            alone = await client.start(q_retry_at_once, f"burst-alone-{i}")
            with anyio.fail_after(20):
                await run_burst(dsn, poll_interval="60")
            info = await client.get(alone.id)
            assert (info.status, info.attempt, info.result) == ("completed", 2, 2)
        handles = [await client.start(q_retry_at_once, f"burst-{i}") for i in range(5)]
        plain = await client.start_many(q_echo, [[i] for i in range(15)])
        with anyio.fail_after(20):
            await run_burst(dsn, queues="default=4", poll_interval="60")
        for h in handles:
            info = await client.get(h.id)
            assert (info.status, info.attempt, info.result) == ("completed", 2, 2)
        assert [(await client.get(h.id)).status for h in plain] == ["completed"] * 15

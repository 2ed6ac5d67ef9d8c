"""Suspension: durable sleeps and timers, slots given back, events, fan-out and fan-in."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

import durable
from durable.registry import Registry
from durable.testing import Env
from tests.support.helpers import fetchval, running_daemon, wait_status

# -- sleeping ----------------------------------------------------------------------------


@durable.workflow
async def wf_sleep_restart(ctx: durable.Context, seconds: float) -> str:
    await ctx.sleep(seconds)
    return (await ctx.now()).isoformat()


async def test_a_sleeping_workflow_survives_a_daemon_restart_and_wakes_on_time(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, poll_interval="10"):
            handle = await client.start(wf_sleep_restart, 1.5)
            await wait_status(dsn, handle.id, "waiting")
        # The daemon that ran it is gone; the timer lives in the database.
        info = await client.get(handle.id)
        assert info.status == "waiting" and info.wake_at is not None
        wake_at = info.wake_at
        assert datetime.now(wake_at.tzinfo) < wake_at
        # The poll interval is long: only the timer loop can wake it on time.
        async with running_daemon(dsn, poll_interval="10"):
            woke = datetime.fromisoformat(await handle.result(timeout=20))
        info = await client.get(handle.id)
    assert info.finished_at is not None
    assert wake_at <= woke <= info.finished_at
    assert info.finished_at - wake_at < timedelta(seconds=2)
    assert await sleep_events(dsn, handle.id) == [
        ("sleep", wake_at),
        ("memo", None),
    ]


async def sleep_events(dsn: str, task_id: int) -> list[tuple[str, datetime | None]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select kind, wake_at from durable.events where task_id = $1 order by seq", task_id
        )
    finally:
        await conn.close()
    return [(r["kind"], r["wake_at"]) for r in rows]


# -- slots ---------------------------------------------------------------------------------

SLOTS = "wf_slots"


@durable.workflow(queue=SLOTS)
async def wf_slot_sleeper(ctx: durable.Context) -> str:
    await ctx.sleep(3600)
    return "slept"


@durable.workflow(queue=SLOTS)
async def wf_slot_waiter(ctx: durable.Context) -> object:
    return await ctx.wait_for_event("go")


@durable.task(queue=SLOTS)
async def wf_slot_plain(x: int) -> int:
    return x * 2


async def test_sleeping_and_waiting_hold_no_slot(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=f"{SLOTS}=1"):
        sleeper = await client.start(wf_slot_sleeper)
        waiter = await client.start(wf_slot_waiter)
        await wait_status(dsn, sleeper.id, "waiting")
        await wait_status(dsn, waiter.id, "waiting")
        # One slot on the queue, two suspended workflows: plain work still runs.
        for i in range(3):
            assert await (await client.start(wf_slot_plain, i)).result(timeout=10) == 2 * i
        assert await client.send_event(waiter.id, "go", {"ok": True})
        assert await waiter.result(timeout=10) == {"ok": True}
        assert (await client.get(sleeper.id)).status == "waiting"
        assert sleeper.id in (await client.cancel(sleeper.id)).cancelled


ONE = "wf_onequeue"


@durable.task(queue=ONE)
async def wf_one_child(i: int) -> int:
    return i + 1


@durable.workflow(queue=ONE)
async def wf_one_inner(ctx: durable.Context, n: int) -> int:
    return int(await ctx.run(wf_one_child, n)) * 10


@durable.workflow(queue=ONE)
async def wf_one_parent(ctx: durable.Context) -> list[int]:
    first = await ctx.run(wf_one_child, 0)
    fan = await ctx.gather(*(ctx.run(wf_one_child, i) for i in range(1, 5)))
    inner = await ctx.run(wf_one_inner, 7)  # a child workflow with a child of its own
    return [first, *fan, inner]


async def test_a_parent_on_a_queue_of_one_does_not_deadlock_its_children(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=f"{ONE}=1"):
        handle = await client.start(wf_one_parent)
        assert await handle.result(timeout=20) == [1, 2, 3, 4, 5, 80]


# -- events ---------------------------------------------------------------------------------


@durable.workflow
async def wf_event_wait(ctx: durable.Context, name: str) -> object:
    return await ctx.wait_for_event(name)


async def test_an_event_sent_while_no_daemon_runs_is_delivered(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn):
            handle = await client.start(wf_event_wait, "approved")
            await wait_status(dsn, handle.id, "waiting")
        assert await client.send_event(handle.id, "approved", {"by": "alice"})
        assert (await client.get(handle.id)).status == "queued"  # woken, nobody to run it
        async with running_daemon(dsn):
            assert await handle.result(timeout=20) == {"by": "alice"}


async def test_an_event_sent_before_the_workflow_starts_is_delivered(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handle = await client.start(wf_event_wait, "early")
        assert await client.send_event(handle.id, "early", [1, 2])
        assert await client.send_event(handle.id, "other", "not this one")
        async with running_daemon(dsn):
            assert await handle.result(timeout=20) == [1, 2]
        # It never had to wait: the event was there when it asked.
        history = await client.history(handle.id)
        assert [(e.kind, e.name, e.status, e.result) for e in history] == [
            ("event", "early", "completed", [1, 2])
        ]


ENTERED: dict[str, asyncio.Event] = {}
GATE: dict[str, asyncio.Event] = {}


async def gate(k: str) -> str:
    ENTERED[k].set()
    await GATE[k].wait()
    return k


@durable.workflow
async def wf_event_after_step(ctx: durable.Context, k: str) -> object:
    await ctx.step("busy", gate, k)
    return await ctx.wait_for_event("done")


async def test_an_event_sent_while_running_before_the_wait_is_delivered(dsn: str) -> None:
    k = "event-before-wait"
    ENTERED[k], GATE[k] = asyncio.Event(), asyncio.Event()
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(wf_event_after_step, k)
        await asyncio.wait_for(ENTERED[k].wait(), 20)
        assert (await client.get(handle.id)).status == "running"
        assert await client.send_event(handle.id, "done", 42)
        GATE[k].set()
        assert await handle.result(timeout=20) == 42


@durable.workflow
async def wf_event_timeout(ctx: durable.Context, seconds: float) -> str:
    try:
        await ctx.wait_for_event("never", timeout=seconds)
    except durable.EventTimeout as exc:
        assert isinstance(exc, TimeoutError)
        return "timed out"
    return "got an event"


async def test_a_timed_out_wait_raises_event_timeout(durable_dsn: str) -> None:
    async with Env(durable_dsn, registry=only(wf_event_timeout)) as env:
        handle = await env.start(wf_event_timeout, 6 * 3600)
        await env.run_until_idle()
        assert (await handle.get()).status == "waiting"
        await env.advance(hours=5, minutes=59)
        assert (await handle.get()).status == "waiting"
        await env.advance(minutes=1)  # the timeout, on the moved clock
        assert await env.result(handle) == "timed out"
        info = await handle.get()
        history = await env.client.history(handle.id)
        assert [(e.kind, e.name, e.status) for e in history] == [("event", "never", "failed")]
        assert history[0].wake_at is not None and info.finished_at is not None
        assert info.finished_at >= history[0].wake_at
        # An event sent after it finished is refused.
        assert not await env.send_event(handle, "never", 1)


async def test_send_event_from_sql_delivers(durable_dsn: str) -> None:
    async with Env(durable_dsn, registry=only(wf_event_wait)) as env:
        handle = await env.start(wf_event_wait, "from-sql")
        await env.run_until_idle()
        assert (await handle.get()).status == "waiting"
        sent = await fetchval(
            env.dsn, """select durable.send_event($1, 'from-sql', '{"a":1}')""", handle.id
        )
        assert sent is True
        await env.run_until_idle()
        assert await env.result(handle) == {"a": 1}


def only(*definitions: durable.Definition[Any, Any]) -> Registry:
    reg = Registry()
    for d in definitions:
        reg.add(d)
    return reg


# -- fan-out --------------------------------------------------------------------------------

FAN = "wf_fan"
PARENT_RUNS: Counter[str] = Counter()


@durable.task(queue=FAN)
async def wf_fan_child(i: int) -> int:
    return i * i


@durable.workflow(queue=FAN)
async def wf_fan_parent(ctx: durable.Context, n: int, k: str) -> int:
    PARENT_RUNS[k] += 1
    results = await ctx.gather(*(ctx.run(wf_fan_child, i) for i in range(n)))
    assert results == [i * i for i in range(n)]
    return sum(results)


async def test_a_fan_out_of_1000_children_resumes_the_parent_a_few_times(dsn: str) -> None:
    n = 1000
    # Replayed from its log at each resume (no workflow kept in memory): the function
    # runs once per resume, which is what this counts.
    daemon = running_daemon(dsn, queues=f"{FAN}=64", workflow_cache=0)
    async with durable.connect(dsn) as client, daemon:
        handle = await client.start(wf_fan_parent, n, "fan1000")
        assert await handle.result(timeout=60) == sum(i * i for i in range(n))
    assert 2 <= PARENT_RUNS["fan1000"] <= 5
    done = await fetchval(
        dsn,
        "select count(*) from durable.tasks where parent_id = $1 and status = 'completed'",
        handle.id,
    )
    assert done == n
    events = await fetchval(
        dsn, "select count(*) from durable.events where task_id = $1 and kind = 'child'", handle.id
    )
    assert events == n


# -- the race between a parent suspending and its child finishing -----------------------

RACE = "wf_race"


@durable.task(queue=RACE)
async def wf_race_child(i: int) -> int:
    return i


@durable.workflow(queue=RACE)
async def wf_race_parent(ctx: durable.Context, n: int) -> int:
    total = 0
    for i in range(n):
        # The child is claimed and finishes while the parent is still suspending.
        total += int(await ctx.run(wf_race_child, i))
    return total


async def test_a_child_finishing_while_its_parent_suspends_always_wakes_it(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=f"{RACE}=32"):
        handles = [await client.start(wf_race_parent, 6) for _ in range(40)]
        for h in handles:
            assert await h.result(timeout=30) == 15


ODD_WAITS: dict[str, Any] = {
    "nan": float("nan"), "inf": float("inf"), "huge": 1e13, "text": "5", "bool": True, "-5": -5,
}


@durable.workflow(queue="default")
async def wf_odd_wait(ctx: durable.Context, kind: str, which: str) -> str:
    value = ODD_WAITS[which]  # NaN and infinity cannot travel as JSON arguments
    try:
        if kind == "sleep":
            await ctx.sleep(value)
        else:
            await ctx.wait_for_event("never", timeout=value)
    except ValueError as exc:
        return str(exc)
    return "waited"


@pytest.mark.parametrize(
    ("kind", "which"),
    [("sleep", "nan"), ("sleep", "inf"), ("sleep", "huge"), ("sleep", "text"),
     ("event", "nan"), ("event", "inf"), ("event", "huge"), ("event", "bool")],
)
async def test_a_wait_of_no_sensible_length_is_refused_in_one_line(
    durable_dsn: str, kind: str, which: str
) -> None:
    """NaN, infinity, ten thousand years or a string: a ValueError naming the argument, in
    the workflow, before anything is recorded (it raised OverflowError, or slept for no
    time)."""
    async with Env(durable_dsn, registry=only(wf_odd_wait)) as env:
        handle = await env.start(wf_odd_wait, kind, which)
        await env.run_until_idle()
        message = await env.result(handle)
        assert ("timeout" if kind == "event" else "seconds") in message
        assert "up to 10 years" in message and "\n" not in message
        assert await env.client.history(handle.id) == []


async def test_a_negative_wait_is_no_wait(durable_dsn: str) -> None:
    async with Env(durable_dsn, registry=only(wf_odd_wait)) as env:
        handle = await env.start(wf_odd_wait, "sleep", "-5")
        await env.run_until_idle()
        assert await env.result(handle) == "waited"

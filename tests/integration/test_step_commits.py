"""When a workflow's checkpoints commit: each before the next durable call does anything,
the last one with the workflow's outcome (in the same transaction), and, when the
workflow fails, suspends or is stopped after a step, before that is recorded."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import asyncpg

import durable
from tests.helpers import fetchval, run_burst, running_daemon, wait_for, wait_status

RUNS: Counter[str] = Counter()
DSN: dict[str, str] = {}
HOLD = {"on": True}
HELD = asyncio.Event()


async def committed(task_id: int) -> list[str]:
    """The positions of this workflow's event log committed so far, read on a connection
    of its own."""
    conn = await asyncpg.connect(DSN["dsn"])
    try:
        rows = await conn.fetch(
            "select name from durable.events where task_id = $1 order by seq", task_id
        )
    finally:
        await conn.close()
    return [r["name"] for r in rows]


@durable.workflow(name="sc_sees")
async def sc_sees(ctx: durable.Context) -> list[Any]:
    await ctx.uuid4()
    a = await ctx.step("a", committed, ctx.task_id)
    b = await ctx.step("b", committed, ctx.task_id)
    return [a, b]


async def test_a_step_runs_once_the_call_before_it_is_durable(dsn: str) -> None:
    DSN["dsn"] = dsn
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sc_sees)
        # Polled, not watched: a watch marks the task row, which would change its xmin.
        await wait_status(dsn, handle.id, "completed")
    result = await fetchval(dsn, "select result from durable.tasks where id = $1", handle.id)
    assert json.loads(result) == [["uuid4"], ["uuid4", "a"]]
    # The last step committed with the completion, in one transaction; the others each
    # in one of their own before it.
    same = await _same_transaction_as_task(dsn, handle.id)
    assert same == [(0, False), (1, False), (2, True)]


async def _same_transaction_as_task(dsn: str, task_id: int) -> list[tuple[int, bool]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select e.seq, e.xmin = t.xmin as same from durable.events e"
            " join durable.tasks t on t.id = e.task_id where t.id = $1 order by e.seq",
            task_id,
        )
    finally:
        await conn.close()
    return [(r["seq"], r["same"]) for r in rows]


def count(name: str) -> str:
    RUNS[name] += 1
    return name


@durable.workflow(
    name="sc_fails_after", max_attempts=2, retry=durable.RetryPolicy(base=0.01, jitter=0)
)
async def sc_fails_after(ctx: durable.Context) -> str:
    await ctx.step("charge", count, "charge")
    if ctx.attempt == 1:
        raise RuntimeError("the code after the step failed")
    return "shipped"


async def test_a_step_before_a_failure_stays_done(dsn: str) -> None:
    RUNS.clear()
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sc_fails_after)
        assert await handle.result(timeout=20) == "shipped"
        assert (await client.get(handle.id)).attempt == 2
    assert RUNS["charge"] == 1


@durable.task(name="sc_child")
async def sc_child() -> int:
    return 7


@durable.workflow(name="sc_suspends_after")
async def sc_suspends_after(ctx: durable.Context) -> int:
    child = await ctx.spawn(sc_child)
    await ctx.step("between", count, "between")
    return int(await child) + 1


async def test_a_step_before_a_suspension_stays_done(dsn: str) -> None:
    RUNS.clear()
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sc_suspends_after)
        assert await handle.result(timeout=20) == 8
        history = await client.history(handle.id)
    assert RUNS["between"] == 1  # replayed after the wake-up, not run again
    assert [e.name for e in history] == ["sc_child", "between"]


async def steal(dsn: str, task_id: int) -> str:
    """What a reclaim does to a zombie: the task's claim token changes under it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "update durable.tasks set claim_token = claim_token + 1000 where id = $1", task_id
        )
    finally:
        await conn.close()
    return "stolen"


@durable.workflow(name="sc_loses_last", max_attempts=1)
async def sc_loses_last(ctx: durable.Context, dsn: str) -> str:
    await ctx.step("first", count, "first")
    await ctx.step("last", steal, dsn, ctx.task_id)
    return "done"


async def test_a_last_step_whose_claim_is_lost_is_not_recorded(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handle = await client.start(sc_loses_last, dsn)
    await run_burst(dsn)
    # The completion was refused, and the last step with it: a zombie records nothing.
    status = await fetchval(dsn, "select status from durable.tasks where id = $1", handle.id)
    names = await fetchval(
        dsn, "select array_agg(name order by seq) from durable.events where task_id = $1",
        handle.id,
    )
    assert (status, names) == ("running", ["first"])


async def hold() -> None:
    if HOLD["on"]:
        HELD.set()
        await asyncio.Event().wait()


@durable.workflow(name="sc_stopped_after")
async def sc_stopped_after(ctx: durable.Context) -> str:
    await ctx.step("once", count, "once")
    await hold()  # not durable: the daemon is stopped here
    return "resumed"


async def test_a_step_before_a_shutdown_stays_done(dsn: str) -> None:
    RUNS.clear()
    HOLD["on"] = True
    HELD.clear()
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, shutdown_grace="0"):
            handle = await client.start(sc_stopped_after)
            await asyncio.wait_for(HELD.wait(), 20)
        # Stopped with the task in its code: handed back to the queue, its step kept.
        await wait_for(
            lambda: fetchval(dsn, "select status = 'queued' from durable.tasks where id = $1",
                             handle.id)
        )
        HOLD["on"] = False
        async with running_daemon(dsn):
            assert await handle.result(timeout=20) == "resumed"
    assert RUNS["once"] == 1

"""Workflows the test kit's own tests drive (tests/integration/test_testing_kit.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import durable
from durable.registry import Registry

registry = Registry()
QUEUE = "testkit"
calls: dict[str, int] = {}
"""How many times each step's code ran, by step name (reset by each test)."""


def counted(name: str, value: Any = None) -> Any:
    calls[name] = calls.get(name, 0) + 1
    return value


async def day_long(ctx: durable.Context, order: str) -> dict[str, Any]:
    """Sleeps a day, then waits up to six hours for an approval."""
    started = await ctx.now()
    await ctx.step("charge", counted, "charge", order)
    await ctx.sleep(86400)
    try:
        approval = await ctx.wait_for_event("approved", timeout=6 * 3600)
    except durable.EventTimeout:
        approval = None
    ended = await ctx.now()
    await ctx.step("ship", counted, "ship", order)
    return {"approval": approval, "hours": (ended - started) / timedelta(hours=1)}


async def until(ctx: durable.Context) -> str:
    """Sleeps until two hours after it started, on the moved clock."""
    started = await ctx.now()
    await ctx.sleep_until(started + timedelta(hours=2))
    return (await ctx.now() - started).total_seconds().__str__()


async def flaky(ctx: durable.Context) -> int:
    await ctx.step("call", counted, "call")
    return calls["call"]


async def flaky_retried(ctx: durable.Context) -> int:
    """A step with a retry policy of its own: backoffs of 4 s then 5 s, taken in the run."""
    policy = durable.RetryPolicy(max_attempts=3, base=4, factor=1.25, jitter=0)
    await ctx.step("call", counted, "call", retry=policy)
    return calls["call"]


async def flaky_task() -> str:
    counted("flaky_task")
    return "ok"


async def two_steps(ctx: durable.Context) -> int:
    await ctx.step("first", counted, "first")
    await ctx.step("second", counted, "second")
    return calls["first"]


async def ticker() -> None:
    counted("tick")


async def tasks_elsewhere(ctx: durable.Context) -> Any:
    return await ctx.run("not_here")


for fn in (day_long, until, flaky, flaky_retried, two_steps, tasks_elsewhere):
    registry.add(durable.Definition(name=fn.__name__, fn=fn, kind="workflow", queue=QUEUE))
registry.add(durable.Definition(
    name="flaky_task", fn=flaky_task, queue=QUEUE, retry=durable.RetryPolicy(base=60, jitter=0)
))

cron_registry = Registry()
"""The hourly ``ticker`` alone (a schedule is declared by every worker that has its code)."""
cron_registry.add(durable.Definition(name="ticker", fn=ticker, queue=QUEUE, schedule="0 * * * *"))

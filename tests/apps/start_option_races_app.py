"""Tasks and workflows for tests/faults/test_start_option_races.py (start options under
races: debounce, idempotency scopes, deadlines, delays and priorities)."""

from __future__ import annotations

import asyncio

import durable

QUEUE = "sor"
OTHER_QUEUE = "sor_other"

STARTED = asyncio.Event()
"""Set by sor_gated_fail and sor_gated when their attempt begins (in-process daemon)."""
GATE = asyncio.Event()
"""Set by the test: the gated tasks go on once it is."""
ran: list[object] = []


@durable.workflow(queue=QUEUE)
async def sor_wait(ctx: durable.Context, n: int) -> list[object]:
    """Waits for the event "go"; returns its argument and the payload."""
    payload = await ctx.wait_for_event("go")
    return [n, payload]


@durable.workflow(queue=QUEUE)
async def sor_sleep(ctx: durable.Context, seconds: float) -> float:
    await ctx.sleep(seconds)
    return seconds


@durable.task(queue=QUEUE, max_attempts=2)
async def sor_gated_fail(ctx: durable.TaskContext, n: int) -> int:
    """The first attempt waits for GATE and fails; the second returns ``n``."""
    ran.append((n, ctx.attempt))
    if ctx.attempt == 1:
        STARTED.set()
        await GATE.wait()
        raise RuntimeError("first attempt fails")
    return n


@durable.task(queue=QUEUE)
async def sor_gated(n: int) -> int:
    ran.append(n)
    STARTED.set()
    await GATE.wait()
    return n


@durable.task(queue=QUEUE)
async def sor_echo(n: int) -> int:
    ran.append(n)
    return n


@durable.task(queue=OTHER_QUEUE)
async def sor_other(n: int) -> int:
    ran.append(n)
    return n

"""Tasks and workflows for tests/faults/test_retention_races.py (retention under races).

Parents run on PARENT_QUEUE and their children on CHILD_QUEUE, so that a test can let
one run while the other waits (a daemon serving only one, or a paused queue).
"""

from __future__ import annotations

import asyncio

import durable

PARENT_QUEUE = "ar_parent"
CHILD_QUEUE = "ar_child"

GATE = asyncio.Event()
"""Set by the test: ar_gated_child returns once it is (an in-process daemon shares it)."""


@durable.task(queue=CHILD_QUEUE)
async def ar_child(i: int) -> int:
    return i * 10


@durable.task(queue=CHILD_QUEUE)
async def ar_gated_child(i: int) -> int:
    await GATE.wait()
    return i * 100


@durable.workflow(queue=PARENT_QUEUE)
async def ar_fan_out(ctx: durable.Context, n: int) -> list[int]:
    """n children at once; their results in order."""
    return await ctx.gather(*[ctx.run(ar_child, i) for i in range(n)])


@durable.workflow(queue=PARENT_QUEUE)
async def ar_child_then_event(ctx: durable.Context, i: int) -> list[object]:
    """A gated child, then an event: the child's result must survive both suspensions."""
    got = await ctx.run(ar_gated_child, i)
    payload = await ctx.wait_for_event("go")
    return [got, payload]


@durable.workflow(queue=PARENT_QUEUE)
async def ar_chain(ctx: durable.Context, runs_left: int) -> str:
    """Continues as new until ``runs_left`` is 0; the last run waits for "go"."""
    if runs_left > 0:
        ctx.continue_as_new(runs_left - 1)
    return f"done:{await ctx.wait_for_event('go')}"

"""The tasks `durable bench` measures, registered on import: the bench's daemons, in this
process or in others (`--app durable.tools.bench_app`), serve them."""

from __future__ import annotations

import random
import time

import anyio

import durable

QUEUE = "bench"

ran: set[int] = set()
"""Calls that ran in this process, to check every task ran."""
latencies: list[float] = []
"""Enqueue-to-start of each probe, in seconds."""
step_sleep: list[float] = [0.0, 0.0]
"""Each step sleeps a random time in this range (seconds): uneven workflows."""


@durable.task(name="bench.noop", queue=QUEUE)
async def noop(i: int) -> None:
    ran.add(i)


@durable.task(name="bench.probe", queue=QUEUE)
async def probe(i: int, enqueued: float) -> None:
    latencies.append(time.time() - enqueued)
    ran.add(i)


async def _work(i: int, s: int) -> int:
    lo, hi = step_sleep
    if hi > 0:
        await anyio.sleep(random.uniform(lo, hi))
    return i * 100 + s


@durable.workflow(name="bench.steps", queue=QUEUE)
async def steps(ctx: durable.Context, i: int, n: int) -> int:
    total = 0
    for s in range(n):
        total += await ctx.step(f"s{s}", _work, i, s)
    ran.add(i)
    return total


entity_steps: list[float] = []
"""When each step of the entity workflow started (time.perf_counter())."""


def _add1(v: int) -> int:
    entity_steps.append(time.perf_counter())
    return v + 1


@durable.workflow(name="bench.entity", queue=QUEUE)
async def entity(ctx: durable.Context, n: int) -> int:
    """A long-lived entity: waits for an event, runs a step with it, n times."""
    total = 0
    for i in range(n):
        v = await ctx.wait_for_event("e")
        total += await ctx.step(f"s{i}", _add1, v)
    return total

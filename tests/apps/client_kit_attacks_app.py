"""Definitions for tests/integration/test_client_and_kit_attacks.py (a registry of its own)."""

from __future__ import annotations

from typing import Any

import durable
from durable.registry import Registry

registry = Registry()
QUEUE = "cka"
runs: dict[str, int] = {}
"""How many times each piece of code ran (reset by each test)."""


def count(name: str) -> int:
    runs[name] = runs.get(name, 0) + 1
    return runs[name]


async def echo(value: Any) -> Any:
    return value


async def boom() -> None:
    raise RuntimeError("boom-cka")


async def chained(ctx: durable.Context, n: int) -> int:
    if n > 0:
        ctx.continue_as_new(n - 1)
    return 1000


async def drifting(ctx: durable.Context) -> str:
    """Not deterministic: its step's name changes with each run of its code."""
    name = f"step-{count('drifting')}"
    await ctx.step(name, count, "drifting-step")
    await ctx.step("after", count, "after")
    return name


async def half_hour(ctx: durable.Context) -> str:
    await ctx.sleep(1800)
    return "slept"


async def child(x: int) -> int:
    count("child")
    return x * 10


async def parent(ctx: durable.Context, x: int) -> dict[str, Any]:
    got = await ctx.run("cka_child", x)
    approval = await ctx.wait_for_event("go", timeout=3600)
    return {"child": got, "approval": approval}


registry.add(durable.Definition(name="cka_drifting", fn=drifting, kind="workflow", queue=QUEUE))
for fn in (chained, half_hour, parent):
    registry.add(durable.Definition(name=f"cka_{fn.__name__}", fn=fn, kind="workflow",
                                    queue=QUEUE, max_attempts=1))
for task_fn in (echo, boom, child):
    registry.add(durable.Definition(name=f"cka_{task_fn.__name__}", fn=task_fn, queue=QUEUE,
                                    max_attempts=1))

"""ctx.spawn_many under daemons killed mid-spawn, for tests/faults/test_spawn_many_kills.py
(``durable run --app tests.apps.spawn_many_app``): the fan-out workflows of
``durable.tools.fan_out`` and a spawn_many of large arguments, which goes in several
statements."""

from __future__ import annotations

import durable
from durable.tools.fan_out import KIDS, QUEUE, leaf, spawn_many
from tests.apps.fan_out_app import echo

__all__ = ["KIDS", "QUEUE", "big_spawns", "echo", "leaf", "spawn_many"]


@durable.workflow(name="sm_big_spawns", queue=QUEUE, max_attempts=3)
async def big_spawns(ctx: durable.Context, n: int, size: int) -> list[str]:
    """``n`` children whose arguments are ``size`` characters long, started by one
    spawn_many; the number each result starts with."""
    handles = await ctx.spawn_many(echo, [[f"{i}:".ljust(size, "x")] for i in range(n)])
    return [r.partition(":")[0] for r in await ctx.gather(*handles)]

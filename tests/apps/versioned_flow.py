"""A versioned workflow for the rolling-deploy test: ``VERSIONED_FLOW=1`` or ``2`` picks the
code a daemon runs, as two builds of one service would.

Version 2 inserts a step before the wait: a version-1 history replayed on it would fail
with NonDeterminismError, so version-1 runs must stay on version-1 daemons.
"""

from __future__ import annotations

import os
from typing import Any

import anyio

import durable

VERSION = os.environ.get("VERSIONED_FLOW", "1")


async def whoami(tag: str) -> dict[str, Any]:
    return {"tag": tag, "pid": os.getpid()}


async def hold(gate: str) -> None:
    """Runs until the test removes the file ``gate`` (a run to kill its daemon under)."""
    # A file, not an event: the test and this daemon are different processes.
    while await anyio.Path(gate).exists():  # noqa: ASYNC110 - nothing here to wait on
        await anyio.sleep(0.05)


if VERSION == "1":

    @durable.workflow(name="rolling_flow", queue="roll", version="1")
    async def rolling_flow(ctx: durable.Context, n: int, gate: str | None = None) -> Any:
        if gate is not None:
            await ctx.step("hold", hold, gate)
        await ctx.wait_for_event("go")
        return await ctx.step("who", whoami, "v1")

else:

    @durable.workflow(name="rolling_flow", queue="roll", version="2")
    async def rolling_flow(ctx: durable.Context, n: int, gate: str | None = None) -> Any:
        await ctx.step("greet", whoami, "v2-first")
        await ctx.wait_for_event("go")
        return await ctx.step("who", whoami, "v2")

"""Workflows for the clock-skew test's subprocess daemon (``--app tests.apps.clock_app``)."""

from __future__ import annotations

import durable

QUEUE = "skew"


@durable.workflow(queue=QUEUE, max_attempts=1)
async def skew_sleep_then_wait(ctx: durable.Context, seconds: float) -> object:
    await ctx.sleep(seconds)
    return await ctx.wait_for_event("go", timeout=600)

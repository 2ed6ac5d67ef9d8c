"""Workflow `ship` changed unsafely: a step inserted where runs in flight recorded another call."""

from __future__ import annotations

import durable
from tests.apps.ship_steps import insure, label, notify


@durable.workflow(name="ship", queue="ship")
async def ship(ctx: durable.Context, order: str) -> dict[str, object]:
    printed = await ctx.step("label", label, order)
    await ctx.step("insure", insure, order)
    await ctx.wait_for_event("picked")
    await ctx.step("notify", notify, order)
    return {"label": printed, "insured": True}

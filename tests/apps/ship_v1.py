"""Workflow `ship` as first deployed (durable verify and ctx.patched tests)."""

from __future__ import annotations

import durable
from tests.apps.ship_steps import label, notify


@durable.workflow(name="ship", queue="ship")
async def ship(ctx: durable.Context, order: str) -> dict[str, object]:
    printed = await ctx.step("label", label, order)
    await ctx.wait_for_event("picked")
    await ctx.step("notify", notify, order)
    return {"label": printed, "insured": False}

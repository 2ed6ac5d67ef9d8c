"""Workflow `ship` changed safely: the inserted step behind ctx.patched."""

from __future__ import annotations

import durable
from tests.apps.ship_steps import insure, label, notify


@durable.workflow(name="ship", queue="ship")
async def ship(ctx: durable.Context, order: str) -> dict[str, object]:
    printed = await ctx.step("label", label, order)
    insured = await ctx.patched("insure")
    if insured:
        await ctx.step("insure", insure, order)
    await ctx.wait_for_event("picked")
    await ctx.step("notify", notify, order)
    return {"label": printed, "insured": insured}

"""A plain task and a two-step workflow for the CLI's acceptance tests."""

from __future__ import annotations

import durable


def _double(x: int) -> int:
    return 2 * x


@durable.task(name="cli_echo")
async def cli_echo(value: object) -> object:
    return value


@durable.workflow(name="cli_two_steps")
async def cli_two_steps(ctx: durable.Context, x: int) -> int:
    a: int = await ctx.step("double", _double, x)
    b: int = await ctx.step("again", _double, a)
    return b

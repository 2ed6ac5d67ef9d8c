"""Tasks for the secrets test's subprocess daemon (``--app tests.apps.secret_tasks``)."""

from __future__ import annotations

import durable

QUEUE = "secrets"


@durable.task(queue=QUEUE)
async def sec_echo(x: object) -> object:
    return x


@durable.task(queue=QUEUE, max_attempts=1)
async def sec_fail() -> None:
    raise RuntimeError("this task fails on purpose")


@durable.workflow(queue=QUEUE)
async def sec_flow(ctx: durable.Context, x: int) -> int:
    y = await ctx.step("inc", lambda: x + 1)
    return int(await ctx.run(sec_echo, y))

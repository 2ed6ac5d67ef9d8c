"""Tasks for the secrets test's subprocess daemon (``--app tests.apps.secret_tasks``)."""

from __future__ import annotations

import asyncio

import anyio

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


@durable.task(queue=QUEUE, max_attempts=2)
async def sec_fail_once_told(signal: str) -> None:
    """Fails once the file ``signal`` exists: the test decides the moment of the failure."""
    # The signal comes from another process: a file is the simplest shared event.
    while not await anyio.Path(signal).exists():  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    raise RuntimeError("this task fails when told")

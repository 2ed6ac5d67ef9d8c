"""Task code that attacks the daemon running it (``--app tests.apps.hostile_tasks``)."""

from __future__ import annotations

import asyncio
import sys

import durable

QUEUE = "hostile"
NO_RETRY = durable.RetryPolicy(base=0, jitter=0)


class Doom(BaseException):
    """Not an Exception: task code that catches ``Exception`` lets it through."""


class Unreadable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


class Refused(durable.NonRetryable):
    """Fails at once, with a message the database cannot store as it is."""


@durable.task(queue=QUEUE, max_attempts=2, retry=NO_RETRY)
async def hostile_exit(code: int) -> None:
    sys.exit(code)


@durable.task(queue=QUEUE, max_attempts=2, retry=NO_RETRY)
async def hostile_interrupt() -> None:
    raise KeyboardInterrupt


@durable.task(queue=QUEUE, max_attempts=2, retry=NO_RETRY)
async def hostile_base() -> None:
    raise Doom("doom")


@durable.task(queue=QUEUE, max_attempts=2, retry=NO_RETRY)
async def hostile_cancelled() -> None:
    raise asyncio.CancelledError("raised by the task itself")


@durable.task(queue=QUEUE, max_attempts=2, retry=NO_RETRY)
async def hostile_message(kind: str) -> None:
    if kind == "nul":
        raise ValueError("a NUL \x00 in the message")
    if kind == "surrogate":
        raise ValueError("a lone surrogate \udc80 in the message")
    if kind == "unreadable":
        raise Unreadable()
    if kind == "huge":
        raise ValueError("x" * (20 * 1024 * 1024))
    raise Refused("refused \x00 at once")


@durable.workflow(queue=QUEUE, max_attempts=2, retry=NO_RETRY)
async def hostile_step_exit(ctx: durable.Context) -> None:
    await ctx.step("exit", sys.exit, 3)


@durable.task(queue=QUEUE)
async def hostile_echo(x: object) -> object:
    return x


@durable.task(queue=QUEUE, max_attempts=3)
async def hostile_big_result(mb: int) -> str:
    return "x" * (mb * 1024 * 1024)

"""Tasks for the credential-leak tests' subprocess daemon: task code that fails with the
database URL it was given in its message, as a driver or an ORM often does."""

from __future__ import annotations

import os

import durable

QUEUE = "credleaks"


def _url() -> str:
    return os.environ["DURABLE_DATABASE_URL"]


@durable.task(queue=QUEUE, max_attempts=1)
async def leak_task() -> None:
    raise ConnectionError(f"could not connect to {_url()}")


def _fail_step() -> None:
    raise ConnectionError(f"could not connect to {_url()}")


@durable.workflow(queue=QUEUE, max_attempts=1)
async def leak_flow(ctx: durable.Context) -> None:
    await ctx.step("connect", _fail_step, retry=durable.RetryPolicy(max_attempts=1))

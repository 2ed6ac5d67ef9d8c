"""The test kit's worker when the code that starts it is cancelled (a test's timeout, a
``move_on_after`` around ``async with Env`` or ``env.resume()``).

The worker went on starting after its starter was gone; once it was up it resolved the
starter's future, cancelled by then, and died of InvalidStateError: an error no one
awaited, and a worker that ran with no one to stop it until then.
"""

from __future__ import annotations

import asyncio

import pytest

import durable
from durable.registry import Registry
from durable.testing import Env


async def noop() -> None:
    return None


def registry() -> Registry:
    reg = Registry()
    reg.add(durable.Definition(name="kc_noop", fn=noop, kind="task"))
    return reg


async def _cancelled_while_starting(env: Env, start: asyncio.Task[None]) -> asyncio.Task[None]:
    """Cancel ``start`` once it awaits the worker it started; returns that worker's task."""
    # Its opening or resume awaits the worker from the moment the worker's task exists,
    # and the worker needs round trips to the database before it is up.
    while env._task is None:  # noqa: ASYNC110
        await asyncio.sleep(0)
    worker = env._task
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    return worker


@pytest.mark.timeout(60)
async def test_an_env_whose_opening_is_cancelled_stops_its_worker_cleanly(durable_dsn: str) -> None:
    env = Env(durable_dsn, registry=registry())

    async def open_it() -> None:
        async with env:
            raise AssertionError("the opening was cancelled: the block never runs")

    worker = await _cancelled_while_starting(env, asyncio.create_task(open_it()))
    await asyncio.wait([worker])
    # Stopped by the cancel, not ended by an error of its own.
    assert worker.cancelled() or worker.exception() is None, worker.exception()
    assert env._task is None


@pytest.mark.timeout(60)
async def test_a_resume_that_is_cancelled_stops_its_worker_cleanly(durable_dsn: str) -> None:
    async with Env(durable_dsn, registry=registry()) as env:
        await env.kill()
        worker = await _cancelled_while_starting(env, asyncio.create_task(env.resume()))
        await asyncio.wait([worker])
        assert worker.cancelled() or worker.exception() is None, worker.exception()
        # The environment is usable again: a resume brings a worker that runs tasks.
        await env.resume()
        handle = await env.start("kc_noop")
        await env.run_until_idle()
        assert await env.result(handle) is None

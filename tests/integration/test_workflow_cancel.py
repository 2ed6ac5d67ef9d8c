"""Cancelling a workflow reaches its running coroutine and cascades to its children."""

from __future__ import annotations

import asyncio
import time

import pytest

import durable
from tests.support.helpers import execute, fetchval, running_daemon, wait_status

STARTED: dict[str, asyncio.Event] = {}
CANCELLED: set[str] = set()
"""Keys whose coroutine saw CancelledError."""


async def block(k: str) -> None:
    STARTED[k].set()
    try:
        await asyncio.Event().wait()  # only a cancellation ends this
    except asyncio.CancelledError:
        CANCELLED.add(k)
        raise


@durable.task(max_attempts=1)
async def wf_cancel_child(k: str) -> None:
    await block(f"{k}:child")


@durable.workflow(max_attempts=1)
async def wf_cancel_waiting_parent(ctx: durable.Context, k: str) -> None:
    await ctx.run(wf_cancel_child, k)


@durable.workflow(max_attempts=1)
async def wf_cancel_running_parent(ctx: durable.Context, k: str) -> None:
    child = await ctx.spawn(wf_cancel_child, k)
    await ctx.step("block", block, f"{k}:parent")
    await child


async def child_of(dsn: str, parent: int) -> int:
    return int(await fetchval(dsn, "select id from durable.tasks where parent_id = $1", parent))


@pytest.mark.parametrize("parent", [wf_cancel_running_parent, wf_cancel_waiting_parent])
async def test_cancelling_a_parent_cancels_it_and_its_running_child(
    dsn: str, parent: durable.Definition[..., None]
) -> None:
    k = parent.name
    STARTED[f"{k}:child"], STARTED[f"{k}:parent"] = asyncio.Event(), asyncio.Event()
    running = parent is wf_cancel_running_parent
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(parent, k)
        await asyncio.wait_for(STARTED[f"{k}:child"].wait(), 20)
        if running:
            await asyncio.wait_for(STARTED[f"{k}:parent"].wait(), 20)
        else:
            await wait_status(dsn, handle.id, "waiting")  # suspended on its child
        child = await child_of(dsn, handle.id)
        assert (await client.get(child)).status == "running"

        started = time.monotonic()
        assert set((await client.cancel(handle.id)).cancelled) == {handle.id, child}
        with pytest.raises(durable.TaskCancelled):
            await handle.result(timeout=10)
        with pytest.raises(durable.TaskCancelled):
            await client.result(child, timeout=10)
        elapsed = time.monotonic() - started
        assert (await client.get(handle.id)).status == "cancelled"
        assert (await client.get(child)).status == "cancelled"
    assert elapsed < 3  # promptly: by the control notification, not a lease or poll
    assert f"{k}:child" in CANCELLED  # the child's coroutine itself was cancelled
    assert (f"{k}:parent" in CANCELLED) == running


GATES: dict[str, asyncio.Event] = {}


async def request_cancel_silently(dsn: str, task_id: int) -> None:
    """What the cancel query does to a running task, minus the notification (lost, or
    arriving after the attempt has ended)."""
    await execute(dsn, "update durable.tasks set cancel_requested = true where id = $1", task_id)


async def gated(k: str) -> str:
    STARTED[k].set()
    await GATES[k].wait()
    return k


@durable.task(max_attempts=1)
async def wf_cancel_quick(k: str) -> str:
    return k


@durable.workflow(max_attempts=3)
async def wf_cancel_late_notice(ctx: durable.Context, k: str) -> str:
    await ctx.step("gated", gated, k)
    return str(await ctx.run(wf_cancel_quick.options(queue="wf_cancel_nobody"), k))


async def test_a_cancel_whose_notification_comes_too_late_still_cancels(dsn: str) -> None:
    # The cancel commits while the attempt is ending: the notification reaches the daemon
    # after the attempt has gone. The attempt's suspension must end the task cancelled.
    k = "late-notice"
    STARTED[k], GATES[k] = asyncio.Event(), asyncio.Event()
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(wf_cancel_late_notice, k)
        await asyncio.wait_for(STARTED[k].wait(), 20)
        await request_cancel_silently(dsn, handle.id)
        GATES[k].set()
        with pytest.raises(durable.TaskCancelled):
            await handle.result(timeout=10)
        # The child it asks for after the cancel is never started.
        assert await fetchval(dsn, "select count(*) from durable.tasks where parent_id = $1",
                              handle.id) == 0


@durable.task(max_attempts=3, retry=durable.RetryPolicy(base=0, jitter=0))
async def wf_cancel_failing(k: str) -> None:
    await gated(k)
    raise RuntimeError("fails after the cancel")


async def test_a_failure_after_a_cancel_request_ends_cancelled_not_retried(dsn: str) -> None:
    k = "fail-after-cancel"
    STARTED[k], GATES[k] = asyncio.Event(), asyncio.Event()
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(wf_cancel_failing, k)
        await asyncio.wait_for(STARTED[k].wait(), 20)
        await request_cancel_silently(dsn, handle.id)
        GATES[k].set()
        with pytest.raises(durable.TaskCancelled):
            await handle.result(timeout=10)
        assert (await client.get(handle.id)).attempt == 1


async def test_a_shutdown_hands_back_a_cancel_requested_task_as_cancelled(dsn: str) -> None:
    k = "shutdown-after-cancel"
    STARTED[f"{k}:child"] = asyncio.Event()
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, shutdown_grace="0"):
            handle = await client.start(wf_cancel_child, k)
            await asyncio.wait_for(STARTED[f"{k}:child"].wait(), 20)
            await request_cancel_silently(dsn, handle.id)
        # The daemon stopped and released the task: it must not be queued to run again.
        info = await client.get(handle.id)
        assert info.status == "cancelled" and info.finished_at is not None

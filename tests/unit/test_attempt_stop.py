"""Attempt.stop cancels a running attempt's code once: the reasons that come round again
(a lost lease, found by every heartbeat while the code unwinds) do not cut its cleanup
short; a shutdown cancels once more, for code that went on past its first cancel."""

from __future__ import annotations

import asyncio

from durable.attempts import Attempt
from durable.models import Claimed

TASK = Claimed(1, "q", "t", "task", "[]", "{}", 1, 3, None, 7, 0, None, None, False)


async def _running(body: asyncio.Event) -> tuple[Attempt, asyncio.Task[None]]:
    async def code() -> None:
        await body.wait()

    attempt = Attempt(TASK)
    attempt.running = True
    job = asyncio.get_running_loop().create_task(code())
    attempt.job = job
    await asyncio.sleep(0)  # the job takes its first step
    return attempt, job


async def test_a_reason_that_comes_again_does_not_cancel_again() -> None:
    attempt, job = await _running(asyncio.Event())
    for reason in ("lease_lost", "lease_lost", "cancelled", "lease_lost"):
        attempt.stop(reason)
    assert job.cancelling() == 1
    assert attempt.reason == "lease_lost"  # the first reason is the one the runner reads
    await asyncio.wait([job])


async def test_a_shutdown_cancels_once_more() -> None:
    attempt, job = await _running(asyncio.Event())
    attempt.stop("cancelled")
    attempt.stop("lease_lost")
    attempt.stop("shutdown")
    assert job.cancelling() == 2
    assert attempt.reason == "cancelled"
    stopped, job2 = await _running(asyncio.Event())
    stopped.stop("shutdown")
    stopped.stop("shutdown")
    assert job2.cancelling() == 1
    await asyncio.wait([job, job2])


async def test_a_stop_before_the_code_runs_or_once_it_is_finishing_cancels_nothing() -> None:
    attempt, job = await _running(asyncio.Event())
    attempt.running = False
    attempt.stop("cancelled")
    attempt.running, attempt.finishing = True, True
    attempt.stop("shutdown")
    assert job.cancelling() == 0
    job.cancel()
    await asyncio.wait([job])

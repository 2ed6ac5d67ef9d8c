"""An attempt the daemon stops is cancelled once, however many times the reason comes
round again: its code may clean up (a finally that awaits, a transaction rolling back)
without being cut short.

A lost lease is found by every heartbeat while the attempt's code unwinds, and every
heartbeat that failed for longer than a lease stops every attempt; each of those stops
cancelled the attempt again. Seen in ``durable soak``: after a stalled network path a
daemon logged ``lease_lost`` up to six times for one attempt, and a transaction whose
rollback was cancelled in its turn went back to the pool still open (asyncpg's "Resetting
connection with an active transaction").
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

import durable
from tests.support.helpers import fetchval, running_daemon, wait_for, wait_status

QUEUE = "aco_q"
CLEANING = asyncio.Event()
FINISH = asyncio.Event()
ENDED = asyncio.Event()
OUTCOME: list[str] = []


@durable.task(name="aco_cleans_up", queue=QUEUE, max_attempts=1)
async def aco_cleans_up() -> None:
    try:
        await asyncio.Event().wait()  # until the daemon stops it
    except asyncio.CancelledError:
        CLEANING.set()
        try:
            await FINISH.wait()  # its cleanup, which takes what it takes
        except asyncio.CancelledError:
            OUTCOME.append("cleanup cut short")
            raise
        OUTCOME.append("cleaned up")
        raise
    finally:
        ENDED.set()


async def _beat(dsn: str, worker_id: str) -> datetime:
    return await fetchval(dsn, "select heartbeat_at from durable.workers where id = $1",  # type: ignore[no-any-return]
                          worker_id)


@pytest.mark.timeout(60)
async def test_an_attempt_whose_lease_is_lost_is_cancelled_once(dsn: str) -> None:
    for e in (CLEANING, FINISH, ENDED):
        e.clear()
    OUTCOME.clear()
    async with (
        durable.connect(dsn) as client,
        running_daemon(dsn, queues=f"{QUEUE}=1", lease="3") as daemon,
    ):
        handle = await client.start(aco_cleans_up)
        await wait_status(dsn, handle.id, "running")
        # Another claim takes the task, as a daemon that reaped the lease would.
        await fetchval(dsn, "update durable.tasks set claim_token = claim_token + 1 "
                       "where id = $1 returning id", handle.id)
        await asyncio.wait_for(CLEANING.wait(), 20)  # the heartbeat found the lease lost
        worker = str(daemon.id)
        seen = await _beat(dsn, worker)
        for _ in range(2):  # two more heartbeats, each finding the lease lost again

            async def beaten(after: datetime = seen) -> datetime | None:
                at = await _beat(dsn, worker)
                return at if at > after else None

            seen = await wait_for(beaten)
        FINISH.set()
        await asyncio.wait_for(ENDED.wait(), 20)
    assert OUTCOME == ["cleaned up"]

"""A queue loop's wake-up timer for work the poll found due soon, under uvloop.

uvloop turns a timer under a millisecond away into a plain call-soon Handle, which has no
``when()``: a poll finding a task due that soon took the daemon down once.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import cast

import uvloop

from durable.store import Store
from durable.worker import QueueWorker


def _worker() -> QueueWorker:
    async def give_back(attempts: object) -> None:
        raise AssertionError("nothing is claimed here")

    return QueueWorker(
        queue="q",
        limit=1,
        names=["t"],
        store=cast(Store, None),  # never touched: no kept connection, no claim
        worker_id=uuid.uuid4(),
        lease=30.0,
        poll_interval=1.0,
        hold=lambda claimed: (_ for _ in ()).throw(AssertionError("no claim")),
        launch=lambda attempt, done: None,
        give_back=give_back,
        polled=True,
    )


async def _next_turn() -> None:
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done


def test_a_timer_under_a_millisecond_can_be_moved_earlier_and_fires() -> None:
    async def main() -> str | None:
        w = _worker()
        w.due_in(0.0004)  # rounds to 0 ms: uvloop gives a plain Handle
        assert not isinstance(w._due, asyncio.TimerHandle)
        w.due_in(0.0002)  # the next poll finds it due sooner still
        w.due_in(0.0003)  # and later: the earlier wake-up stands
        await _next_turn()
        await _next_turn()
        return w._notified

    assert uvloop.run(main()) == "poll"


def test_a_far_timer_is_replaced_by_a_nearer_one() -> None:
    async def main() -> tuple[str | None, bool]:
        w = _worker()
        w.due_in(3600.0)
        far = w._due
        assert far is not None
        w.due_in(0.0001)
        await _next_turn()
        await _next_turn()
        return w._notified, far.cancelled()

    assert uvloop.run(main()) == ("poll", True)

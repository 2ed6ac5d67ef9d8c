"""Group commit: batches form while a flush is in flight; a failed flush fails its batch."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import pytest

from durable.batch import Batcher
from durable.worker import idle_wait


def _held_first(
    batches: list[list[int]], gate: anyio.Event, factor: int = 1
) -> Callable[[Sequence[int]], Awaitable[list[int]]]:
    """A flush that records each batch, holds the first until ``gate`` is set, and
    returns each item times ``factor``."""

    async def flush(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            await gate.wait()
        return [i * factor for i in items]

    return flush


async def test_items_submitted_during_a_flush_share_the_next_one() -> None:
    batches: list[list[int]] = []
    gate = anyio.Event()
    b: Batcher[int, int] = Batcher(_held_first(batches, gate, factor=10))
    async with anyio.create_task_group() as tg:
        await tg.start(b.run)
        first = b.submit(1)
        await anyio.wait_all_tasks_blocked()
        later = [b.submit(i) for i in range(2, 7)]
        gate.set()
        assert await first == 10
        assert [await f for f in later] == [20, 30, 40, 50, 60]
        await b.drain()
        b.close()
    assert batches == [[1], [2, 3, 4, 5, 6]]


async def test_a_failed_flush_fails_every_item_in_it() -> None:
    async def flush(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("commit failed")
        return list(items)

    b: Batcher[int, int] = Batcher(flush)
    async with anyio.create_task_group() as tg:
        await tg.start(b.run)
        doomed = [b.submit(i) for i in (11, 12, 13)]
        for f in doomed:
            with pytest.raises(RuntimeError, match="commit failed"):
                await f
        assert await b.submit(14) == 14
        b.close()


async def test_max_batch_splits_large_batches() -> None:
    sizes: list[int] = []

    async def flush(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        return list(items)

    b: Batcher[int, int] = Batcher(flush, max_batch=4)
    async with anyio.create_task_group() as tg:
        await tg.start(b.run)
        futs = [b.submit(i) for i in range(10)]
        assert [await f for f in futs] == list(range(10))
        b.close()
    assert sizes == [4, 4, 2]


async def test_a_second_flight_takes_the_writes_that_arrive_while_one_commits() -> None:
    batches: list[list[int]] = []
    gate = anyio.Event()
    b: Batcher[int, int] = Batcher(_held_first(batches, gate), flights=2)
    async with anyio.create_task_group() as tg:
        await tg.start(b.run)
        first = b.submit(1)
        await anyio.wait_all_tasks_blocked()
        later = [b.submit(i) for i in (2, 3)]
        with anyio.fail_after(5):
            # Committed while the first flush is still held.
            assert [await f for f in later] == [2, 3]
        assert not first.done()
        gate.set()
        assert await first == 1
        b.close()
    assert batches == [[1], [2, 3]]


async def test_drain_waits_for_every_flight_and_then_returns() -> None:
    gate = anyio.Event()

    async def flush(items: Sequence[int]) -> list[int]:
        if 1 in items:
            await gate.wait()
        return list(items)

    b: Batcher[int, int] = Batcher(flush, flights=2)
    drained = anyio.Event()

    async def drain() -> None:
        await b.drain()
        drained.set()

    async with anyio.create_task_group() as tg:
        await tg.start(b.run)
        first = b.submit(1)
        await anyio.wait_all_tasks_blocked()
        assert await b.submit(2) == 2  # the other flight, while the first is held
        tg.start_soon(drain)
        await anyio.wait_all_tasks_blocked()
        assert not drained.is_set()
        gate.set()
        with anyio.fail_after(5):
            await drained.wait()
        assert first.result() == 1
        b.close()


def test_idle_wait_sleeps_until_due_within_the_poll_interval() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 1, 1, tzinfo=UTC)
    # Nothing due before the daemon's next poll: no timer of its own, the poll wakes it.
    assert idle_wait(5.0, None, now) is None
    assert idle_wait(5.0, now + timedelta(seconds=2), now) == 2.0
    assert idle_wait(5.0, now + timedelta(seconds=60), now) is None
    # Due work this loop could not claim (another daemon's claim in flight): not a busy loop.
    assert idle_wait(5.0, now - timedelta(seconds=1), now) == 0.02

"""Group commit: many callers' writes share one statement and one commit.

While a flush is in flight the next callers queue up; when it returns they all go in
the next one. No timer: under load batches grow by themselves, and a lone write is
flushed at once. With more than one flight, the writes that arrive while one flush
commits go out on another connection instead of waiting for it. A flush may return an
exception in place of an item's result: that item alone fails with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskStatus

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        max_batch: int = 500,
        flights: int = 1,
    ) -> None:
        self._flush = flush
        self._max = max_batch
        self._flights = flights
        self._busy = 0
        self._items: list[tuple[T, asyncio.Future[R] | None]] = []
        self._pending = asyncio.Event()
        self._flying: list[list[T]] = []
        """The batches being flushed."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def pending(self) -> list[T]:
        """What was submitted and has not been flushed yet, in flight or waiting."""
        out = [item for item, _ in self._items]
        for writes in self._flying:
            out.extend(writes)
        return out

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the future resolves once its batch has committed (or failed)."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        # The loop run() found: asking asyncio for it costs a getpid() system call.
        fut: asyncio.Future[R] = (self._loop or asyncio.get_running_loop()).create_future()
        self._items.append((item, fut))
        self._idle.clear()
        self._pending.set()
        return fut

    def submit_nowait(self, item: T) -> None:
        """Queue ``item`` without waiting for it; the flush function reports its outcome."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        self._items.append((item, None))
        self._idle.clear()
        self._pending.set()

    async def drain(self) -> None:
        """Wait until everything submitted so far has been flushed."""
        await self._idle.wait()

    def close(self) -> None:
        self._closed = True
        self._pending.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            for _ in range(self._flights):
                tg.start_soon(self._flight)
            task_status.started()

    async def _flight(self) -> None:
        while True:
            if not self._items:
                if self._busy == 0:
                    self._idle.set()
                if self._closed:
                    return  # the event stays set: the other flights see it too
                self._pending.clear()
                await self._pending.wait()
                continue
            batch, self._items = self._items[: self._max], self._items[self._max :]
            self._busy += 1
            writes = [item for item, _ in batch]
            self._flying.append(writes)
            try:
                results = await self._flush(writes)
            except Exception as exc:
                # The batch did not commit: every write in it fails, none is reported durable.
                for _, fut in batch:
                    if fut is not None and not fut.done():
                        fut.set_exception(exc)
                continue
            except BaseException:
                for _, fut in batch:
                    if fut is not None and not fut.done():
                        fut.set_exception(asyncio.CancelledError())
                raise
            finally:
                self._busy -= 1
                self._flying.remove(writes)
            for (_, fut), result in zip(batch, results, strict=True):
                if fut is not None and not fut.done():
                    if isinstance(result, Exception):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)

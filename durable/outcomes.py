"""Waiting for tasks' outcomes: ``result()`` and ``progress()`` of a client, woken by the
notifications of one LISTEN connection (``durable_done``, ``durable_progress``) and
looking again now and then in case one is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio

from durable.errors import DurableError, TaskCancelled, TaskFailed
from durable.models import TERMINAL, Progress
from durable.store import Store, Subscription
from durable.validation import InvalidValue
from durable.validation import task_id as _task_id


class Outcomes:
    """A client's waits for outcomes, over one LISTEN connection opened on first use."""

    def __init__(self, store: Store, listen_dsn: str | None) -> None:
        self.store = store
        self.listen_dsn = listen_dsn
        self._waiters: dict[int, list[asyncio.Event]] = {}
        self._progress_waiters: dict[int, list[asyncio.Event]] = {}
        self._sub: Subscription | None = None
        self._sub_lock = asyncio.Lock()
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._sub is not None:
            await self._sub.close()
            self._sub = None

    async def result(self, task_id: int, timeout: float | None = None) -> Any:
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout != timeout
        ):
            raise InvalidValue(f"timeout must be a number of seconds or None, got {timeout!r}")
        await self._subscribe()
        event = asyncio.Event()
        self._waiters.setdefault(task_id, []).append(event)
        try:
            # A timeout of 0 or less still reads the task once: a finished task's outcome
            # is there to take without waiting.
            limit = None if timeout is None else max(timeout, 0.0)
            with anyio.fail_after(limit) if limit else _forever():
                while True:
                    # LISTEN is live before the flag is set, so no finish can slip past.
                    state = await self.store.watch_finish(_task_id(task_id))
                    if state is None:
                        raise DurableError(f"no task {task_id}")
                    status, result, error, continued_as = state
                    if continued_as is not None:
                        # The run continued as a new one (ctx.continue_as_new): the chain's
                        # outcome is its last run's.
                        return await self.result(continued_as, timeout=timeout)
                    if status in TERMINAL:
                        return _outcome(task_id, status, result, error)
                    if limit == 0:
                        raise TimeoutError(f"task {task_id} has not finished")
                    with anyio.move_on_after(5.0):  # a fallback in case a notification is lost
                        await event.wait()
                    event.clear()
                    # Woken because the listener was lost: listen again before looking.
                    await self._subscribe()
        finally:
            waiters = self._waiters.get(task_id, [])
            if event in waiters:
                waiters.remove(event)
            if not waiters:
                self._waiters.pop(task_id, None)

    async def progress(self, task_id: int) -> AsyncIterator[Progress]:
        """See :meth:`Handle.progress`."""
        task_id = _task_id(task_id)
        await self._subscribe()
        event = asyncio.Event()
        # Progress notifications and the finish both wake this iterator.
        self._waiters.setdefault(task_id, []).append(event)
        self._progress_waiters.setdefault(task_id, []).append(event)
        try:
            if await self.store.watch_finish(task_id) is None:
                raise DurableError(f"no task {task_id}")
            last: Progress | None = None
            while True:
                state = await self.store.progress_state(task_id)
                if state is None:
                    raise DurableError(f"no task {task_id}")
                status, latest = state
                if latest is not None and latest != last:
                    last = latest
                    yield latest
                if status in TERMINAL:
                    return
                with anyio.move_on_after(5.0):  # a fallback in case a notification is lost
                    await event.wait()
                event.clear()
                await self._subscribe()  # again, if the listener was lost meanwhile
        finally:
            for table in (self._waiters, self._progress_waiters):
                waiters = table.get(task_id, [])
                if event in waiters:
                    waiters.remove(event)
                if not waiters:
                    table.pop(task_id, None)

    async def _subscribe(self) -> None:
        if self._closed:
            raise DurableError("this client is closed")
        async with self._sub_lock:
            if self._sub is not None and not self._sub.is_closed():
                return
            self._sub = await Subscription.open(
                self.listen_dsn,
                {"durable_done": self._on_done, "durable_progress": self._on_progress},
                on_lost=self._wake_all,
            )

    def _on_done(self, payload: str) -> None:
        if payload.isdigit():
            for e in self._waiters.get(int(payload), []):
                e.set()

    def _on_progress(self, payload: str) -> None:
        if payload.isdigit():
            for e in self._progress_waiters.get(int(payload), []):
                e.set()

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for e in events:
                e.set()


def _outcome(task_id: int, status: str, result: Any, error: Any) -> Any:
    if status == "completed":
        return result
    if status == "cancelled":
        raise TaskCancelled(task_id)
    err = error or {}
    raise TaskFailed(task_id, str(err.get("type")), str(err.get("message")), err.get("traceback"))


class _forever:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

"""What a running task knows of itself: ``durable.TaskContext`` and ``durable.current()``,
and its progress reports, coalesced so that a task reporting in a loop writes at most one
row a second."""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from durable.codec import describe_error, dumps
from durable.errors import DurableError
from durable.logs import get_logger
from durable.validation import text

if TYPE_CHECKING:
    from durable.models import Claimed
    from durable.store import Store

log = get_logger("durable.progress")

PROGRESS_INTERVAL = 1.0
"""Seconds: an attempt writes its progress at most this often. The first report is written
at once; later ones within the interval replace each other in memory, and the latest is
written when the interval ends (or when the attempt ends)."""

MAX_MESSAGE = 1000
"""Longest progress message, in characters."""

_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("durable_task")


class TaskContext:
    """The running attempt of a task, as its code sees it.

    A plain task gets it by declaring a first parameter annotated ``durable.TaskContext``
    (the daemon passes it; callers of ``start`` do not), or from ``durable.current()``.
    """

    __slots__ = ("_reporter", "_store", "_task", "deadline")

    def __init__(self, task: Claimed, store: Store, deadline: datetime | None = None) -> None:
        self._task = task
        self._store = store
        self._reporter: ProgressReporter | None = None
        self.deadline = deadline
        """When the task must be done by, if it has a deadline (else None)."""

    @property
    def id(self) -> int:
        """The task's id."""
        return self._task.id

    @property
    def name(self) -> str:
        return self._task.name

    @property
    def queue(self) -> str:
        return self._task.queue

    @property
    def attempt(self) -> int:
        """This attempt's number, from 1."""
        return self._task.attempt

    @property
    def max_attempts(self) -> int:
        return self._task.max_attempts

    def progress(self, value: Any = None, message: str | None = None) -> None:
        """Report progress (any JSON ``value``, e.g. 0.4, and an optional ``message``).

        Returns at once. Stored (the latest report only), shown by ``durable show`` and
        ``durable ls``, and sent to clients iterating ``handle.progress()``. Reports are
        coalesced: at most one write a second; the latest always gets written.
        """
        if message is not None:
            text(message, "a progress message", limit=MAX_MESSAGE)
        encoded = dumps(value, what="a progress value")
        if self._reporter is None:
            self._reporter = ProgressReporter(self._store, self._task.id, self._task.token)
        self._reporter.report(encoded, message)

    @property
    def reported(self) -> bool:
        """Whether the attempt reported any progress."""
        return self._reporter is not None

    async def finish(self) -> None:
        """Write the progress still pending (the runner calls it when the attempt ends)."""
        if self._reporter is not None:
            await self._reporter.close()


def current() -> TaskContext:
    """The TaskContext of the task (or workflow) this code runs in."""
    ctx = _current.get(None)
    if ctx is None:
        raise DurableError("durable.current() is only available inside a running task")
    return ctx


def enter(ctx: TaskContext) -> contextvars.Token[TaskContext]:
    return _current.set(ctx)


def leave(token: contextvars.Token[TaskContext]) -> None:
    _current.reset(token)


class ProgressReporter:
    """One attempt's progress writes: the latest report, written at most once an interval."""

    def __init__(self, store: Store, task_id: int, token: int) -> None:
        self._store = store
        self._task_id = task_id
        self._token = token
        self._pending: tuple[str, str | None] | None = None
        self._written_at = -math.inf
        self._flusher: asyncio.Task[None] | None = None
        self._sleeping = False
        self.writes = 0

    def report(self, value: str, message: str | None) -> None:
        self._pending = (value, message)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending is not None:
                wait = self._written_at + PROGRESS_INTERVAL - time.monotonic()
                if wait > 0:
                    self._sleeping = True
                    try:
                        await asyncio.sleep(wait)
                    finally:
                        self._sleeping = False
                await self._write()
        except Exception as exc:  # progress is advisory: the task goes on without it
            log.warning("progress_not_written", task_id=self._task_id, error=describe_error(exc))
        finally:
            self._flusher = None

    async def _write(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._written_at = time.monotonic()
        self.writes += 1
        await self._store.report_progress(self._task_id, self._token, *pending)

    async def close(self) -> None:
        flusher = self._flusher
        if flusher is not None:
            if self._sleeping:
                flusher.cancel()
            await asyncio.wait([flusher])  # never raises: our own cancel still propagates
        try:
            async with asyncio.timeout(5):
                await self._write()
        except Exception as exc:
            log.warning("progress_not_written", task_id=self._task_id, error=describe_error(exc))

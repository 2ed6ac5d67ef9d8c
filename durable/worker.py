"""One queue's loop: wait (notify | poll | next run_at | stop), claim a batch, run it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import anyio
from anyio.abc import TaskGroup

from durable.logs import get_logger, redact
from durable.models import Claimed
from durable.store import Store, is_transient

log = get_logger("durable.worker")


def idle_wait(poll_interval: float, next_due: datetime | None, now: datetime) -> float:
    """How long an idle queue loop may sleep: the poll interval, or until work is due.

    Work already due that this loop could not claim is held by another daemon's claim in
    progress; look again shortly rather than at once, so that never becomes a busy loop.
    """
    if next_due is None:
        return poll_interval
    until = (next_due - now).total_seconds()
    return max(0.02, min(poll_interval, until))


class QueueWorker:
    """Claims tasks of one queue up to its free slots and starts each in ``attempts``."""

    def __init__(
        self,
        *,
        queue: str,
        limit: int,
        names: Sequence[str],
        store: Store,
        worker_id: uuid.UUID,
        lease: float,
        poll_interval: float,
        start: Callable[[Claimed, Callable[[], None]], None],
        burst: bool = False,
    ) -> None:
        self.queue = queue
        self.limit = limit
        self.names = list(names)
        self.store = store
        self.worker_id = worker_id
        self.lease = lease
        self.poll_interval = poll_interval
        self.start = start
        self.burst = burst
        self.in_flight = 0
        self.claimed = 0
        self.wakeups = {"notify": 0, "poll": 0}
        self._wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._held = 0.0
        self.claimed_once = anyio.Event()
        """Set once this loop's first claim has returned: the queue is being served."""

    def notify(self) -> None:
        """A hint that work may be ready (a notification, a reconnect, a freed slot)."""
        self._wakeup.set()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._slot_freed.set()

    def _released(self) -> None:
        self.in_flight -= 1
        self._slot_freed.set()

    async def run(self, tg: TaskGroup | None = None) -> None:
        backoff = 0.1
        while not self._stopping:
            free = self.limit - self.in_flight
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._wakeup.clear()
            try:
                tasks = await self.store.claim(
                    self.queue, self.names, free, self.lease, self.worker_id
                )
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning(
                    "claim_failed",
                    queue=self.queue,
                    error=redact(f"{type(exc).__name__}: {exc}"),
                    retry_in=round(backoff, 2),
                )
                with anyio.move_on_after(backoff):
                    await self._wakeup_or_stop()
                backoff = min(backoff * 2, self.poll_interval)
                continue
            backoff = 0.1
            self.claimed_once.set()
            if tasks:
                self._held = 0.0
                log.debug("tasks_claimed", queue=self.queue, ids=[t.id for t in tasks])
            for task in tasks:
                self.in_flight += 1
                self.claimed += 1
                self.start(task, self._released)
            if len(tasks) == free:
                continue  # there may be more ready work: claim again once slots free up
            if self.burst and self.in_flight == 0 and not tasks:
                return
            if self.burst:
                # Nothing more is ready: look again as soon as a running task has ended
                # (the daemon frees a burst's slots once the outcome is written).
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            await self._idle()

    async def _wakeup_or_stop(self) -> None:
        await self._wakeup.wait()

    async def _idle(self) -> None:
        delay: float | None = None
        try:
            due = await self.store.next_due(self.queue, self.names)
            if due is not None and due <= datetime.now(UTC):
                # Due work we could not claim: a fleet-wide limit may be holding it back.
                delay = await self.store.claim_delay(self.queue)
        except Exception as exc:
            if not is_transient(exc):
                raise
            due = None
        timeout = idle_wait(self.poll_interval, due, datetime.now(UTC))
        if delay is not None:
            timeout = min(self.poll_interval, max(timeout, delay))
        elif due is not None and due <= datetime.now(UTC):
            # Due but not claimable: held by another daemon's claim, or by a fleet-wide limit
            # (a slot coming free sends a notification). Look again, backing off.
            self._held = min(self.poll_interval, max(0.02, self._held * 2))
            timeout = self._held
        notified = False
        with anyio.move_on_after(timeout):
            await self._wakeup.wait()
            notified = True
        self.wakeups["notify" if notified else "poll"] += 1

"""One queue's loop: wait (notify | poll | next run_at | stop), claim a batch, run it.

Claims run ahead of the slots. While every slot is busy the loop already claims the
tasks that will take the slots next, so a slot that frees up starts its next task at
once instead of after a round trip. How far ahead is the bandwidth-delay product: how
fast slots free up times how long a claim takes. Short tasks keep a batch in hand; for
slow ones it falls to nothing, so a daemon never sits on tasks another could run. A task
held that long without a slot (the estimate was wrong) goes back to the queue.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import anyio
from anyio.abc import TaskGroup

from durable import logs, tracing
from durable.attempts import Attempt
from durable.logs import Once, get_logger, redact
from durable.models import Claimed
from durable.store import Store, is_fatal, is_transient, statement_deadline

log = get_logger("durable.worker")

CLAIM_STOP_TIMEOUT = 2.0
"""Seconds a queue loop's statement in flight when the daemon stops (a claim, or an idle
loop's look at what is due next) may still take: on a network path that stopped answering
it would hold the loop, and the shutdown, for ever. Whatever a claim cut short claimed
goes back to the queue when the leases expire."""

AHEAD_WINDOW = 0.02
"""Seconds of slot turnover a queue claims ahead, at least. Sized by two claim round trips
alone, a queue of short tasks claimed a few at a time and its slots ran dry while a claim
was out: three-step workflows at concurrency 32 ran 20-56% faster with this window (six
alternating pairs), on less daemon CPU each; no-op drains and latency were unchanged."""

HOLD_LIMIT = 0.5
"""Seconds a task claimed ahead may wait for a slot before it goes back to the queue."""


def idle_wait(poll_interval: float, next_due: datetime | None, now: datetime) -> float | None:
    """How long an idle queue loop sleeps on a timer of its own: until its next task is
    due, if that comes before the daemon's next poll; None, until it is woken (by a
    notification or the poll, which looks at every queue in one statement).

    Work already due that this loop could not claim is held by another daemon's claim in
    progress; look again shortly rather than at once, so that never becomes a busy loop.
    """
    if next_due is None:
        return None
    until = (next_due - now).total_seconds()
    return max(0.02, until) if until < poll_interval else None


def ahead(limit: int, rate: float, round_trip: float) -> int:
    """How many tasks to claim beyond the free slots: the slots that free up during two
    claim round trips or AHEAD_WINDOW, whichever is longer (rounded down: slow tasks get
    none), at most four sets of slots."""
    if rate <= 0 or round_trip <= 0:
        return 0
    return min(4 * limit, math.floor(rate * max(2 * round_trip, AHEAD_WINDOW)))


class QueueWorker:
    """Claims tasks of one queue for its free slots and a little ahead of them, and
    launches each as a slot comes free."""

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
        hold: Callable[[Claimed], Attempt],
        launch: Callable[[Attempt, Callable[[], None]], None],
        give_back: Callable[[list[Attempt]], Awaitable[None]],
        burst: bool = False,
        claim_ahead: int | None = None,
        hold_limit: float | None = None,
        keep_connection: bool = False,
        polled: bool = False,
    ) -> None:
        self.queue = queue
        self.limit = limit
        self.names = list(names)
        self.store = store
        self.worker_id = worker_id
        self.lease = lease
        self.poll_interval = poll_interval
        self.hold = hold
        self.launch = launch
        self.give_back = give_back
        self.burst = burst
        self.polled = polled and not burst
        """The daemon's poll looks for this queue's work: no claim before it (or a
        notification) says there is some, and no timer of its own while idle."""
        self.claim_ahead = claim_ahead
        """Tasks to claim beyond the free slots; None sizes it as it goes."""
        self.hold_limit = HOLD_LIMIT if hold_limit is None else hold_limit
        self.in_flight = 0
        self.claimed = 0
        self.given_back = 0
        self.wakeups = {"notify": 0, "poll": 0}
        """What woke the idle loop: a notification, else the poll or a timer of its own."""
        self.waiting: deque[tuple[float, Attempt]] = deque()
        """Claimed ahead of a free slot, oldest first, with the time each was claimed."""
        self._returning: list[Attempt] = []
        """Claimed ahead, to go back to the queue unstarted (the queue was paused)."""
        self._pauses = 0
        """Pauses of the queue heard so far (`durable queues pause`)."""
        self._releases = 0
        """Slots freed since the loop started: the claim-ahead rate is measured on it, and
        a burst compares it across a claim."""
        self._releases_measured = 0
        self._stalled = False
        """Tasks claimed ahead went back unrun: claim only for free slots until one frees."""
        self._rate = 0.0
        self._round_trip = 0.0
        self._measured_at = time.monotonic()
        self._notified: str | None = None
        """The hint that arrived since the last claim began ('notify' or 'poll'), if any."""
        self._waiter: asyncio.Future[str] | None = None
        """Set while the loop waits for a hint: a bare future, resolved by notify() or a
        timer."""
        self._due: asyncio.Handle | None = None
        """The poll's wake-up for a task of this queue due before the next poll."""
        self._due_at = 0.0
        """When ``_due`` fires, by the loop's clock. Kept here: uvloop hands back a plain
        Handle, with no ``when()``, for a timer under a millisecond away."""
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._statement: anyio.CancelScope | None = None
        """The loop's statement in flight (a claim, or a look at what is due), which a stop
        bounds (CLAIM_STOP_TIMEOUT)."""
        self._held = 0.0
        self._conn = store.kept_connection() if keep_connection else None
        """The loop's own connection for its claims, if it keeps one."""
        self.claimed_once = anyio.Event()
        """Set once the queue is being served: this loop's first claim has returned, or
        the daemon's first poll found nothing due in it."""
        self._errors = Once()

    def notify(self, source: str = "notify") -> None:
        """A hint that work may be ready: a notification, or ``source="poll"`` (the
        daemon's poll found work due)."""
        if self._notified is None:
            self._notified = source
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(source)

    def due_in(self, seconds: float) -> None:
        """The poll found work of this queue due in ``seconds`` (now, if not positive)."""
        if seconds <= 0:
            self.notify("poll")
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds
        if self._due is not None and self._due_at > loop.time():
            if self._due_at <= when:
                return  # woken by then already
            self._due.cancel()
        self._due = loop.call_at(when, self.notify, "poll")
        self._due_at = when

    def stop(self) -> None:
        self._stopping = True
        statement = self._statement
        if statement is not None:
            statement.deadline = min(statement.deadline, anyio.current_time() + CLAIM_STOP_TIMEOUT)
        self.notify()
        self._slot_freed.set()

    def _bounded(self) -> anyio.CancelScope:
        """The scope of the loop's next statement: given up after the statement deadline
        (a connection whose path died), sooner once a stop bounds it; bounded by the stop
        already if the stop came first (while the loop handed tasks back, say)."""
        bound = CLAIM_STOP_TIMEOUT if self._stopping else statement_deadline(self.lease)
        self._statement = scope = anyio.CancelScope(deadline=anyio.current_time() + bound)
        return scope

    def paused(self) -> None:
        """The queue was paused: what was claimed ahead goes back unstarted, as does what
        a claim in flight brings (running tasks finish)."""
        self._pauses += 1
        self._returning.extend(a for _, a in self.waiting)
        self.waiting.clear()
        self.notify()
        self._slot_freed.set()

    def _released(self) -> None:
        self.in_flight -= 1
        self._releases += 1
        self._stalled = False
        self._launch_waiting()
        self._slot_freed.set()

    def _launch_waiting(self) -> None:
        while self.waiting and self.in_flight < self.limit and not self._stopping:
            _, attempt = self.waiting.popleft()
            self.in_flight += 1
            self.launch(attempt, self._released)

    def _ahead(self) -> int:
        if self.burst or self._stalled:
            return 0
        if self.claim_ahead is not None:
            return self.claim_ahead
        return ahead(self.limit, self._rate, self._round_trip)

    def _measure(self, round_trip: float) -> None:
        """Update how fast slots free up and how long a claim takes (moving averages)."""
        now = time.monotonic()
        span = now - self._measured_at
        if span > 0:
            rate = (self._releases - self._releases_measured) / span
            self._rate = rate if self._rate == 0 else 0.5 * self._rate + 0.5 * rate
        self._releases_measured = self._releases
        self._measured_at = now
        self._round_trip = (
            round_trip if self._round_trip == 0 else 0.5 * self._round_trip + 0.5 * round_trip
        )

    async def run(self, tg: TaskGroup | None = None) -> None:
        try:
            await self._serve()
        finally:
            if self._conn is not None:
                await self._conn.release()

    async def _serve(self) -> None:
        backoff = 0.1
        if self.polled:
            # A queue with nothing to do costs no statement at startup either: 500 queues
            # claimed at once took every connection of the pool (and of the server, for a
            # few such daemons). The first poll, or a notification, wakes this loop.
            self._woken(await self._wait_for_wakeup(None))
        while not self._stopping:
            if self._returning:
                returning, self._returning = self._returning, []
                await self._give_back(returning)
            self._launch_waiting()
            free = self.limit - self.in_flight
            target = self._ahead()
            room = free + target - len(self.waiting)
            # A free slot is filled at once; tasks in hand are topped up only once half of
            # them have gone, so that claims stay batches.
            if room <= 0 or (free == 0 and room < max(1, target // 2)):
                await self._wait_for_slot()
                continue
            self._notified = None
            started = time.monotonic()
            releases = self._releases
            pauses = self._pauses
            tasks: list[Claimed] = []
            claim = self._bounded()
            try:
                with claim:
                    tasks = await self.store.claim(
                        self.queue, self.names, room, self.lease, self.worker_id, self._conn
                    )
                    if tasks and tracing.tracer() is not None:
                        tasks = await self._traced(tasks)
            except Exception as exc:
                self._statement = None
                if is_fatal(exc):
                    raise
                error = redact(f"{type(exc).__name__}: {exc}")
                if is_transient(exc):
                    log.warning("claim_failed", queue=self.queue, error=error,
                                retry_in=round(backoff, 2))
                elif self._errors.new(error):
                    # Not a blip (a privilege revoked, a bad row of durable.queues): said
                    # once; this queue waits, the others go on.
                    log.error("claim_failed", queue=self.queue, error=error,
                              note="this queue is not served until the error clears")
                await self._wait_for_wakeup(backoff)
                backoff = min(backoff * 2, self.poll_interval)
                continue
            self._statement = None
            self._errors.clear()
            if claim.cancelled_caught:
                if self._stopping:
                    log.warning("claim_abandoned", queue=self.queue, note="stopping, and the "
                                "database did not answer; what it claimed runs when the "
                                "leases expire")
                    break
                # No answer within the deadline: its connection is gone, and the next
                # claim takes a new one. What this one claimed, if anything, is reaped.
                log.warning("claim_timed_out", queue=self.queue,
                            seconds=statement_deadline(self.lease))
                await self._wait_for_wakeup(backoff)
                backoff = min(backoff * 2, self.poll_interval)
                continue
            backoff = 0.1
            now = time.monotonic()
            self._measure(now - started)
            self.claimed_once.set()
            if tasks:
                self._held = 0.0
                if logs.enabled("debug"):
                    log.debug("tasks_claimed", queue=self.queue, ids=[t.id for t in tasks])
            for task in tasks:
                self.claimed += 1
                held = self.hold(task)
                if pauses == self._pauses:
                    self.waiting.append((now, held))
                else:  # paused while this claim was in flight
                    self._returning.append(held)
            self._launch_waiting()
            if len(tasks) == room:
                continue  # there may be more ready work: claim again once there is room
            if self.burst:
                if self._releases != releases:
                    # An outcome was written while this claim ran (a retry may be due that
                    # its snapshot could not see): look again before deciding anything.
                    continue
                if self.in_flight == 0 and not tasks:
                    return
                # Nothing more is ready: look again as soon as a running task has ended
                # (the daemon frees a burst's slots once the outcome is written).
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            if self.waiting:
                # Claimed ahead, but no more ready now: wait for the slots to take them.
                await self._wait_for_slot()
                continue
            await self._idle()
        if self._due is not None:
            self._due.cancel()
        await self._give_back_waiting()

    async def _traced(self, tasks: list[Claimed]) -> list[Claimed]:
        """The claimed tasks with their stored trace contexts, which the claim leaves out
        (reading them costs a statement, paid only while tracing is on)."""
        try:
            contexts = await self.store.trace_contexts([t.id for t in tasks])
        except Exception:
            # These tasks are claimed now: run them untraced rather than lose them until
            # their leases expire.
            return tasks
        return [t._replace(trace_context=contexts.get(t.id)) for t in tasks]

    async def _wait_for_slot(self) -> None:
        """Wait for a slot to come free; tasks claimed ahead that waited too long for
        one go back to the queue, where another daemon can take them."""
        self._slot_freed.clear()
        if not self.waiting:
            await self._slot_freed.wait()
            return
        oldest = self.waiting[0][0]
        timeout = oldest + self.hold_limit - time.monotonic()
        with anyio.move_on_after(max(0.0, timeout)):
            await self._slot_freed.wait()
            return
        if self.waiting and self.waiting[0][0] == oldest:
            # Slots are not turning over: hand these back, and claim nothing ahead until
            # a slot frees up.
            self._rate = 0.0
            self._stalled = True
            await self._give_back_waiting()

    async def _give_back_waiting(self) -> None:
        attempts = self._returning + [a for _, a in self.waiting]
        self._returning = []
        self.waiting.clear()
        await self._give_back(attempts)

    async def _give_back(self, attempts: list[Attempt]) -> None:
        if not attempts:
            return
        await self.give_back(attempts)
        self.given_back += len(attempts)  # once written: whoever reads it finds them queued

    async def _idle(self) -> None:
        delay: float | None = None
        due: datetime | None = None
        # The tasks just launched start first; this loop's next statement can wait for them.
        await asyncio.sleep(0)
        # A stop bounds this look as it does a claim: on a path that stopped answering, a
        # look just sent would hold the loop, and the shutdown, until the path came back.
        with self._bounded():
            try:
                due = await self.store.next_due(self.queue, self.names, self._conn)
                if due is not None and due <= self.store.now():
                    # Due work we could not claim: a fleet-wide limit may be holding it back.
                    delay = await self.store.claim_delay(self.queue, self._conn)
            except Exception as exc:
                if is_fatal(exc):
                    raise
                due = None
        self._statement = None
        if self._stopping:
            return
        timeout = idle_wait(self.poll_interval, due, self.store.now())
        if delay is not None:
            timeout = max(timeout or 0.0, delay)
        elif due is not None and due <= self.store.now():
            # Due but not claimable: held by another daemon's claim, or by a fleet-wide limit
            # (a slot coming free sends a notification). Look again, backing off.
            self._held = min(self.poll_interval, max(0.02, self._held * 2))
            timeout = self._held
        if not self.polled:
            timeout = self.poll_interval if timeout is None else min(timeout, self.poll_interval)
        elif timeout is not None and timeout >= self.poll_interval:
            # The daemon's poll looks sooner (at every queue in one statement): a timer of
            # its own per queue made an idle daemon's statements grow with its queues.
            timeout = None
        if timeout is None and self._conn is not None:
            # Quiet for a whole poll interval: the kept connection goes back to the pool
            # (which closes what it no longer needs), and the next claim takes one again.
            woken = await self._wait_for_wakeup(self.poll_interval)
            if woken == "timer":
                await self._conn.release()
                woken = await self._wait_for_wakeup(None)
        else:
            woken = await self._wait_for_wakeup(timeout)
        self._woken(woken)

    def _woken(self, source: str) -> None:
        self.wakeups["notify" if source == "notify" else "poll"] += 1

    async def _wait_for_wakeup(self, timeout: float | None) -> str:
        """Wait for notify() or ``timeout`` seconds (None: no timer); the hint's source, or
        'timer'. A future and a timer rather than a cancel scope and an event: an idle loop
        wakes with less to do."""
        if self._notified is not None:
            return self._notified
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[str] = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _resolve, waiter, "timer")
        self._waiter = waiter
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None


def _resolve(waiter: asyncio.Future[str], value: str) -> None:
    if not waiter.done():
        waiter.set_result(value)

"""Attempts: every task this daemon holds, from its claim to its outcome.

An attempt is held from the moment its claim returns, whether or not it has a slot yet:
heartbeats extend its lease, a cancel reaches it, and a shutdown hands it back. Its code
runs as a plain asyncio task; the runner runs it and writes its outcome.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio

from durable.logs import get_logger, redact
from durable.metrics import Metrics
from durable.models import Claimed
from durable.shutdown import Shutdown
from durable.store import Store, is_fatal

log = get_logger("durable.attempts")


class Attempt:
    """One claimed attempt of a task: its claim, its job, and how to stop it."""

    __slots__ = ("finishing", "job", "reason", "release_slot", "running", "task")

    def __init__(self, task: Claimed, release_slot: Callable[[], None] = lambda: None) -> None:
        self.task = task
        self.release_slot = release_slot
        """Gives the queue's slot back; called once the task's code has returned (set when
        the attempt is launched into a slot)."""
        self.job: asyncio.Task[None] | None = None
        self.reason: str | None = None
        """Why the daemon stopped it: 'cancelled' (asked by a user), 'lease_lost', 'shutdown'."""
        self.running = False
        """The task's code has started: a stop from now on cancels it."""
        self.finishing = False

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        elif reason != "shutdown" or self.reason == "shutdown":
            # Stopped already (and cancelled then, if its code was running): it may be
            # cleaning up, a finally that awaits or a transaction rolling back, which a
            # cancel at every heartbeat that finds the lease lost again cut short. A
            # shutdown cancels once more: code that went on past its cancel must end now.
            return
        # Only while the code runs. Before, the job may not have taken its first step,
        # and a task cancelled then never runs a line (nor its finally): the runner sees
        # the reason when it starts. After, its outcome is being written: that write is
        # not interrupted (it would leave the task to wait for its lease to expire).
        if self.running and not self.finishing and self.job is not None:
            self.job.cancel()


class Attempts:
    """The attempts a daemon holds: launched into slots, kept leased, stopped, handed back."""

    def __init__(
        self,
        store: Store,
        run: Callable[[Attempt], Coroutine[Any, Any, None]],
        shutdown: Shutdown,
        metrics: Metrics,
        *,
        worker_id: uuid.UUID,
        lease: float,
        burst: bool = False,
        writing: Callable[[], Sequence[Claimed]] = list,
    ) -> None:
        self.store = store
        self._run = run
        self.shutdown = shutdown
        self.metrics = metrics
        self.worker_id = worker_id
        self.lease = lease
        self.burst = burst
        self._writing = writing
        """Tasks whose attempts have ended but whose results still wait for their write."""
        self.held: dict[int, Attempt] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._emptied = anyio.Event()
        self._beat_now = anyio.Event()
        self.last_heartbeat = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- from claim to outcome ------------------------------------------------------

    def hold(self, task: Claimed) -> Attempt:
        """A claimed task, held from now on (see the module's docstring)."""
        attempt = Attempt(task)
        self.held[task.id] = attempt
        self.metrics.task(task.queue, task.name).claimed += 1
        return attempt

    def launch(self, attempt: Attempt, released: Callable[[], None]) -> None:
        """Run a held attempt in a slot; ``released`` gives the slot back (once)."""
        # Attempts are plain asyncio tasks: an anyio task group and cancel scope per task
        # cost more than running a no-op task does.
        task = attempt.task
        done = False

        def release_once() -> None:
            nonlocal done
            if not done:
                done = True
                released()

        # A burst frees the slot only once the outcome is written: its loop then looks
        # again at once, and must see a retry that is already due.
        if not self.burst:
            attempt.release_slot = release_once

        def ended(job: asyncio.Task[None]) -> None:
            self._jobs.discard(job)
            self._forget(attempt)
            release_once()
            if not job.cancelled():
                error = job.exception()
                if isinstance(error, Exception):
                    # A fault in durable itself must not take the daemon down with it;
                    # the task's lease expires and another attempt runs it.
                    log.error("runner_error", task_id=task.id, name=task.name,
                              exc_info=error)

        loop = self._loop
        if loop is None:
            # Asked once: asking asyncio for the running loop costs a getpid() call.
            loop = self._loop = asyncio.get_running_loop()
        # The runner's coroutine is the task's own, with what ends the attempt in a done
        # callback: a workflow resumes once per step through every coroutine level
        # between its task and the step, and a wrapper here would be one more.
        attempt.job = job = loop.create_task(self._run(attempt))
        self._jobs.add(job)
        job.add_done_callback(ended)

    def _forget(self, attempt: Attempt) -> None:
        if self.held.get(attempt.task.id) is attempt:
            del self.held[attempt.task.id]
        if not self.held:
            self._emptied.set()

    def cancel(self, task_id: int) -> None:
        """A user asked for this task's cancel (a notification)."""
        attempt = self.held.get(task_id)
        if attempt is not None:
            log.info("task_cancel_requested", task_id=task_id)
            attempt.stop("cancelled")

    async def give_back(self, attempts: list[Attempt]) -> None:
        """Hand tasks claimed ahead back to the queue without spending an attempt."""
        for a in attempts:
            self._forget(a)
        back = await self.release(attempts)
        if back is not None:
            log.debug("tasks_given_back", count=len(back), ids=sorted(back))

    async def release(self, attempts: Sequence[Attempt]) -> set[int] | None:
        """Hand tasks back to the queue at once, without spending an attempt, even while
        shutting down; None when the database cannot be reached: their leases expire and
        they run then."""
        released: set[int] | None = None
        error = "the database did not answer in time"
        with self.shutdown.last_writes():
            try:
                released = await self.store.release([(a.task.id, a.task.token) for a in attempts])
            except Exception as exc:
                # Whatever keeps the database from answering now (a connection lost, a
                # login refused as the pool replaces it), the leases settle it later.
                if is_fatal(exc):
                    raise
                error = redact(f"{type(exc).__name__}: {exc}")
        if released is None:
            log.warning("tasks_not_released", count=len(attempts), error=error,
                        note="their leases will expire and they will run then")
        return released

    # -- shutdown -----------------------------------------------------------------------

    async def drain(self) -> None:
        """Let running attempts finish within the grace period, then hand them back."""
        if self.held and not self.shutdown.forced.is_set():
            log.info("daemon_draining", running=len(self.held), grace=self.shutdown.grace)
            with self.shutdown.grace_scope():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._wait_held, tg)
                    tg.start_soon(self._wait_forced, tg)
        left = [a for a in self.held.values() if not a.finishing]
        for a in left:
            a.stop("shutdown")
        # Shielded: the leases must be released even though we are shutting down, so that
        # another daemon takes these tasks now rather than when the leases expire.
        with self.shutdown.last_writes() as scope:
            stopped = {a.job for a in left if a.job is not None}
            if stopped:
                # A stopped job ends at once, unless its code swallows the cancel and runs
                # on: the others go back without waiting for it, within half the time left.
                await asyncio.wait(stopped, timeout=(scope.deadline - anyio.current_time()) / 2)
            back = [a for a in left if a.job is None or a.job.done()]
            if back:
                released = await self.release(back)
                if released is not None:
                    log.info("tasks_released", count=len(released), ids=sorted(released))
            while self._jobs:
                await asyncio.wait(list(self._jobs))
        if scope.cancelled_caught:
            running = sorted(a.task.id for a in self.held.values() if not a.finishing)
            if running:
                # Not handed back: its code is still running here. Its lease hands it over.
                log.warning("task_ignored_shutdown", count=len(running), ids=running,
                            note="its lease will expire and it will run again")
            if len(self._jobs) > len(running):
                # Outcomes still being written when the database stopped answering.
                log.warning("task_outcome_not_written", count=len(self._jobs) - len(running),
                            note="their leases will expire and they will run again")
            self.abandon()

    def abandon(self) -> None:
        """Cancel every attempt's job at once (the daemon is being torn down)."""
        for job in list(self._jobs):
            job.cancel()

    async def _wait_held(self, tg: anyio.abc.TaskGroup) -> None:
        while self.held:
            self._emptied = anyio.Event()
            await self._emptied.wait()
        tg.cancel_scope.cancel()

    async def _wait_forced(self, tg: anyio.abc.TaskGroup) -> None:
        await self.shutdown.forced.wait()
        tg.cancel_scope.cancel()

    # -- leases -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """The heartbeat (lease extension) has succeeded within the last lease period."""
        return time.monotonic() - self.last_heartbeat < self.lease

    def beat_soon(self) -> None:
        """Beat now rather than at the next interval (the listener came back: a cancel it
        missed is read by the heartbeat)."""
        self._beat_now.set()

    async def heartbeats(self) -> None:
        """Extend every lease this daemon holds in one statement, every lease/3 seconds."""
        interval = self.lease / 3
        while True:
            with anyio.move_on_after(interval):
                await self._beat_now.wait()
            self._beat_now = anyio.Event()
            try:
                # A half-open connection never answers and no error ever comes: without a
                # deadline the heartbeat would hang and the attempts below would go on
                # running long after other daemons took their tasks over.
                with anyio.fail_after(interval):
                    await self.beat()
            except Exception as exc:
                if is_fatal(exc):
                    raise
                silence = time.monotonic() - self.last_heartbeat
                log.warning(
                    "heartbeat_failed", error=redact(f"{type(exc).__name__}: {exc}"),
                    silence=round(silence, 1),
                )
                if silence > self.lease:
                    # Our leases have expired by now and others may be running these tasks:
                    # stop doing their work twice.
                    for a in list(self.held.values()):
                        a.stop("lease_lost")

    async def beat(self) -> None:
        held = list(self.held.values())
        # A result waits for its write after its attempt has ended (a large one, or a slow
        # server, can keep it waiting): its lease must hold until then.
        writing = self._writing()
        if held or writing:
            ids = [a.task.id for a in held] + [t.id for t in writing]
            tokens = [a.task.token for a in held] + [t.token for t in writing]
            kept = await self.store.extend_leases(ids, tokens, self.lease)
            for a in held:
                if self.held.get(a.task.id) is not a:
                    continue
                cancel = kept.get(a.task.id)
                if cancel is None:
                    if a.reason != "lease_lost":  # found again at each beat while it unwinds
                        log.warning("lease_lost", task_id=a.task.id, name=a.task.name)
                    a.stop("lease_lost")
                elif cancel and a.reason is None:
                    # The notification was lost (a listener reconnecting, say): the
                    # heartbeat reads the request too.
                    log.info("task_cancel_requested", task_id=a.task.id, via="heartbeat")
                    a.stop("cancelled")
        await self.store.worker_heartbeat(self.worker_id)
        self.last_heartbeat = time.monotonic()

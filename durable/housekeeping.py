"""Housekeeping: due timers, cron schedules, retention and the reaping of expired leases.

None of it is on a task's path; each loop's failures are logged and the daemon goes on
serving unless retrying cannot help (is_fatal).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

import anyio
from anyio.abc import TaskStatus

from durable.logs import Once, get_logger, redact
from durable.metrics import Metrics
from durable.registry import Registry
from durable.scheduler import declare_schedules, run_schedules
from durable.store import Store, is_fatal, is_transient, statement_deadline

log = get_logger("durable.housekeeping")

RETENTION_INTERVAL = 300.0
"""Seconds between prune passes when DURABLE_RETENTION is set."""


class Housekeeping:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        metrics: Metrics,
        clock: Callable[[], datetime],
        *,
        poll_interval: float,
        lease: float,
        retention: float | None = None,
        retention_interval: float = RETENTION_INTERVAL,
        retention_vacuum: str = "auto",
    ) -> None:
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        """The scheduler's clock (tests drive it)."""
        self.poll_interval = poll_interval
        self.lease = lease
        self.retention = retention
        self.retention_interval = retention_interval
        self.retention_vacuum = retention_vacuum
        self._vacuum_refused = False
        self.prune_runs = 0
        """Prune passes attempted under DURABLE_RETENTION (done, skipped or failed)."""
        self._timer_wakeup = asyncio.Event()
        self._schedule_wakeup = asyncio.Event()
        self._skipped: dict[str, Any] = {}
        """Schedules whose rows this daemon cannot use, left out until they change."""
        self._errors = {"timers": Once(), "schedules": Once(), "reaping": Once()}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every loop until cancelled (the daemon has recorded the schedules declared
        in code first: declare_schedules)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._timers)
            tg.start_soon(self._schedules)
            tg.start_soon(self._reaping)
            if self.retention is not None:
                tg.start_soon(self._retention, self.retention)
            task_status.started()

    def wake_timers(self, when: datetime | None = None) -> None:
        """A timer was set (or may have been missed): look for due ones now."""
        self._timer_wakeup.set()

    # -- timers ---------------------------------------------------------------------

    async def _timers(self) -> None:
        """Wake suspended workflows when their timers are due, and fail the tasks whose
        deadline passed before they ran, without busy polling."""
        while True:
            self._timer_wakeup.clear()
            timeout = self.poll_interval
            try:
                # One statement while nothing is due, three once something is: asked of
                # the database's clock, so a process whose clock is off neither skips
                # nor spins.
                # Bounded: on a connection whose path died no answer ever comes.
                with anyio.fail_after(statement_deadline(self.lease)):
                    wait = await self.store.timer_wait()
                    if wait is not None and wait <= 0:
                        await self.store.wake_timers()
                        await self.expire_deadlines()
                        wait = await self.store.timer_wait()
                if wait is not None:
                    timeout = max(0.005, min(timeout, wait))
                self._errors["timers"].clear()
            except Exception as exc:
                self._failed("timers", exc)
            with anyio.move_on_after(timeout):
                await self._timer_wakeup.wait()

    async def expire_deadlines(self) -> None:
        """Fail every task whose deadline passed while it was queued or waiting (a claim
        would fail it too, but nothing says one will come)."""
        expired = await self.store.expire_deadlines()
        if expired:
            self.metrics.deadlines_expired += len(expired)
            for task_id, name, status in expired:
                log.error("task_deadline_exceeded", task_id=task_id, name=name, status=status,
                          note="its deadline passed before it ran")

    # -- cron schedules -------------------------------------------------------------

    async def declare_schedules(self) -> None:
        """Record the schedules declared in code (``schedule=`` on a definition)."""
        await declare_schedules(self.store, self.registry, self.clock())

    async def run_schedules(self) -> datetime | None:
        """Start every schedule whose tick has come; returns when the next one is due."""
        return await run_schedules(self.store, self.registry, self.clock(), self._skipped)

    async def _schedules(self) -> None:
        while True:
            self._schedule_wakeup.clear()
            timeout = self.poll_interval
            try:
                # While no tick is due, one statement (a skipped schedule, due for ever,
                # would pass this test every time: then the pass runs as it is).
                with anyio.fail_after(statement_deadline(self.lease)):
                    nxt = None if self._skipped else await self.store.next_schedule()
                    if self._skipped or (nxt is not None and nxt <= self.clock()):
                        nxt = await self.run_schedules()
                if nxt is not None:
                    until = (nxt - self.clock()).total_seconds()
                    timeout = max(0.01, min(timeout, until))
                self._errors["schedules"].clear()
            except Exception as exc:
                self._failed("schedules", exc)
            with anyio.move_on_after(timeout):
                await self._schedule_wakeup.wait()

    # -- expired leases ---------------------------------------------------------------

    async def _reaping(self) -> None:
        """Hand back or fail the tasks of any daemon whose leases have expired, every
        lease/3 seconds (as often as leases are extended)."""
        interval = self.lease / 3
        while True:
            await anyio.sleep(interval)
            try:
                # Bounded like the heartbeat: a half-open connection never answers.
                with anyio.fail_after(interval):
                    reaped = await self.store.reap_expired()
                self._errors["reaping"].clear()
            except Exception as exc:
                self._failed("reaping", exc)
                continue
            self.metrics.leases_reclaimed += len(reaped)
            if reaped:
                log.warning("leases_reclaimed", count=len(reaped), ids=[i for i, _ in reaped])

    # -- retention --------------------------------------------------------------------

    async def _retention(self, older_than: float) -> None:
        """Prune finished task trees older than ``older_than`` now and every few minutes.

        Every daemon tries; an advisory lock lets one of them prune at a time.
        """
        while True:
            try:
                done = await self.store.prune(older_than, vacuum=self.retention_vacuum)
            except Exception as exc:
                # Retention is housekeeping: whatever goes wrong, serving tasks goes on.
                log.warning("prune_failed", error=redact(f"{type(exc).__name__}: {exc}"))
            else:
                if done is None:
                    log.debug("prune_skipped", reason="another process is pruning")
                else:
                    self.metrics.tasks_pruned += done.tasks
                    if done.tasks or done.workers:
                        log.info("tasks_pruned", tasks=done.tasks, events=done.events,
                                 signals=done.signals, workers=done.workers)
                    self._vacuumed(done.vacuumed)
            self.prune_runs += 1
            await anyio.sleep(self.retention_interval)

    def _vacuumed(self, vacuumed: bool | None) -> None:
        """Warn once when a pass was to vacuum and its role may not: with autovacuum off,
        nothing else reclaims what claims and pruning leave dead."""
        if vacuumed is False and not self._vacuum_refused:
            log.warning(
                "vacuum_not_permitted",
                note="only the owner of durable's tables may VACUUM them: run `durable "
                "prune --vacuum` as that role on a schedule, or turn autovacuum on",
            )
        self._vacuum_refused = vacuumed is False

    def _failed(self, loop: str, exc: Exception) -> None:
        """A loop's pass failed: logged as a warning if it is a blip, once as an error if
        not; raised if retrying cannot help."""
        if is_fatal(exc):
            raise exc
        error = redact(f"{type(exc).__name__}: {exc}")
        if is_transient(exc):
            log.warning(f"{loop}_failed", error=error)
        elif self._errors[loop].new(error):
            log.error(f"{loop}_failed", error=error, note="retried every poll interval")

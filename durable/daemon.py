"""The composition root: pool, listener, queue loops, heartbeats, timers, shutdown."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from durable import logs, sdnotify
from durable.batch import Batcher
from durable.codec import describe_error
from durable.errors import DurableError
from durable.http import HttpServer, Probes
from durable.listener import Listener
from durable.logs import Once, get_logger, redact
from durable.metrics import Metrics
from durable.models import Checkpoint, Claimed
from durable.registry import Registry
from durable.runner import Attempt, Completion, Runner
from durable.scheduler import declare_schedules, run_schedules
from durable.settings import Settings
from durable.store import KeptConnection, Store, is_fatal, is_transient
from durable.worker import QueueWorker

log = get_logger("durable.daemon")

WARM_CONNECTIONS = 5
"""Pool connections a daemon opens at startup; the rest open as they are needed."""

KEPT_CONNECTIONS = 8
"""Queue loops that keep a connection of their own for their claims (the first ones)."""

FLUSH_CONNECTIONS = 3
"""Kept for the group commits: one for completions, one per checkpoint flight."""

RETENTION_INTERVAL = 300.0
"""Seconds between prune passes when DURABLE_RETENTION is set."""

FINAL_WRITES = 5.0
"""Seconds a shutdown gives its last writes once the grace period is over: outcomes still
being written, the hand-back of unfinished tasks, flushes in flight, the daemon's row and
the pool's close. A network path that stops answering never errors, so without a bound
those writes would hold the daemon until it is killed; a server that has not answered by
then is taken for unreachable, and the tasks' leases hand them over when they expire."""

GC_YOUNG = 10_000
"""Allocations between collections of the youngest generation (Python's default: 700)."""


def tune_gc() -> None:
    """Set the garbage collector for a process that is a daemon, once its code is loaded.

    Every step, claim and flush allocates futures, tasks and records that die within
    milliseconds; at Python's default threshold the collector ran every few hundred of
    them and took a tenth of a busy daemon's CPU (measured at concurrency 256: 0.48 s of
    collections in a 4.5 s run, 0.06 s at 5,000). Freezing what is loaded already (modules,
    the registry) keeps it out of every later full collection.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


class Daemon:
    """``durable run``: serves the configured queues until stopped.

    ``burst=True`` returns once no work is ready and nothing is running (for tests and
    one-shot jobs). ``stop()`` begins a graceful shutdown: claiming stops, running tasks
    get ``shutdown_grace`` seconds, then they are cancelled and handed back at once.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        dsn: str | None,
        *,
        listen_dsn: str | None = None,
        burst: bool = False,
        pool_size: int = 10,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.dsn = dsn
        self.listen_dsn = listen_dsn or dsn
        self.burst = burst
        self.pool_size = pool_size
        self.clock = clock or self._database_now
        """The scheduler's clock (tests drive it); by default the database's, as for
        leases and timers."""
        self.id = uuid.uuid4()
        self.attempts: dict[int, Attempt] = {}
        self.workers: dict[str, QueueWorker] = {}
        self.listener: Listener | None = None
        self.store: Store | None = None
        self.started = anyio.Event()
        self.ready = anyio.Event()
        """Set once LISTEN is live and every queue loop has claimed once (systemd READY=1)."""
        self._stop = anyio.Event()
        self._force = anyio.Event()
        self._grace_deadline = math.inf
        self._final_deadline = math.inf
        """When the shutdown's last writes give up (see FINAL_WRITES); set by stop()."""
        self._timer_wakeup = asyncio.Event()
        self._beat_now = anyio.Event()
        self._errors = {"timers": Once(), "schedules": Once()}
        self._completions: Batcher[Completion, bool] | None = None
        """Results waiting to be written: their leases are kept until they are."""
        self._skipped: dict[str, Any] = {}
        """Schedules whose rows this daemon cannot use, left out until they change."""
        self._schedule_wakeup = asyncio.Event()
        self._last_heartbeat = time.monotonic()
        self._attempt_done = anyio.Event()
        self._jobs: set[asyncio.Task[None]] = set()
        self._root: anyio.CancelScope | None = None
        self.metrics = Metrics()
        self.metrics.watch(self.workers, lambda: self.listener)
        self._completing: list[KeptConnection] = []
        self._checkpointing: list[KeptConnection] = []
        self.http: HttpServer | None = None
        """The /healthz, /readyz, /metrics endpoint when DURABLE_HTTP is set (port: .http.port)."""
        self.retention_interval = RETENTION_INTERVAL
        self.prune_runs = 0
        """Prune passes attempted under DURABLE_RETENTION (done, skipped or failed)."""

    def _database_now(self) -> datetime:
        return self.store.now() if self.store is not None else datetime.now(UTC)

    # -- control ---------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful shutdown; a second call skips the grace period."""
        now = anyio.current_time()
        if self._stop.is_set():
            self._force.set()
            self._final_deadline = min(self._final_deadline, now + FINAL_WRITES)
        else:
            sdnotify.notify("STOPPING=1\nSTATUS=stopping")
            # The grace period counts from the stop, and the last writes get FINAL_WRITES
            # after it: the whole shutdown is bounded, whatever the network does.
            self._grace_deadline = now + self.settings.shutdown_grace
            self._final_deadline = self._grace_deadline + FINAL_WRITES
        self._stop.set()
        for w in self.workers.values():
            w.stop()
        if not self.started.is_set() and self._root is not None:
            # Still starting (say the listener cannot reach its server yet): nothing has
            # been claimed, so there is nothing to drain; stop waiting and exit.
            self._root.cancel()

    def _on_ready(self, queue: str) -> None:
        w = self.workers.get(queue)
        if w is not None:
            w.notify()

    def _on_control(self, payload: str) -> None:
        command, _, arg = payload.partition(":")
        if command == "cancel" and arg.isdigit():
            attempt = self.attempts.get(int(arg))
            if attempt is not None:
                log.info("task_cancel_requested", task_id=attempt.task.id)
                attempt.stop("cancelled")

    def _catch_up(self) -> None:
        """The listener is back: what it may have missed is looked for now (ready work,
        due timers, and, through a heartbeat, cancels of running tasks)."""
        for w in self.workers.values():
            w.notify()
        self._timer_wakeup.set()
        self._beat_now.set()

    def _on_timer(self, when: datetime) -> None:
        self._timer_wakeup.set()

    # -- running -----------------------------------------------------------------------

    async def run(
        self,
        *,
        handle_signals: bool = False,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        names = self.registry.names()
        queues = self.settings.queue_limits
        # The hot path's connections (claims, completions, two checkpoint flights, the
        # heartbeat) open now, so the first tasks wait for no connect and no cold backend.
        # The first KEPT_CONNECTIONS queue loops each keep one for their claims, and the
        # group commits keep theirs, on top of the pool's size: a flush takes no pool
        # checkout (on an idle pool that costs about a round trip of its own).
        kept = min(len(queues), KEPT_CONNECTIONS)
        self.store = store = await Store.open(
            self.dsn,
            min_size=min(WARM_CONNECTIONS, self.pool_size) + kept,
            max_size=self.pool_size + kept + FLUSH_CONNECTIONS,
            warm=True,
        )
        self._completing = [store.kept_connection()]
        self._checkpointing = [store.kept_connection() for _ in range(FLUSH_CONNECTIONS - 1)]
        try:
            if self.settings.http is not None:
                await self._listen_http(store, *self.settings.http)
            await store.register_worker(self.id, queues, names)
            self._completions = completions = Batcher[Completion, bool](self._complete)
            # Two flights: steps go out while the previous batch commits (measured over
            # eight A/B pairs: +9% three-step workflows/s at concurrency 32, even at 128;
            # a second flight for completions measured no better).
            checkpoints: Batcher[Checkpoint, bool] = Batcher(
                self._checkpoint, flights=len(self._checkpointing)
            )
            runner = Runner(
                store, self.registry, completions, checkpoints, self._on_timer,
                metrics=self.metrics,
            )
            self.listener = Listener(
                self.listen_dsn,
                on_ready=self._on_ready,
                on_control=self._on_control,
                on_reconnect=self._catch_up,
            )
            async with anyio.create_task_group() as root:
                self._root = root.cancel_scope
                if handle_signals:
                    root.start_soon(self._signals)
                if self.http is not None:
                    # Before the listener: /healthz and /readyz answer while it connects.
                    await root.start(self.http.run)
                await root.start(self.listener.run)
                await root.start(completions.run)
                await root.start(checkpoints.run)
                root.start_soon(self._heartbeats)
                root.start_soon(self._timers)
                if self.settings.retention is not None:
                    root.start_soon(self._retention, self.settings.retention)
                await self.declare_schedules()
                root.start_soon(self._schedules)
                for i, (queue, limit) in enumerate(queues.items()):
                    self.workers[queue] = QueueWorker(
                        queue=queue,
                        limit=limit,
                        names=[d.name for d in self.registry.definitions()],
                        store=store,
                        worker_id=self.id,
                        lease=self.settings.lease,
                        poll_interval=self.settings.poll_interval,
                        hold=self._hold,
                        launch=self._launcher(runner),
                        give_back=self._give_back,
                        burst=self.burst,
                        claim_ahead=self.settings.claim_ahead,
                        keep_connection=i < kept,
                    )
                root.start_soon(self._systemd)
                log.info(
                    "daemon_started",
                    worker_id=str(self.id),
                    queues=queues,
                    names=names,
                    pid=os.getpid(),
                )
                self.started.set()
                task_status.started()
                async with anyio.create_task_group() as loops:
                    for w in self.workers.values():
                        loops.start_soon(w.run)
                # Every queue loop has returned: stopping, or a burst ran dry.
                await self._drain()
                with self._last_writes() as scope:
                    await completions.drain()
                    await checkpoints.drain()
                if scope.cancelled_caught:
                    log.warning("task_outcome_not_written", note="a flush in flight got no "
                                "answer; those leases will expire and the tasks run again")
                completions.close()
                checkpoints.close()
                root.cancel_scope.cancel()
        finally:
            if self.http is not None:
                self.http.close()
            for job in self._jobs:  # cancelled from outside: leave no orphaned attempt behind
                job.cancel()
            with self._last_writes() as scope:
                for conn in self._completing + self._checkpointing:
                    await conn.release()
                try:
                    await store.worker_stopped(self.id)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                await store.close()
            if scope.cancelled_caught:
                store.terminate()  # the server stopped answering: close without a goodbye
                log.warning("database_unreachable_at_stop", note="connections closed at once")
            log.info("daemon_stopped", worker_id=str(self.id))

    async def _listen_http(self, store: Store, host: str, port: int) -> None:
        """Bind DURABLE_HTTP's socket now, so that a port in use stops the start cleanly."""
        probes = Probes(store, self.metrics, lambda: self.listener)
        self.http = HttpServer(host, port, probes.routes())
        try:
            await self.http.listen()
        except OSError as exc:
            # asyncio's bind error reads "error while attempting to bind on ...: <reason>".
            reason = (exc.strerror or str(exc)).rpartition(": ")[2] or repr(exc)
            raise DurableError(
                f"DURABLE_HTTP: cannot listen on {host or '*'}:{port}: {reason}"
            ) from None

    def _hold(self, task: Claimed) -> Attempt:
        """A claimed task, held from now on: heartbeats cover it, a cancel reaches it and
        shutdown hands it back, whether or not it has a slot yet."""
        attempt = Attempt(task)
        self.attempts[task.id] = attempt
        self.metrics.task(task.queue, task.name).claimed += 1
        return attempt

    def _launcher(self, runner: Runner) -> Callable[[Attempt, Callable[[], None]], None]:
        # Attempts are plain asyncio tasks: an anyio task group and cancel scope per task
        # cost more than running a no-op task does.
        loop = asyncio.get_running_loop()

        def launch(attempt: Attempt, released: Callable[[], None]) -> None:
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

            async def go() -> None:
                try:
                    await runner.run(attempt)
                except Exception as exc:
                    # The task's lease expires and another attempt runs it. A fault in
                    # durable itself must not take the daemon down with it; a database
                    # that kept refusing the outcome is the environment's, not a bug.
                    if is_fatal(exc):
                        log.exception("runner_error", task_id=task.id, name=task.name)
                    else:
                        log.warning("task_outcome_not_written", task_id=task.id,
                                    name=task.name, error=describe_error(exc))
                finally:
                    self._forget(attempt)
                    release_once()

            attempt.job = job = loop.create_task(go())
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)

        return launch

    def _forget(self, attempt: Attempt) -> None:
        if self.attempts.get(attempt.task.id) is attempt:
            del self.attempts[attempt.task.id]
        if not self.attempts:
            self._attempt_done.set()

    async def _give_back(self, attempts: list[Attempt]) -> None:
        """Hand tasks claimed ahead back to the queue without spending an attempt."""
        for a in attempts:
            self._forget(a)
        back = await self._release(attempts)
        if back is not None:
            log.debug("tasks_given_back", count=len(back), ids=sorted(back))

    async def _release(self, attempts: Sequence[Attempt]) -> set[int] | None:
        """Hand tasks back to the queue at once, without spending an attempt, even while
        shutting down (shielded); None when the database cannot be reached: their leases
        expire and they run then."""
        assert self.store is not None
        released: set[int] | None = None
        error = "the database did not answer in time"
        with self._last_writes():
            try:
                released = await self.store.release([(a.task.id, a.task.token) for a in attempts])
            except Exception as exc:
                if not is_transient(exc):
                    raise
                error = redact(str(exc))
        if released is None:
            log.warning("tasks_not_released", count=len(attempts), error=error,
                        note="their leases will expire and they will run then")
        return released

    def _last_writes(self) -> anyio.CancelScope:
        """A scope for a write that must be made even while shutting down: shielded from
        cancellation, and bounded: by the shutdown's deadline for its last writes, or
        FINAL_WRITES from now outside a shutdown."""
        deadline = self._final_deadline
        if deadline == math.inf:
            deadline = anyio.current_time() + FINAL_WRITES
        return anyio.CancelScope(shield=True, deadline=deadline)

    async def _drain(self) -> None:
        """Let running attempts finish within the grace period, then hand them back."""
        if self.attempts and not self._force.is_set():
            log.info("daemon_draining", running=len(self.attempts), grace=self.settings.shutdown_grace)
            sdnotify.notify(f"STATUS=draining {len(self.attempts)} running task(s)")
            grace = self._grace_deadline
            if grace == math.inf:  # a burst that ran dry: no stop() started the clock
                grace = anyio.current_time() + self.settings.shutdown_grace
            with anyio.CancelScope(deadline=grace):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._wait_attempts, tg)
                    tg.start_soon(self._wait_force, tg)
        left = [a for a in self.attempts.values() if not a.finishing]
        for a in left:
            a.stop("shutdown")
        # Shielded: the leases must be released even though we are shutting down, so that
        # another daemon takes these tasks now rather than when the leases expire.
        with self._last_writes() as scope:
            await self._wait_jobs()
        if scope.cancelled_caught:
            # Outcomes still being written when the database stopped answering.
            log.warning("task_outcome_not_written", count=len(self._jobs),
                        note="their leases will expire and they will run again")
            for job in list(self._jobs):
                job.cancel()
        if left:
            released = await self._release(left)
            if released is not None:
                log.info("tasks_released", count=len(released), ids=sorted(released))

    async def _wait_attempts(self, tg: TaskGroup) -> None:
        while self.attempts:
            self._attempt_done = anyio.Event()
            await self._attempt_done.wait()
        tg.cancel_scope.cancel()

    async def _wait_jobs(self) -> None:
        """Wait for every attempt task to end (after the stopped ones write nothing)."""
        while self._jobs:
            await asyncio.wait(list(self._jobs))

    async def _wait_force(self, tg: TaskGroup) -> None:
        await self._force.wait()
        tg.cancel_scope.cancel()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal_received", signal=signal.Signals(signum).name)
                if self._stop.is_set():
                    self._force.set()
                self.stop()

    @property
    def healthy(self) -> bool:
        """The heartbeat (lease extension) has succeeded within the last lease period."""
        return time.monotonic() - self._last_heartbeat < self.settings.lease

    async def _systemd(self) -> None:
        """READY=1 once every queue is served, then WATCHDOG=1 while the daemon is healthy."""
        for w in self.workers.values():
            await w.claimed_once.wait()
        # The listener was live before the first claim (root.start), so this is ready.
        self.ready.set()
        if not self._stop.is_set():
            sdnotify.notify(f"READY=1\nSTATUS=serving {', '.join(self.workers)}")
            log.info("daemon_ready", worker_id=str(self.id))
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while True:
            # A hung event loop never gets here, and a daemon cut off from Postgres for
            # longer than a lease stops pinging: systemd restarts either one.
            if self.healthy:
                sdnotify.notify("WATCHDOG=1")
            await anyio.sleep(interval)

    async def _heartbeats(self) -> None:
        """Extend every lease this daemon holds in one statement, every lease/3 seconds."""
        assert self.store is not None
        interval = self.settings.lease / 3
        while True:
            with anyio.move_on_after(interval):
                await self._beat_now.wait()  # or at once: the listener came back
            self._beat_now = anyio.Event()
            try:
                # A half-open connection never answers and no error ever comes: without a
                # deadline the heartbeat would hang and the attempts below would go on
                # running long after other daemons took their tasks over.
                with anyio.fail_after(interval):
                    await self._beat()
            except Exception as exc:
                if is_fatal(exc):
                    raise
                silence = time.monotonic() - self._last_heartbeat
                log.warning(
                    "heartbeat_failed", error=redact(f"{type(exc).__name__}: {exc}"),
                    silence=round(silence, 1),
                )
                if silence > self.settings.lease:
                    # Our leases have expired by now and others may be running these tasks:
                    # stop doing their work twice.
                    for a in list(self.attempts.values()):
                        a.stop("lease_lost")

    async def _beat(self) -> None:
        assert self.store is not None
        held = list(self.attempts.values())
        # A result waits for its write after its attempt has ended (a large one, or a slow
        # server, can keep it waiting): its lease must hold until then.
        writing = self._completions.pending() if self._completions is not None else []
        if held or writing:
            ids = [a.task.id for a in held] + [c.task.id for c in writing]
            tokens = [a.task.token for a in held] + [c.task.token for c in writing]
            kept = await self.store.extend_leases(ids, tokens, self.settings.lease)
            for a in held:
                if self.attempts.get(a.task.id) is not a:
                    continue
                cancel = kept.get(a.task.id)
                if cancel is None:
                    log.warning("lease_lost", task_id=a.task.id, name=a.task.name)
                    a.stop("lease_lost")
                elif cancel and a.reason is None:
                    # The notification was lost (a listener reconnecting, say): the
                    # heartbeat reads the request too.
                    log.info("task_cancel_requested", task_id=a.task.id, via="heartbeat")
                    a.stop("cancelled")
        await self.store.worker_heartbeat(self.id)
        self._last_heartbeat = time.monotonic()
        reaped = await self.store.reap_expired()
        self.metrics.leases_reclaimed += len(reaped)
        if reaped:
            log.warning("leases_reclaimed", count=len(reaped), ids=[i for i, _ in reaped])

    async def _retention(self, older_than: float) -> None:
        """Prune finished task trees older than ``older_than`` now and every few minutes.

        Every daemon tries; an advisory lock lets one of them prune at a time.
        """
        assert self.store is not None
        while True:
            try:
                done = await self.store.prune(older_than)
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
            self.prune_runs += 1
            await anyio.sleep(self.retention_interval)

    async def _timers(self) -> None:
        """Wake suspended workflows when their timers are due, without busy polling."""
        assert self.store is not None
        while True:
            self._timer_wakeup.clear()
            timeout = self.settings.poll_interval
            try:
                await self.store.wake_timers()
                nxt = await self.store.next_timer()
                if nxt is not None:
                    until = (nxt - self.store.now()).total_seconds()
                    timeout = max(0.005, min(timeout, until))
                self._errors["timers"].clear()
            except Exception as exc:
                self._loop_failed("timers", exc)
            with anyio.move_on_after(timeout):
                await self._timer_wakeup.wait()

    def _loop_failed(self, loop: str, exc: Exception) -> None:
        """A housekeeping loop's pass failed: the daemon goes on serving unless retrying
        cannot help (is_fatal); an error that is not a blip is logged once."""
        if is_fatal(exc):
            raise exc
        error = redact(f"{type(exc).__name__}: {exc}")
        if is_transient(exc):
            log.warning(f"{loop}_failed", error=error)
        elif self._errors[loop].new(error):
            log.error(f"{loop}_failed", error=error, note="retried every poll interval")

    # -- cron schedules ----------------------------------------------------------------

    async def declare_schedules(self) -> None:
        """Record the schedules declared in code (``schedule=`` on a definition)."""
        assert self.store is not None
        await declare_schedules(self.store, self.registry, self.clock())

    async def run_schedules(self) -> datetime | None:
        """Start every schedule whose tick has come; returns when the next one is due."""
        assert self.store is not None
        return await run_schedules(self.store, self.registry, self.clock(), self._skipped)

    async def _schedules(self) -> None:
        while True:
            self._schedule_wakeup.clear()
            timeout = self.settings.poll_interval
            try:
                nxt = await self.run_schedules()
                if nxt is not None:
                    until = (nxt - self.clock()).total_seconds()
                    timeout = max(0.01, min(timeout, until))
                self._errors["schedules"].clear()
            except Exception as exc:
                self._loop_failed("schedules", exc)
            with anyio.move_on_after(timeout):
                await self._schedule_wakeup.wait()

    # -- group commit ------------------------------------------------------------------

    async def _complete(self, items: Sequence[Completion]) -> list[bool]:
        assert self.store is not None
        rows = [(c.task.id, c.task.token, c.result) for c in items]
        accepted: dict[int, bool] = {}
        for part in _by_size(rows):
            for delay in (0.1, 0.5, 2.0, None):
                try:
                    accepted.update(
                        await self.store.complete_many(part, _idle(self._completing))
                    )
                    break
                except Exception as exc:
                    if not is_transient(exc) or delay is None:
                        log.warning(
                            "task_outcome_not_written", count=len(part),
                            error=redact(str(exc)),
                            note="their leases will expire and they will run again",
                        )
                        break
                    await anyio.sleep(delay)
        info = logs.enabled("info")
        for c in items:
            t = c.task
            cancelled = accepted.get(t.id)
            if cancelled:
                # A cancel committed before the outcome: the task ended cancelled.
                self.metrics.task(t.queue, t.name).cancelled += 1
                log.info("task_cancelled", task_id=t.id, name=t.name, queue=t.queue,
                         note="the cancel came before the result")
            elif cancelled is not None:
                self.metrics.task(t.queue, t.name).completed += 1
                if info:
                    log.info("task_completed", task_id=t.id, name=t.name, queue=t.queue,
                             attempt=t.attempt, seconds=round(c.elapsed, 4))
            else:
                log.warning("task_write_rejected", task_id=t.id, name=t.name, queue=t.queue,
                            write="complete")
        return [c.task.id in accepted for c in items]

    async def _checkpoint(self, items: Any) -> list[Any]:
        """Accepted or not, for each checkpoint; an exception for one the server refused."""
        assert self.store is not None
        try:
            accepted = await self.store.checkpoint_many(items, _idle(self._checkpointing))
        except Exception as exc:
            if is_transient(exc) or len(items) == 1:
                raise
            # One row the server refuses fails the whole statement: each row again on its
            # own, so only the guilty one fails (names and payloads are checked before
            # they get here; this is the last line).
            log.warning("checkpoint_batch_refused", rows=len(items), error=f"{type(exc).__name__}: {exc}")
            return [await self._checkpoint_one(c) for c in items]
        self.metrics.checkpoints_written += len(accepted)
        return [(c.task_id, c.seq) in accepted for c in items]

    async def _checkpoint_one(self, item: Checkpoint) -> Any:
        assert self.store is not None
        try:
            accepted = await self.store.checkpoint_many([item])
        except Exception as exc:
            if is_transient(exc):
                raise
            return exc
        self.metrics.checkpoints_written += len(accepted)
        return (item.task_id, item.seq) in accepted


COMPLETION_BYTES = 4 * 1024 * 1024
"""Result text one completion statement carries at most (a single larger result goes
alone). The client encodes a statement's parameters on the event loop in one go: many
large results in one statement would hold it up for as long, heartbeats included."""


def _by_size(rows: list[tuple[int, int, str]]) -> list[list[tuple[int, int, str]]]:
    """``rows`` in order, cut into statements of at most COMPLETION_BYTES of results."""
    parts: list[list[tuple[int, int, str]]] = [[]]
    size = 0
    for row in rows:
        n = len(row[2])
        if parts[-1] and size + n > COMPLETION_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(row)
        size += n
    return parts


def _idle(conns: list[KeptConnection]) -> KeptConnection | None:
    """A kept connection no flush is using (each flight finds one); else the pool's path."""
    for conn in conns:
        if not conn.busy:
            return conn
    return None

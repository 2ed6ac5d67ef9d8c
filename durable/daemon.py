"""The composition root: builds the daemon's parts, starts them in order, stops them.

A task's path: the listener's notification wakes a queue worker (worker.py), which
claims it from the store; the attempts (attempts.py) hold it and launch it into a slot;
the runner (runner.py) runs its code; its completion joins a group commit (acks.py),
which writes it to the store. Timers, schedules, retention and reaping run beside it
(housekeeping.py). Shutdown is a stop flag, a grace period, then cancellation
(shutdown.py, which handles signals too).
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import anyio
from anyio.abc import TaskStatus

from durable import sdnotify, tracing
from durable.acks import FLUSH_CONNECTIONS, Acks
from durable.attempts import Attempt, Attempts
from durable.housekeeping import RETENTION_INTERVAL, Housekeeping
from durable.http import Endpoint, endpoint
from durable.listener import Listener
from durable.logs import get_logger
from durable.metrics import Metrics
from durable.poller import Poller
from durable.publisher import Publisher
from durable.registry import Registry
from durable.runner import Hooks, Runner
from durable.settings import Settings
from durable.shutdown import FINAL_WRITES, Shutdown, on_signals
from durable.store import Store, is_fatal, statement_deadline
from durable.worker import QueueWorker

__all__ = ["FINAL_WRITES", "GC_YOUNG", "WARM_CONNECTIONS", "Daemon", "tune_gc"]

log = get_logger("durable.daemon")

WARM_CONNECTIONS = 5
"""Pool connections a daemon opens at startup; the rest open as they are needed."""

KEPT_CONNECTIONS = 8
"""Queue loops that keep a connection of their own for their claims (the first ones)."""

GC_YOUNG = 10_000
"""Allocations between collections of the youngest generation (Python's default: 700)."""

def tune_gc() -> None:
    """Set the garbage collector for a process that is a daemon, once its code is loaded.
    Every step, claim and flush allocates objects that die within milliseconds: at
    Python's default threshold the collector took a tenth of a busy daemon's CPU. Freezing
    what is loaded already (modules, the registry) keeps it out of every full collection."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


class Daemon:
    """``durable run``: serves the configured queues until stopped.

    ``burst=True`` returns once no work is ready and nothing is running (for tests and
    one-shot jobs). ``stop()`` begins a graceful shutdown: claiming stops, running tasks
    get ``shutdown_grace`` seconds, then they are cancelled and handed back at once.
    To run one inside an application, use ``durable.serve``.
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
        clock: Callable[[], datetime] | None = None, hooks: Hooks | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.dsn, self.listen_dsn, self.burst = dsn, listen_dsn or dsn, burst
        self.pool_size, self.hooks = pool_size, hooks  # hooks: durable.testing's seams
        self.clock = clock or self._database_now
        """The scheduler's clock (tests drive it); by default the database's."""
        self.id = uuid.uuid4()
        self.workers: dict[str, QueueWorker] = {}
        self.poller = Poller(self.workers, settings.poll_interval, statement_deadline(settings.lease))
        self.listener: Listener | None = None
        self.store: Store | None = None
        self.acks: Acks | None = None
        self.housekeeping: Housekeeping | None = None
        self.started = anyio.Event()
        self.ready = anyio.Event()
        """Set once LISTEN is live and every queue loop has claimed once (systemd READY=1)."""
        self.shutdown = Shutdown(settings.shutdown_grace)
        self._attempts: Attempts | None = None
        self._root: anyio.CancelScope | None = None
        self.metrics = Metrics()
        self.metrics.watch(self.workers, lambda: self.listener)
        self.http: Endpoint | None = None
        """The /healthz, /readyz, /metrics endpoint when DURABLE_HTTP is set (port: .http.port)."""
        self.retention_interval = RETENTION_INTERVAL

    def _database_now(self) -> datetime:
        return self.store.now() if self.store is not None else datetime.now(UTC)

    @property
    def attempts(self) -> dict[int, Attempt]:
        """The attempts this daemon holds, by task id."""
        return self._attempts.held if self._attempts is not None else {}

    @property
    def healthy(self) -> bool:
        """The heartbeat (lease extension) has succeeded within the last lease period."""
        return self._attempts is None or self._attempts.healthy

    @property
    def stopping(self) -> bool:
        return self.shutdown.requested.is_set()

    @property
    def prune_runs(self) -> int:
        """Prune passes attempted under DURABLE_RETENTION (done, skipped or failed)."""
        return self.housekeeping.prune_runs if self.housekeeping is not None else 0

    def stop(self) -> None:
        """Begin a graceful shutdown; a second call skips the grace period."""
        if self.shutdown.request():
            sdnotify.notify("STOPPING=1\nSTATUS=stopping")
        for w in self.workers.values():
            w.stop()
        if not self.started.is_set() and self._root is not None:
            # Still starting (say the listener cannot reach its server yet): nothing has
            # been claimed, so there is nothing to drain; stop waiting and exit.
            self._root.cancel()

    async def run_schedules(self) -> datetime | None:
        """Start every schedule whose tick has come; returns when the next one is due."""
        assert self.housekeeping is not None
        return await self.housekeeping.run_schedules()

    async def run(
        self,
        *,
        handle_signals: bool = False,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        if not handle_signals:
            return await self._serve(task_status)
        with on_signals(self.stop):
            await self._serve(task_status)

    async def _serve(self, task_status: TaskStatus[None]) -> None:
        queues = self.settings.queue_limits
        # The hot path's connections (claims, completions, two checkpoint flights, the
        # heartbeat) open now, so the first tasks wait for no connect and no cold backend.
        # The first KEPT_CONNECTIONS queue loops each keep one for their claims while busy
        # and the group commits keep theirs, on top of the pool's size; one is warm.
        kept = min(len(queues), KEPT_CONNECTIONS)
        self.store = store = await Store.open(
            self.dsn, min_size=min(WARM_CONNECTIONS, self.pool_size) + min(kept, 1),
            max_size=self.pool_size + kept + FLUSH_CONNECTIONS, warm=True,
            statement_cache_size=self.settings.statement_cache, lease=self.settings.lease,
        )
        self.acks = acks = Acks(store, self.metrics, statement_deadline(self.settings.lease))
        try:
            if self.settings.http is not None:
                self.http = await endpoint(self.settings, self.dsn, store, self.metrics,
                                           lambda: self.listener, lambda: self.stopping)
            publisher = Publisher(store, self.id, self.registry.definitions(), self.settings.lease)
            # This daemon registers before its first claim.
            await self.shutdown.persist("register", lambda: publisher.start(queues))
            self.housekeeping = housekeeping = Housekeeping(
                store, self.registry, self.metrics, self.clock,
                poll_interval=self.settings.poll_interval, lease=self.settings.lease,
                retention=self.settings.retention, retention_interval=self.retention_interval,
                retention_vacuum=self.settings.retention_vacuum,
            )
            runner = Runner(
                store, self.registry, acks.completions, acks.checkpoints,
                housekeeping.wake_timers, metrics=self.metrics, tracer=tracing, hooks=self.hooks,
                cache=self.settings.workflow_cache, warn_at=self.settings.history_warning,
            )
            self._attempts = attempts = Attempts(
                store, runner.run, self.shutdown, self.metrics, worker_id=self.id,
                lease=self.settings.lease, burst=self.burst, writing=acks.pending,
            )
            self.listener = Listener(
                self.listen_dsn, on_ready=self._on_ready, on_control=self._on_control,
                on_reconnect=self._catch_up,
            )
            async with anyio.create_task_group() as root:
                self._root = root.cancel_scope
                if self.stopping:  # stopped while starting (a signal): nothing to drain
                    root.cancel_scope.cancel()
                if self.http is not None:
                    # Before the listener: /healthz and /readyz answer while it connects.
                    await root.start(self.http.run)
                # LISTEN is live before the first claim: no notification falls between.
                await root.start(self.listener.run)
                await root.start(acks.run)
                root.start_soon(attempts.heartbeats)
                root.start_soon(publisher.run)
                await self.shutdown.persist("declare_schedules", housekeeping.declare_schedules)
                await root.start(housekeeping.run)
                for i, (queue, limit) in enumerate(queues.items()):
                    self.workers[queue] = QueueWorker(
                        queue=queue, limit=limit, store=store, names=publisher.claim_names,
                        worker_id=self.id, lease=self.settings.lease,
                        poll_interval=self.settings.poll_interval,
                        hold=attempts.hold, launch=attempts.launch,
                        give_back=attempts.give_back, burst=self.burst, polled=True,
                        claim_ahead=self.settings.claim_ahead, keep_connection=i < kept,
                    )
                root.start_soon(self.poller.run, store, publisher.claim_names)
                root.start_soon(self._systemd)
                log.info("daemon_started", worker_id=str(self.id), queues=queues,
                         names=publisher.names, pid=os.getpid())
                self.started.set()
                task_status.started()
                async with anyio.create_task_group() as loops:
                    for w in self.workers.values():
                        loops.start_soon(w.run)
                # Every queue loop has returned: stopping, or a burst ran dry.
                if attempts.held and not self.shutdown.forced.is_set():
                    sdnotify.notify(f"STATUS=draining {len(attempts.held)} running task(s)")
                await attempts.drain()
                await acks.drain(self.shutdown)
                await runner.workflows.close()
                root.cancel_scope.cancel()
        finally:
            await self._close(store, acks)

    async def _close(self, store: Store, acks: Acks) -> None:
        if self.http is not None:
            self.http.close()
        if self._attempts is not None:  # cancelled from outside: leave no orphaned attempt
            self._attempts.abandon()
        with self.shutdown.last_writes() as scope:
            await acks.release()
            try:
                await store.worker_stopped(self.id)
            except Exception as exc:
                if is_fatal(exc):  # else the heartbeat's age tells that it stopped
                    raise
            await store.close()
        if scope.cancelled_caught:
            store.terminate()  # the server stopped answering: close without a goodbye
            log.warning("database_unreachable_at_stop", note="connections closed at once")
        log.info("daemon_stopped", worker_id=str(self.id))

    # -- what the listener hears ----------------------------------------------------

    def _on_ready(self, queue: str) -> None:
        if (w := self.workers.get(queue)) is not None:
            w.notify()

    def _on_control(self, payload: str) -> None:
        command, _, arg = payload.partition(":")
        if command == "cancel" and arg.isdigit() and self._attempts is not None:
            self._attempts.cancel(int(arg))
        elif command == "pause" and (w := self.workers.get(arg)) is not None:
            w.paused()  # what it claimed ahead goes back unstarted

    def _catch_up(self) -> None:
        """The listener is back: what it may have missed is looked for now (ready work,
        due timers, and, through a heartbeat, cancels of running tasks)."""
        self.poller.poll_soon()  # one statement finds the queues with work, whatever their number
        if self.housekeeping is not None:
            self.housekeeping.wake_timers()
        if self._attempts is not None:
            self._attempts.beat_soon()

    # -- the outside world ------------------------------------------------------------

    async def _systemd(self) -> None:
        """READY=1 once every queue is served, then WATCHDOG=1 while the daemon is healthy."""
        for w in self.workers.values():
            await w.claimed_once.wait()
        # The listener was live before the first claim (root.start), so this is ready.
        self.ready.set()
        if not self.stopping:
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


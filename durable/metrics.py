"""A daemon's Prometheus metrics: plain counters on the hot path, rendered at scrape time.

Counting a task is a dict lookup and an integer increment (no locks, no label lookups);
prometheus-client turns the counts into its text format when ``/metrics`` is scraped.
Each daemon has its own counts, so several daemons in one process do not collide.

Rendering is slow (about 130 ms for 1,000 (queue, name) series, 3 s for 20,000), so a
scrape copies the counts on the event loop, a few milliseconds at most, and renders the
copy in a worker thread: heartbeats and claims never wait for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import anyio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from durable.logs import get_logger, redact

if TYPE_CHECKING:
    from durable.store import Store


class QueueLoad(Protocol):
    """What the metrics read of one queue's loop."""

    @property
    def limit(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def wakeups(self) -> Mapping[str, int]: ...


class ListenerState(Protocol):
    """What the metrics and the readiness probe read of the LISTEN connection."""

    @property
    def connected(self) -> bool: ...

    @property
    def reconnects(self) -> int: ...

    @property
    def last_error(self) -> str | None: ...


class ConnectionLoad(Protocol):
    """What the metrics read of the HTTP endpoint."""

    @property
    def open_connections(self) -> int: ...

    @property
    def refused(self) -> int: ...

    @property
    def dropped(self) -> int: ...


log = get_logger("durable.metrics")

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
           math.inf)  # fmt: skip
"""Upper bounds of the attempt duration histogram, in seconds."""

DEPTH_TTL = 1.0
"""Seconds a queue depth reading is reused: scrapes in a burst cost one query."""

DEPTH_TIMEOUT = 2.0


class TaskSeries:
    """The counts of one (queue, name)."""

    __slots__ = ("buckets", "cancelled", "claimed", "completed", "failed", "retried", "seconds")

    def __init__(self) -> None:
        self.claimed = 0
        self.completed = 0
        self.failed = 0
        self.retried = 0
        self.cancelled = 0
        self.buckets = [0] * len(BUCKETS)
        self.seconds = 0.0

    def observe(self, seconds: float) -> None:
        """Record one attempt's duration."""
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.seconds += seconds

    def frozen(self) -> tuple[tuple[int, ...], tuple[int, ...], float]:
        """(claimed, completed, failed, retried, cancelled), buckets, seconds: as they are now."""
        counts = (self.claimed, self.completed, self.failed, self.retried, self.cancelled)
        return counts, tuple(self.buckets), self.seconds


@dataclass
class WorkflowCounts:
    """What the workflow runs did (durable.sticky): warm and cold resumes, events read and
    replayed; the tests that hold a resume to a constant cost read them too."""

    warm: int = 0
    """Resumes that continued a parked coroutine."""
    cold: int = 0
    """Attempts of a workflow that had run before, replayed from its log."""
    loaded: int = 0
    """Events read from the database to resume (every event of the log, on a cold resume)."""
    replayed: int = 0
    """Durable calls answered from the log rather than run."""
    evicted: int = 0
    """Parked workflows dropped: the table was full, or the parked state went stale."""
    history_warnings: int = 0
    """Workflows whose log passed the warning size (DURABLE_HISTORY_WARNING)."""



@dataclass(frozen=True)
class Snapshot:
    """What one scrape shows, copied at one instant on the event loop."""

    series: list[tuple[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...], float]]]
    """(queue, name) and TaskSeries.frozen()."""
    workers: list[tuple[str, int, int, list[tuple[str, int]]]]
    """(queue, in flight, limit, wakeups by source) per queue this daemon serves."""
    listener: tuple[bool, int]
    """Connected, reconnects."""
    leases_reclaimed: int
    deadlines_expired: int
    checkpoints_written: int
    tasks_pruned: int
    workflows: WorkflowCounts
    workflows_parked: int
    depth: list[tuple[str, int, int, int, float | None]] | None
    table: tuple[int, float | None] | None
    paused: frozenset[str]
    http: tuple[int, int, int] | None
    """Connections open, refused and dropped, of DURABLE_HTTP's own server."""


class Metrics:
    """What one daemon counts; ``render()`` (or, on the event loop, ``render_off_loop()``)
    gives the Prometheus text."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], TaskSeries] = {}
        self.leases_reclaimed = 0
        self.deadlines_expired = 0
        self.checkpoints_written = 0
        self.tasks_pruned = 0
        self.workflows = WorkflowCounts()
        self.workflows_parked: Callable[[], int] = lambda: 0
        self.workers: Mapping[str, QueueLoad] = {}
        self.listener: Callable[[], ListenerState | None] = lambda: None
        self.depth: list[tuple[str, int, int, int, float | None]] | None = None
        """(queue, queued, running, waiting, oldest ready age) per queue; None: unknown."""
        self.table: tuple[int, float | None] | None = None
        """durable.tasks's dead row versions and seconds since its last vacuum."""
        self.paused: frozenset[str] = frozenset()
        """Queues paused fleet-wide (`durable queues pause`)."""
        self.http: ConnectionLoad | None = None
        """DURABLE_HTTP's server, when it is this package's (not the dashboard's)."""
        self._depth_at = -math.inf
        self._depth_lock = asyncio.Lock()
        # One render at a time: concurrent scrapes queue rather than take every core.
        self._renders = anyio.CapacityLimiter(1)

    def task(self, queue: str, name: str) -> TaskSeries:
        series = self.series.get((queue, name))
        if series is None:
            series = self.series[(queue, name)] = TaskSeries()
        return series

    def watch(
        self, workers: Mapping[str, QueueLoad], listener: Callable[[], ListenerState | None]
    ) -> None:
        """Read slots, wakeups and the listener's state from these at scrape time."""
        self.workers = workers
        self.listener = listener

    async def refresh_depth(self, store: Store) -> None:
        """Read queue depths and the table's health, unless the last reading is under a
        second old."""
        async with self._depth_lock:
            if time.monotonic() - self._depth_at < DEPTH_TTL:
                return
            try:
                async with asyncio.timeout(DEPTH_TIMEOUT):
                    rows, table = await store.queue_depth()
                    self.paused = frozenset(await store.paused_queues())
            except Exception as exc:
                # The scrape still answers (with the daemon's own counters): a database
                # outage shows as missing depth gauges, and on /healthz.
                log.warning("metrics_depth_failed", error=redact(f"{type(exc).__name__}: {exc}"))
                self.depth = self.table = None
                return
            self.table = table
            self.depth = rows
            self._depth_at = time.monotonic()

    def snapshot(self) -> Snapshot:
        """The counts now. Called on the event loop, which alone changes them: the copy is
        never half an update, and the loop's objects are read on their own thread."""
        listener = self.listener()
        http = self.http
        return Snapshot(
            series=[(key, s.frozen()) for key, s in self.series.items()],
            workers=[(queue, w.in_flight, w.limit, list(w.wakeups.items()))
                     for queue, w in self.workers.items()],
            listener=(listener is not None and listener.connected,
                      listener.reconnects if listener is not None else 0),
            leases_reclaimed=self.leases_reclaimed,
            deadlines_expired=self.deadlines_expired,
            checkpoints_written=self.checkpoints_written,
            tasks_pruned=self.tasks_pruned,
            workflows=replace(self.workflows),
            workflows_parked=self.workflows_parked(),
            depth=self.depth,
            table=self.table,
            paused=self.paused,
            http=None if http is None else (http.open_connections, http.refused, http.dropped),
        )  # fmt: skip

    def render(self) -> bytes:
        return render(self.snapshot())

    async def render_off_loop(self) -> bytes:
        """``render()`` with only the copy made on the event loop, the text in a thread."""
        snapshot = self.snapshot()
        # A stopping daemon does not wait for a render: the thread touches only the copy.
        return await anyio.to_thread.run_sync(
            render, snapshot, limiter=self._renders, abandon_on_cancel=True
        )


def render(snapshot: Snapshot) -> bytes:
    """The Prometheus text of ``snapshot``; touches nothing else, so any thread may call it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot))
    return generate_latest(registry)


_TASK_COUNTERS = (
    ("claimed", "Tasks claimed by this daemon."),
    ("completed", "Tasks this daemon completed."),
    ("failed", "Tasks that failed for good on this daemon (no attempts left, or not retryable)."),
    ("retried", "Failed attempts on this daemon that were queued to run again."),
    ("cancelled", "Running tasks this daemon stopped because they were cancelled."),
)


class _Collector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self.m = snapshot

    def collect(self) -> Iterator[Metric]:
        m = self.m
        labels = ["queue", "name"]
        series = sorted(m.series)
        for i, (field, doc) in enumerate(_TASK_COUNTERS):
            family = CounterMetricFamily(f"durable_tasks_{field}", doc, labels=labels)
            for key, (counts, _, _) in series:
                family.add_metric(list(key), counts[i])
            yield family
        histogram = HistogramMetricFamily(
            "durable_attempt_duration_seconds",
            "How long attempts ran on this daemon, until their code returned or raised.",
            labels=labels,
        )
        for key, (_, buckets, seconds) in series:
            cumulative, total = [], 0
            for bound, count in zip(BUCKETS, buckets, strict=True):
                total += count
                cumulative.append((_bound(bound), float(total)))
            histogram.add_metric(list(key), cumulative, seconds)
        yield histogram

        yield from self._daemon()
        yield from self._http()
        yield from self._depth()

    def _daemon(self) -> Iterator[Metric]:
        m = self.m
        in_flight = GaugeMetricFamily(
            "durable_slots_in_flight", "Tasks this daemon runs now, per queue.", labels=["queue"]
        )
        free = GaugeMetricFamily(
            "durable_slots_free", "Slots this daemon has free, per queue.", labels=["queue"]
        )
        wakeups = CounterMetricFamily(
            "durable_wakeups",
            "Idle queue loops woken by a notification or by the poll interval.",
            labels=["queue", "source"],
        )
        for queue, running, limit, sources in sorted(m.workers):
            in_flight.add_metric([queue], running)
            free.add_metric([queue], max(0, limit - running))
            for source, count in sorted(sources):
                wakeups.add_metric([queue, source], count)
        yield in_flight
        yield free
        yield wakeups

        connected, reconnects = m.listener
        yield GaugeMetricFamily(
            "durable_listener_connected",
            "1 while the LISTEN connection is up.",
            value=1 if connected else 0,
        )
        yield CounterMetricFamily(
            "durable_listener_reconnects",
            "Times the LISTEN connection was re-established.",
            value=reconnects,
        )
        yield CounterMetricFamily(
            "durable_leases_reclaimed",
            "Expired leases (of any daemon) this daemon's reaper handed back or failed.",
            value=m.leases_reclaimed,
        )
        yield CounterMetricFamily(
            "durable_deadlines_expired",
            "Tasks this daemon failed because their deadline passed before they ran.",
            value=m.deadlines_expired,
        )
        yield CounterMetricFamily(
            "durable_checkpoints_written",
            "Workflow step checkpoints this daemon committed (group-committed).",
            value=m.checkpoints_written,
        )
        yield CounterMetricFamily(
            "durable_tasks_pruned",
            "Finished tasks this daemon deleted under DURABLE_RETENTION.",
            value=m.tasks_pruned,
        )
        yield from self._workflows()

    def _workflows(self) -> Iterator[Metric]:
        w = self.m.workflows
        resumes = CounterMetricFamily(
            "durable_workflow_resumes",
            "Workflow attempts that resumed a suspended run: warm (its coroutine kept in "
            "memory) or cold (its log replayed).",
            labels=["path"],
        )
        resumes.add_metric(["warm"], w.warm)
        resumes.add_metric(["cold"], w.cold)
        yield resumes
        yield CounterMetricFamily(
            "durable_workflow_events_loaded",
            "Events read from the database to resume workflows.",
            value=w.loaded,
        )
        yield CounterMetricFamily(
            "durable_workflow_events_replayed",
            "Durable calls answered from the event log instead of run.",
            value=w.replayed,
        )
        yield CounterMetricFamily(
            "durable_workflow_evictions",
            "Suspended workflows this daemon stopped keeping in memory.",
            value=w.evicted,
        )
        yield GaugeMetricFamily(
            "durable_workflows_parked",
            "Suspended workflows this daemon keeps in memory (DURABLE_WORKFLOW_CACHE).",
            value=self.m.workflows_parked,
        )
        yield CounterMetricFamily(
            "durable_workflow_history_warnings",
            "Workflows whose event log passed DURABLE_HISTORY_WARNING events.",
            value=w.history_warnings,
        )

    def _http(self) -> Iterator[Metric]:
        if self.m.http is None:
            return
        open_now, refused, dropped = self.m.http
        yield GaugeMetricFamily(
            "durable_http_connections",
            "Connections DURABLE_HTTP serves now (at most DURABLE_HTTP_MAX_CONNECTIONS).",
            value=open_now,
        )
        yield CounterMetricFamily(
            "durable_http_connections_dropped",
            "Connections DURABLE_HTTP closed with a 503 before their request came, to make "
            "room for a new one (DURABLE_HTTP_MAX_CONNECTIONS were open): the oldest first.",
            value=dropped,
        )
        yield CounterMetricFamily(
            "durable_http_connections_refused",
            "New connections DURABLE_HTTP answered 503 and closed unread: "
            "DURABLE_HTTP_MAX_CONNECTIONS were open, every one of them being answered.",
            value=refused,
        )

    def _depth(self) -> Iterator[Metric]:
        depth = self.m.depth
        if depth is None:
            return
        tasks = GaugeMetricFamily(
            "durable_queue_tasks",
            "Unfinished tasks per queue and status, across all daemons.",
            labels=["queue", "status"],
        )
        oldest = GaugeMetricFamily(
            "durable_queue_oldest_ready_seconds",
            "How long the oldest ready task of each queue has waited to be claimed (0: none).",
            labels=["queue"],
        )
        queues: dict[str, tuple[int, int, int, float | None]]
        queues = {q: (0, 0, 0, None) for q, _, _, _ in self.m.workers}
        queues.update({q: (a, b, c, age) for q, a, b, c, age in depth})
        for queue, (queued, running, waiting, age) in sorted(queues.items()):
            tasks.add_metric([queue, "queued"], queued)
            tasks.add_metric([queue, "running"], running)
            tasks.add_metric([queue, "waiting"], waiting)
            oldest.add_metric([queue], max(0.0, age or 0.0))
        yield tasks
        yield oldest
        paused = GaugeMetricFamily(
            "durable_queue_paused",
            "1 while claiming from the queue is paused fleet-wide (`durable queues pause`).",
            labels=["queue"],
        )
        for queue in sorted(set(queues) | self.m.paused):
            paused.add_metric([queue], 1 if queue in self.m.paused else 0)
        yield paused
        if self.m.table is not None:
            dead, age = self.m.table
            yield GaugeMetricFamily(
                "durable_table_dead_rows",
                "Dead row versions in durable.tasks awaiting VACUUM (Postgres's estimate);"
                " claims slow down as they grow.",
                value=dead,
            )
            if age is not None:
                yield GaugeMetricFamily(
                    "durable_table_vacuum_age_seconds",
                    "Seconds since durable.tasks was last vacuumed (by autovacuum or by hand).",
                    value=max(0.0, age),
                )


def _bound(bound: float) -> str:
    """A bucket's ``le`` label as Prometheus writes it: 0.005, 1.0, +Inf."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))

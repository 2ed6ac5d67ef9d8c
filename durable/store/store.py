"""The Store: one object composed of the store's parts, each owning one concern.

``store.tasks`` (enqueue, claim, finish, read), ``store.workflows`` (the event log,
children, suspension, events) and ``store.operations`` (limits, schedules, probes,
pruning) and ``store.catalog`` (the definitions daemons publish) share one Database (the pool, kept connections, named queries, clock). The
flat names (``store.claim``, ``store.checkpoint_many``...) are each its part's method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

from durable.store.catalog import Catalog
from durable.store.dashboard import Dashboard
from durable.store.database import Database, KeptConnection
from durable.store.operations import Operations
from durable.store.tasks import Tasks
from durable.store.workflows import Workflows

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


class _Via(Generic[S, P, R]):
    """``Store.name``: the method of the same name of one of its parts. Bound once per
    store and kept on it (later reads are a plain attribute lookup; assigning the name
    on a store replaces it there, as for any method)."""

    def __init__(self, part: Callable[[Store], S], method: Callable[Concatenate[S, P], R]) -> None:
        self.part = part
        self.method = method
        self.name = method.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, store: None, owner: type) -> Self: ...

    @overload
    def __get__(self, store: Store, owner: type) -> Callable[P, R]: ...

    def __get__(self, store: Store | None, owner: type) -> Self | Callable[P, R]:
        if store is None:
            return self
        bound: Callable[P, R] = getattr(self.part(store), self.method.__name__)
        store.__dict__[self.name] = bound
        return bound


def _tasks(store: Store) -> Tasks:
    return store.tasks


def _workflows(store: Store) -> Workflows:
    return store.workflows


def _operations(store: Store) -> Operations:
    return store.operations


def _catalog(store: Store) -> Catalog:
    return store.catalog


class Store:
    """Everything durable reads and writes: tasks, workflows, and operating them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.pool = db.pool
        self.tasks = Tasks(db)
        self.workflows = Workflows(db)
        self.operations = Operations(db, self.tasks)
        self.catalog = Catalog(db)
        self.dashboard = Dashboard(db)

    @classmethod
    async def open(
        cls,
        dsn: str | None,
        *,
        min_size: int = 1,
        max_size: int = 10,
        name: str = "durable",
        warm: bool = False,
        kept_enqueue: bool = False,
        server_settings: Mapping[str, str] | None = None,
        statement_cache_size: int = 100,
        lease: float = 30.0,
    ) -> Self:
        """A store on a new pool (see Database.open)."""
        return cls(await Database.open(
            dsn, min_size=min_size, max_size=max_size, name=name, warm=warm,
            kept_enqueue=kept_enqueue, server_settings=server_settings,
            statement_cache_size=statement_cache_size, lease=lease,
        ))

    def now(self) -> datetime:
        """The database's time (see Database.now)."""
        return self.db.now()

    def epoch(self) -> float:
        """The database's time in seconds since the epoch (see Database.now)."""
        return self.db.epoch()

    @property
    def clock_offset(self) -> float:
        return self.db.clock_offset

    @property
    def _enqueue(self) -> KeptConnection | None:
        return self.db.enqueue

    async def measure_clock(self, via: Any = None) -> None:
        await self.db.measure_clock(via)

    def kept_connection(self) -> KeptConnection:
        return self.db.kept_connection()

    async def close(self) -> None:
        await self.db.close()

    def terminate(self) -> None:
        self.db.terminate()

    insert_task = _Via(_tasks, Tasks.insert_task)
    insert_many = _Via(_tasks, Tasks.insert_many)
    insert_uniform = _Via(_tasks, Tasks.insert_uniform)
    claim = _Via(_tasks, Tasks.claim)
    trace_contexts = _Via(_tasks, Tasks.trace_contexts)
    claim_delay = _Via(_tasks, Tasks.claim_delay)
    next_due = _Via(_tasks, Tasks.next_due)
    due_queues = _Via(_tasks, Tasks.due_queues)
    extend_leases = _Via(_tasks, Tasks.extend_leases)
    reap_expired = _Via(_tasks, Tasks.reap_expired)
    complete_many = _Via(_tasks, Tasks.complete_many)
    complete_tasks = _Via(_tasks, Tasks.complete_tasks)
    retry_later = _Via(_tasks, Tasks.retry_later)
    fail = _Via(_tasks, Tasks.fail)
    fail_deadline = _Via(_tasks, Tasks.fail_deadline)
    mark_cancelled = _Via(_tasks, Tasks.mark_cancelled)
    release = _Via(_tasks, Tasks.release)
    get_task = _Via(_tasks, Tasks.get_task)
    list_tasks = _Via(_tasks, Tasks.list_tasks)
    watch_finish = _Via(_tasks, Tasks.watch_finish)
    continue_as_new = _Via(_tasks, Tasks.continue_as_new)
    chain = _Via(_tasks, Tasks.chain)
    report_progress = _Via(_tasks, Tasks.report_progress)
    progress_state = _Via(_tasks, Tasks.progress_state)
    progress_of = _Via(_tasks, Tasks.progress_of)
    cancel = _Via(_tasks, Tasks.cancel)
    queue_stats = _Via(_tasks, Tasks.queue_stats)
    list_workers = _Via(_tasks, Tasks.list_workers)
    register_worker = _Via(_tasks, Tasks.register_worker)
    worker_heartbeat = _Via(_tasks, Tasks.worker_heartbeat)
    worker_stopped = _Via(_tasks, Tasks.worker_stopped)

    wake_timers = _Via(_workflows, Workflows.wake_timers)
    timer_wait = _Via(_workflows, Workflows.timer_wait)
    expire_deadlines = _Via(_workflows, Workflows.expire_deadlines)
    load_events = _Via(_workflows, Workflows.load_events)
    resume_events = _Via(_workflows, Workflows.resume_events)
    load_tail = _Via(_workflows, Workflows.load_tail)
    checkpoint_many = _Via(_workflows, Workflows.checkpoint_many)
    fenced = _Via(_workflows, Workflows.fenced)
    transaction_step = _Via(_workflows, Workflows.transaction_step)
    record_event = _Via(_workflows, Workflows.record_event)
    spawn_children = _Via(_workflows, Workflows.spawn_children)
    record_children = _Via(_workflows, Workflows.record_children)
    child_events = _Via(_workflows, Workflows.child_events)
    resolve_wait = _Via(_workflows, Workflows.resolve_wait)
    suspend = _Via(_workflows, Workflows.suspend)
    send_event = _Via(_workflows, Workflows.send_event)
    history = _Via(_workflows, Workflows.history)
    branches = _Via(_workflows, Workflows.branches)
    histories = _Via(_workflows, Workflows.histories)

    queue_limits = _Via(_operations, Operations.queue_limits)
    set_queue_limits = _Via(_operations, Operations.set_queue_limits)
    set_queue_paused = _Via(_operations, Operations.set_queue_paused)
    upsert_schedule = _Via(_operations, Operations.upsert_schedule)
    delete_schedule = _Via(_operations, Operations.delete_schedule)
    forget_code_schedules = _Via(_operations, Operations.forget_code_schedules)
    list_schedules = _Via(_operations, Operations.list_schedules)
    due_schedules = _Via(_operations, Operations.due_schedules)
    next_schedule = _Via(_operations, Operations.next_schedule)
    fire_schedule = _Via(_operations, Operations.fire_schedule)
    restart = _Via(_operations, Operations.restart)
    ping = _Via(_operations, Operations.ping)
    schema_version = _Via(_operations, Operations.schema_version)
    queue_depth = _Via(_operations, Operations.queue_depth)
    paused_queues = _Via(_operations, Operations.paused_queues)
    unserved_names = _Via(_operations, Operations.unserved_names)
    select_tasks = _Via(_operations, Operations.select_tasks)
    retry_many = _Via(_operations, Operations.retry_many)
    prune_count = _Via(_operations, Operations.prune_count)
    prune = _Via(_operations, Operations.prune)

    register_definitions = _Via(_catalog, Catalog.register_definitions)
    publish_definitions = _Via(_catalog, Catalog.publish_definitions)
    resolve_definition = _Via(_catalog, Catalog.resolve_definition)
    list_definitions = _Via(_catalog, Catalog.list_definitions)
    served_definitions = _Via(_catalog, Catalog.served_definitions)
    in_flight_versions = _Via(_catalog, Catalog.in_flight_versions)
    live_versions = _Via(_catalog, Catalog.live_versions)
    shift_times = _Via(_operations, Operations.shift_times)
    next_time = _Via(_operations, Operations.next_time)
    idle_state = _Via(_operations, Operations.idle_state)
    expire_leases = _Via(_operations, Operations.expire_leases)

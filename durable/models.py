"""Plain records passed between the store and the rest of durable."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID

from durable.codec import dumps

if TYPE_CHECKING:
    from durable.registry import Definition

TERMINAL = frozenset({"completed", "failed", "cancelled"})
STATUSES = ("queued", "running", "waiting", "completed", "failed", "cancelled")


class Claimed(NamedTuple):
    """A task this daemon claimed: what the runner needs to run one attempt (a tuple: one
    is made for every task claimed; its fields up to ``fresh`` are the columns
    ``durable.claim`` returns, in order)."""

    id: int
    queue: str
    name: str
    kind: str
    args: str
    kwargs: str
    attempt: int
    max_attempts: int
    timeout: float | None
    token: int
    branch: int
    parent_id: int | None
    root_id: int | None
    cancel_requested: bool
    fresh: bool = False
    """Never claimed before: a workflow has no events yet (none need loading)."""
    deadline: datetime | None = None
    """When the task must be done by (``deadline=``), if it has one."""
    trace_context: str | None = None
    """The starter's trace context (JSON, W3C traceparent) when it was traced."""


@dataclass(frozen=True)
class TaskInfo:
    """A task as ``client.get`` and ``durable show`` see it."""

    id: int
    queue: str
    name: str
    kind: str
    args: Any
    kwargs: Any
    status: str
    priority: int
    run_at: datetime
    attempt: int
    max_attempts: int
    timeout: float | None
    lease_until: datetime | None
    worker_id: UUID | None
    result: Any
    error: dict[str, Any] | None
    idempotency_key: str | None
    parent_id: int | None
    root_id: int | None
    branch: int
    wake_at: datetime | None
    waiting_on: list[int] | None
    waiting_event: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    version: str | None = None
    """The version of the code the task started on (None: unversioned)."""
    deadline: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Event:
    """One recorded durable call of a workflow, as replay sees it."""

    seq: int
    kind: str
    name: str
    digest: str
    status: str
    result: str | None
    error: str | None
    child_id: int | None
    wake_at: datetime | None
    child_status: str | None = None
    child_result: str | None = None
    child_error: str | None = None


@dataclass(frozen=True)
class Progress:
    """The latest progress a task reported (``TaskContext.progress``)."""

    value: Any
    message: str | None
    updated_at: datetime


@dataclass(frozen=True)
class HistoryEntry:
    """One row of ``client.history``: the event log as people read it."""

    seq: int
    kind: str
    name: str
    status: str
    result: Any
    error: dict[str, Any] | None
    child_id: int | None
    child_status: str | None
    wake_at: datetime | None
    attempt: int
    started_at: datetime
    finished_at: datetime | None


class Checkpoint(NamedTuple):
    """A step's outcome, to be group-committed with other workflows' checkpoints (a tuple:
    one is made for every step a workflow runs)."""

    task_id: int
    token: int
    branch: int
    seq: int
    kind: str
    name: str
    digest: str
    status: str
    result: str | None
    error: str | None
    attempt: int
    started_at: float
    """Seconds since the epoch on the database's clock, as are ``wake_at``'s: encoding a
    datetime costs more than the rest of the row (see durable.checkpoint_epoch_row)."""
    wake_at: float | None = None


class NewTask(NamedTuple):
    """A task to insert (client.start_many, children). A tuple: one is made for every
    task started, and a frozen dataclass of these fields took 2.8 us to build against
    0.7."""

    name: str
    args: str = "[]"
    kwargs: str = "{}"
    queue: str = "default"
    kind: str = "task"
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = 3
    timeout: float | None = None
    trace_context: str | None = None
    concurrency_key: str | None = None
    key_limit: int | None = None
    key_rate_limit: int | None = None
    key_rate_period: float | None = None
    version: str | None = None
    deadline: float | None = None
    """Seconds from the insert (on the database's clock) until the task's deadline."""

    @classmethod
    def from_definition(
        cls,
        definition: Definition[Any, Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> NewTask:
        """The row that starts ``definition`` with these arguments: its queue, kind,
        priority, attempts, timeout and, when the call has a concurrency key, its per-key
        limits; ``overrides`` (any field) win. The one way client, workflow and scheduler
        build a task."""
        kwargs = {} if kwargs is None else dict(kwargs)
        what = f"the arguments of {definition.name!r}"
        key = definition.key_for(args, kwargs)
        rate = definition.key_rate if key is not None else None
        fields: dict[str, Any] = dict(
            name=definition.name,
            args=dumps(list(args), what=what),
            kwargs=dumps(kwargs, what=what),
            queue=definition.queue,
            kind=definition.kind,
            priority=definition.priority,
            max_attempts=definition.max_attempts,
            timeout=definition.timeout,
            concurrency_key=key,
            key_limit=definition.key_limit if key is not None else None,
            key_rate_limit=rate[0] if rate else None,
            key_rate_period=rate[1] if rate else None,
            version=definition.version,
            deadline=definition.deadline,
        )
        if overrides:
            fields.update(overrides)  # one construction: a _replace costs a second
        return cls(**fields)


@dataclass(frozen=True)
class DueSchedule:
    """A cron schedule whose next run has come (its row as the scheduler reads it; the
    text columns as stored, which the scheduler checks)."""

    name: str
    task_name: str
    cron: str
    timezone: str
    args: str
    kwargs: str
    queue: str | None
    next_run_at: datetime


@dataclass(frozen=True)
class CancelResult:
    """What ``client.cancel`` did.

    A cancel that commits before the task's outcome wins: a running task ends
    ``cancelled`` whatever its attempt then does. ``cancelled`` lists the tasks this cancel
    ends: the task itself first when it had not finished, then its unfinished descendants
    (queued and waiting ones have ended already; running ones end when their daemon stops
    them). ``finished`` is the task's status when it had finished before the cancel, in
    which case nothing of it was cancelled. Both empty: no such task.
    """

    task_id: int
    cancelled: tuple[int, ...] = ()
    finished: str | None = None

    def __bool__(self) -> bool:
        """True when the cancel reached at least one task."""
        return bool(self.cancelled)


@dataclass(frozen=True)
class PruneResult:
    """What one prune pass deleted (``durable prune``, ``DURABLE_RETENTION``)."""

    tasks: int = 0
    events: int = 0
    signals: int = 0
    workers: int = 0
    vacuumed: bool | None = None
    """After deleting: True if the pass vacuumed durable's tables, False if it was to and
    its role may not (only their owner may, or a superuser), None if it was not to."""


# -- what operators read (durable.admin) ----------------------------------------------------


@dataclass(frozen=True)
class TaskSummary:
    """One row of ``durable ls``."""

    id: int
    queue: str
    name: str
    kind: str
    status: str
    priority: int
    attempt: int
    max_attempts: int
    parent_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    run_at: datetime
    version: str | None = None
    progress: Progress | None = None


@dataclass(frozen=True)
class QueueCount:
    """How many tasks of a queue are in one status, and the oldest ready one's due time."""

    queue: str
    status: str
    count: int
    oldest_ready: datetime | None


@dataclass(frozen=True)
class QueueLimit:
    """A queue's fleet-wide limits (None: no limit)."""

    name: str
    concurrency: int | None
    rate_limit: int | None
    rate_period: float | None
    paused: bool = False


@dataclass(frozen=True)
class Unserved:
    """Queued task names of a queue that no live daemon has the code for."""

    queue: str
    names: tuple[str, ...]
    tasks: int


@dataclass(frozen=True)
class WorkerInfo:
    """A daemon as it registered itself, and how long since it was last heard from."""

    id: UUID
    host: str
    pid: int
    queues: dict[str, int]
    names: tuple[str, ...]
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    silence: float
    """Seconds since its last heartbeat, by the database's clock."""


@dataclass(frozen=True)
class IdleState:
    """What keeps a test's worker busy (``durable.testing``): tasks running, queued and
    due, or waiting on a due timer; the due ones it cannot run, and the running ones
    another worker holds."""

    running: int
    ready: int
    timers: int
    unserved: tuple[int, ...]
    elsewhere: tuple[int, ...]

    @property
    def idle(self) -> bool:
        return not (self.running or self.ready or self.timers)


@dataclass(frozen=True)
class ScheduleInfo:
    """A cron schedule and when it runs next."""

    name: str
    task: str
    cron: str
    timezone: str
    args: Any
    queue: str | None
    source: str
    next_run_at: datetime
    last_run_at: datetime | None
    last_task_id: int | None


@dataclass(frozen=True)
class History:
    """A workflow run's recorded history on one branch, as ``durable verify`` replays it
    (from the database, or from the file ``durable show ID --json`` writes)."""

    task_id: int
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    status: str
    branch: int
    attempt: int
    events: tuple[Event, ...]


@dataclass(frozen=True)
class TaskFilter:
    """What the task list (`durable ls`, the dashboard) selects; None: any."""

    statuses: tuple[str, ...] | None = None
    queue: str | None = None
    name: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    idempotency_key: str | None = None
    task_id: int | None = None
    tags: tuple[str, ...] | None = None
    """Tasks carrying every one of these tags."""
    attributes: dict[str, Any] | None = None
    """Tasks whose attributes hold every one of these names with that value."""


@dataclass(frozen=True)
class TaskRow:
    """One row of the searchable task list, with its tags and attributes."""

    id: int
    queue: str
    name: str
    kind: str
    status: str
    attempt: int
    max_attempts: int
    parent_id: int | None
    idempotency_key: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    run_at: datetime
    tags: tuple[str, ...]
    attributes: dict[str, Any]
    error_type: str | None


@dataclass(frozen=True)
class TaskPage:
    """One page of the task list. A filtered page reads one stretch of ids at most, so
    it may hold fewer rows than asked while older matches exist: `searched` then names
    the stretch read (lowest id, highest id) and `next_before` still leads on."""

    rows: list[TaskRow]
    next_before: int | None
    """The keyset cursor of the next page (its ids are below this); None: the list ends."""
    searched: tuple[int, int] | None = None


@dataclass(frozen=True)
class Finished:
    """How many tasks of a queue ended in one status within one bucket of the last hour
    (bucket 0 the newest)."""

    queue: str
    status: str
    bucket: int
    count: int

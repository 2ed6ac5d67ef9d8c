"""Task and workflow definitions: the decorators, and loading them from entry points."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, ParamSpec, TypeVar, overload

from durable.errors import ConfigurationError
from durable.retry import DEFAULT_POLICY, RetryPolicy
from durable.validation import MAX_LIMIT, MAX_PERIOD, MIN_PERIOD

ENTRY_POINT_GROUP = "durable"
MAX_VERSION = 100
"""Longest version string (durable.definitions holds it, and the claim compares it)."""

MAX_DEADLINE = 10 * 365 * 86400.0
"""Longest deadline, in seconds."""

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Definition(Generic[P, R]):
    """A registered task or workflow. Calling it calls the function directly."""

    name: str
    fn: Callable[..., Awaitable[R]]
    kind: str = "task"
    queue: str = "default"
    max_attempts: int = 3
    timeout: float | None = None
    priority: int = 0
    retry: RetryPolicy = field(default=DEFAULT_POLICY)
    concurrency_key: Callable[..., Any] | None = None
    key_limit: int | None = None
    key_rate: tuple[int, float] | None = None
    schedule: str | None = None
    timezone: str = "UTC"
    version: str | None = None
    """The version of this code (``@workflow(version="2")``): a run records the version it
    started on, and only daemons with that version's code claim it. None: unversioned."""
    digest: str = ""
    """A digest of the function's source, for information (``durable definitions``)."""
    idempotency: str = "forever"
    """The scope of an idempotency key given to ``start``: ``"forever"`` or ``"active"``."""
    deadline: float | None = None
    """Seconds from its start by which the task must be done (across attempts, suspensions
    and restarts), else it fails with ``DeadlineExceeded``."""
    takes_context: bool = False
    """A task whose first parameter is annotated ``durable.TaskContext``: the daemon
    passes the running attempt's context there."""

    def key_for(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
        """The concurrency key of a call, from ``concurrency_key(*args, **kwargs)``."""
        if self.concurrency_key is None:
            return None
        try:
            key = self.concurrency_key(*args, **kwargs)
        except Exception as exc:
            raise ConfigurationError(
                f"{self.name}: concurrency_key failed for these arguments: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if key is None:
            return None
        text = str(key)
        if not 1 <= len(text) <= 500:
            raise ConfigurationError(f"{self.name}: a concurrency key must have 1 to 500 characters")
        return text

    @staticmethod
    def elsewhere(name: str) -> Definition[..., Any]:
        """A task known here only by its name (another service defines and runs it),
        with the default options."""
        return Definition(name=name, fn=_elsewhere)

    @property
    def origin(self) -> str:
        return f"{self.fn.__module__}:{self.fn.__qualname__}"

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
    ) -> Definition[P, R]:
        """A copy with other options, for one call: ``ctx.run(job.options(queue="x"), ...)``."""
        changes: dict[str, Any] = {}
        if queue is not None:
            changes["queue"] = queue
        if priority is not None:
            changes["priority"] = priority
        if max_attempts is not None:
            changes["max_attempts"] = max_attempts
        if timeout is not None:
            changes["timeout"] = timeout
        return _validated(dataclasses.replace(self, **changes))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        return self.fn(*args, **kwargs)


def _validated(d: Definition[Any, Any]) -> Definition[Any, Any]:
    if not d.name or len(d.name) > 200:
        raise ConfigurationError(f"{d.origin}: a name must have 1 to 200 characters")
    if not d.queue or len(d.queue) > 200:
        raise ConfigurationError(f"{d.origin}: a queue name must have 1 to 200 characters")
    if "\0" in d.name or "\0" in d.queue:
        raise ConfigurationError(f"{d.origin}: names cannot hold NUL characters (Postgres text cannot)")
    if "\x1f" in d.name:
        # The claim joins a name and its version with chr(31): a name holding it could
        # spell another name's version, and a daemon would claim runs it has no code for.
        raise ConfigurationError(f"{d.origin}: a name cannot hold the control character \\x1f")
    if d.max_attempts < 1:
        raise ConfigurationError(f"{d.origin}: max_attempts must be >= 1, got {d.max_attempts}")
    if d.timeout is not None and not d.timeout > 0:
        raise ConfigurationError(f"{d.origin}: timeout must be > 0 seconds, got {d.timeout}")
    if (d.key_limit is not None or d.key_rate is not None) and d.concurrency_key is None:
        raise ConfigurationError(f"{d.origin}: key_limit and key_rate need a concurrency_key")
    if d.key_limit is not None and (not isinstance(d.key_limit, int) or d.key_limit < 1):
        raise ConfigurationError(f"{d.origin}: key_limit must be a whole number >= 1")
    if d.key_rate is not None:
        n, period = d.key_rate
        if (
            isinstance(n, bool)
            or not isinstance(n, int)
            or not 1 <= n <= MAX_LIMIT
            or isinstance(period, bool)
            or not isinstance(period, int | float)
            or not MIN_PERIOD <= period <= MAX_PERIOD
        ):
            raise ConfigurationError(
                f"{d.origin}: key_rate must be (starts from 1 to {MAX_LIMIT}, period in "
                f"seconds from {MIN_PERIOD:g} to {MAX_PERIOD:g})"
            )
    if d.concurrency_key is not None and not callable(d.concurrency_key):
        raise ConfigurationError(f"{d.origin}: concurrency_key must be a function of the arguments")
    if d.version is not None and (
        not isinstance(d.version, str)
        or not 1 <= len(d.version) <= MAX_VERSION
        or any(ord(c) < 32 or c == "\x7f" for c in d.version)
    ):
        raise ConfigurationError(
            f"{d.origin}: version must be text of 1 to {MAX_VERSION} printable characters, "
            f"got {d.version!r}"
        )
    if d.deadline is not None and (
        isinstance(d.deadline, bool)
        or not isinstance(d.deadline, int | float)
        or not 0 < d.deadline < MAX_DEADLINE
    ):
        raise ConfigurationError(
            f"{d.origin}: deadline must be a positive number of seconds (under 10 years), "
            f"got {d.deadline!r}"
        )
    if d.idempotency not in ("forever", "active"):
        raise ConfigurationError(
            f"{d.origin}: idempotency must be 'forever' or 'active', got {d.idempotency!r}"
        )
    if d.schedule is not None:
        from durable.cron import CronError, parse

        try:
            parse(d.schedule, d.timezone)
        except CronError as exc:
            raise CronError(f"{d.origin}: schedule: {exc}") from None
    return d


class Registry:
    """Definitions by name. Two different functions under one name are an error."""

    def __init__(self) -> None:
        self._defs: dict[str, Definition[Any, Any]] = {}
        self._conflicts: dict[str, list[str]] = {}

    def add(self, d: Definition[Any, Any]) -> None:
        old = self._defs.get(d.name)
        if old is not None and old.origin != d.origin:
            self._conflicts.setdefault(d.name, [old.origin]).append(d.origin)
            return
        self._defs[d.name] = d

    def get(self, name: str) -> Definition[Any, Any] | None:
        return self._defs.get(name)

    def names(self) -> list[str]:
        return sorted(self._defs)

    def definitions(self) -> list[Definition[Any, Any]]:
        return [self._defs[n] for n in self.names()]

    def check(self) -> None:
        """Raise ConfigurationError naming both places when a name is defined twice."""
        if self._conflicts:
            name, origins = next(iter(self._conflicts.items()))
            raise ConfigurationError(
                f"two definitions named {name!r}: {' and '.join(origins)}; "
                "give one of them another name=..."
            )


registry = Registry()
"""The process-wide registry the decorators add to."""


def _make(
    fn: Callable[..., Awaitable[Any]],
    kind: str,
    name: str | None,
    queue: str,
    max_attempts: int,
    timeout: float | None,
    priority: int,
    retry: RetryPolicy | None,
    concurrency_key: Callable[..., Any] | None = None,
    key_limit: int | None = None,
    key_rate: tuple[int, float] | None = None,
    schedule: str | None = None,
    timezone: str = "UTC",
    version: str | None = None,
    idempotency: str = "forever",
    deadline: float | None = None,
) -> Definition[Any, Any]:
    if retry is not None and retry.max_attempts is not None:
        raise ConfigurationError(
            f"{fn.__module__}:{fn.__qualname__}: RetryPolicy.max_attempts counts a step's "
            f"tries; give a {kind}'s attempts as max_attempts= on the decorator"
        )
    if not inspect.iscoroutinefunction(fn):
        raise ConfigurationError(
            f"{fn.__module__}:{fn.__qualname__}: a durable {kind} must be an async def function"
        )
    d = _validated(
        Definition(
            takes_context=kind == "task" and _takes_context(fn),
            name=name or fn.__name__,
            fn=fn,
            kind=kind,
            queue=queue,
            max_attempts=max_attempts,
            timeout=timeout,
            priority=priority,
            retry=retry or DEFAULT_POLICY,
            concurrency_key=concurrency_key,
            key_limit=key_limit,
            key_rate=(int(key_rate[0]), float(key_rate[1])) if key_rate else None,
            schedule=schedule,
            timezone=timezone,
            version=version,
            digest=code_digest(fn),
            idempotency=idempotency,
            deadline=deadline,
        )
    )
    registry.add(d)
    return d


def _takes_context(fn: Callable[..., Any]) -> bool:
    """Whether ``fn``'s first parameter is annotated ``durable.TaskContext`` (a class or,
    under ``from __future__ import annotations``, its name)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
    ):
        return False
    note = params[0].annotation
    if isinstance(note, type):  # by name: registry.py must not import the runtime's modules
        return (note.__module__, note.__qualname__) == ("durable.taskcontext", "TaskContext")
    return isinstance(note, str) and note.rpartition(".")[2] == "TaskContext"


@overload
def task(fn: Callable[P, Awaitable[R]], /) -> Definition[P, R]: ...
@overload
def task(
    *,
    name: str | None = None,
    queue: str = "default",
    max_attempts: int = 3,
    timeout: float | None = None,
    priority: int = 0,
    retry: RetryPolicy | None = None,
    concurrency_key: Callable[..., Any] | None = None,
    key_limit: int | None = None,
    key_rate: tuple[int, float] | None = None,
    schedule: str | None = None,
    timezone: str = "UTC",
    version: str | None = None,
    idempotency: str = "forever",
    deadline: float | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Definition[P, R]]: ...
def task(
    fn: Callable[P, Awaitable[R]] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = "default",
    max_attempts: int = 3,
    timeout: float | None = None,
    priority: int = 0,
    retry: RetryPolicy | None = None,
    concurrency_key: Callable[..., Any] | None = None,
    key_limit: int | None = None,
    key_rate: tuple[int, float] | None = None,
    schedule: str | None = None,
    timezone: str = "UTC",
    version: str | None = None,
    idempotency: str = "forever",
    deadline: float | None = None,
) -> Definition[P, R] | Callable[[Callable[P, Awaitable[R]]], Definition[P, R]]:
    """Register an ``async def`` function as a task that daemons run.

    ``@durable.task`` or ``@durable.task(queue="email", max_attempts=5, timeout=30)``.
    The name defaults to the function's ``__name__``; arguments and the result are JSON.
    A failed attempt is retried with exponential backoff (``retry=RetryPolicy(...)``) up to
    ``max_attempts``; raise ``durable.NonRetryable`` to fail at once or
    ``durable.Retry(delay)`` to choose the delay. ``timeout`` (seconds) bounds one attempt.

    Fleet-wide flow control: ``concurrency_key=lambda customer, *a, **k: customer`` with
    ``key_limit=1`` runs at most one task per customer at a time across every daemon, and
    ``key_rate=(10, 60)`` starts at most 10 per key per minute; a saturated key does not hold
    back other keys. ``schedule="*/5 * * * *"`` (with ``timezone=``) starts the task on a
    cron schedule, once per tick however many daemons run. ``version=`` as for
    ``durable.workflow``. ``idempotency="active"`` makes an idempotency key given to
    ``start`` return the task only while it is unfinished (``"forever"``, the default: for
    as long as the task exists).
    """

    def wrap(f: Callable[P, Awaitable[R]]) -> Definition[P, R]:
        return _make(f, "task", name, queue, max_attempts, timeout, priority, retry,
                     concurrency_key, key_limit, key_rate, schedule, timezone, version,
                     idempotency, deadline)

    return wrap(fn) if fn is not None else wrap


@overload
def workflow(fn: Callable[P, Awaitable[R]], /) -> Definition[P, R]: ...
@overload
def workflow(
    *,
    name: str | None = None,
    queue: str = "default",
    max_attempts: int = 3,
    timeout: float | None = None,
    priority: int = 0,
    retry: RetryPolicy | None = None,
    concurrency_key: Callable[..., Any] | None = None,
    key_limit: int | None = None,
    key_rate: tuple[int, float] | None = None,
    schedule: str | None = None,
    timezone: str = "UTC",
    version: str | None = None,
    idempotency: str = "forever",
    deadline: float | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Definition[P, R]]: ...
def workflow(
    fn: Callable[P, Awaitable[R]] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = "default",
    max_attempts: int = 3,
    timeout: float | None = None,
    priority: int = 0,
    retry: RetryPolicy | None = None,
    concurrency_key: Callable[..., Any] | None = None,
    key_limit: int | None = None,
    key_rate: tuple[int, float] | None = None,
    schedule: str | None = None,
    timezone: str = "UTC",
    version: str | None = None,
    idempotency: str = "forever",
    deadline: float | None = None,
) -> Definition[P, R] | Callable[[Callable[P, Awaitable[R]]], Definition[P, R]]:
    """Register an ``async def fn(ctx: durable.Context, ...)`` as a durable workflow.

    Every ``ctx.step`` / ``ctx.transaction`` / ``ctx.run`` / ``ctx.sleep`` ... is recorded
    in the workflow's event log. After a crash, a retry or a wake-up the function runs
    again from the top and each recorded call returns its recorded result instead of
    running again. The code between durable calls must be deterministic. Options are
    those of ``durable.task``; ``timeout`` bounds each run between two suspensions.

    ``version="2"``: each run records the version it started on, and only a daemon that
    has that version's code claims it, so during a rolling deploy runs started on the old
    code finish on daemons that still have it while new runs start on the new code. Give
    a new version when a change would break the replay of runs in flight.
    ``deadline`` (seconds from its start) bounds the whole workflow: every attempt, sleep,
    event wait and restart. When it passes the workflow fails with
    ``durable.DeadlineExceeded`` (woken for it if it is waiting) and its unfinished
    children are cancelled.
    """

    def wrap(f: Callable[P, Awaitable[R]]) -> Definition[P, R]:
        return _make(f, "workflow", name, queue, max_attempts, timeout, priority, retry,
                     concurrency_key, key_limit, key_rate, schedule, timezone, version,
                     idempotency, deadline)

    return wrap(fn) if fn is not None else wrap


def load(apps: Iterable[str] = (), *, use_entry_points: bool = True) -> Registry:
    """Import every entry point of group ``durable`` and every module in ``apps``."""
    modules: list[str] = []
    if use_entry_points:
        modules.extend(ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP))
    modules.extend(apps)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot import {module!r}: {type(exc).__name__}: {exc}"
            ) from exc
    registry.check()
    return registry


def code_digest(fn: Callable[..., Any]) -> str:
    """A short digest of a function's source (its bytecode when the source is not at
    hand): it tells two builds of one version apart in ``durable definitions``."""
    try:
        text = inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = code.co_code if code is not None else repr(fn).encode()
    return hashlib.sha256(text).hexdigest()[:16]


async def _elsewhere(*_args: Any, **_kwargs: Any) -> Any:  # pragma: no cover - never called
    raise RuntimeError("a task defined in another service runs there")

"""durable.Context: what a workflow calls to make durable progress, and its replay cursor."""

from __future__ import annotations

import inspect
import random as _random
import sys
import uuid as _uuid
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from durable import tracing
from durable.batch import Batcher
from durable.codec import digest, dumps, dumps_spaced, error_text, loads, loads_as_stored
from durable.errors import (
    EventTimeout,
    LeaseLost,
    NonDeterminismError,
    PayloadError,
    ReplayAbort,
    TaskCancelled,
    TaskFailed,
)
from durable.models import TERMINAL, Checkpoint, Claimed, Event, NewTask
from durable.registry import Definition

if TYPE_CHECKING:
    from durable.store import Store


class Suspend(BaseException):
    """Ends a workflow's run until its children finish, a timer fires or an event arrives.

    A BaseException so that a workflow's ``except Exception`` does not swallow it.
    """

    def __init__(
        self,
        waiting_on: Sequence[int] | None = None,
        wake_at: datetime | None = None,
        event: str | None = None,
    ) -> None:
        super().__init__("workflow suspended")
        self.waiting_on = list(waiting_on) if waiting_on is not None else None
        self.wake_at = wake_at
        self.event = event


def describe(kind: str, name: str, dig: str) -> str:
    return f"{kind} {name!r} (arguments digest {dig[:12]})"


def match(event: Event | None, seq: int, kind: str, name: str, dig: str) -> Event | None:
    """The recorded event at ``seq`` if it is this call; raise if it is another call."""
    if event is None:
        return None
    if (event.kind, event.name, event.digest) != (kind, name, dig):
        raise NonDeterminismError(
            f"at position {seq} the event log holds {describe(event.kind, event.name, event.digest)}"
            f" but the code asked for {describe(kind, name, dig)}"
        )
    return event


def unconsumed(events: dict[int, Event], next_seq: int) -> NonDeterminismError | None:
    """A workflow that returns must have consumed its whole log."""
    rest = sorted(s for s in events if s >= next_seq)
    if not rest:
        return None
    first = events[rest[0]]
    return NonDeterminismError(
        f"the workflow returned after {next_seq} durable calls but the event log holds "
        f"{len(rest)} more: position {first.seq} holds "
        f"{describe(first.kind, first.name, first.digest)}"
    )


class RecordedTraceback(Exception):
    """The traceback recorded with a durable call's error (set as the rebuilt error's
    ``__cause__``, so that a traceback printed from it shows where it first happened)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0] if self.args else "")


def _loaded_class(type_name: str) -> type[Exception] | None:
    """The exception class named ``module.qualname``, from a module already imported.

    Never imports: a stored row chooses the name, and importing runs a module's code.
    """
    module_name, _, qualname = type_name.rpartition(".")
    module = sys.modules.get(module_name) if module_name else None
    if module is None:
        return None
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


def rebuild_error(task_id: int, error: dict[str, Any] | None) -> Exception:
    """The recorded error of a durable call as the workflow sees it, on its first run and on
    every replay: its own class (when that class's module is loaded) with the recorded
    ``args`` and JSON attributes, built without running its ``__init__``; otherwise a
    ``TaskFailed`` naming the recorded type."""
    error = error if isinstance(error, dict) else {}
    type_name = str(error.get("type", "Exception"))
    message = str(error.get("message", ""))
    traceback = error.get("traceback")
    args = error.get("args")
    attrs = error.get("attrs", {})
    if attrs is None:
        attrs = {}
    cls = _loaded_class(type_name)
    exc: Exception | None = None
    if cls is not None and isinstance(args, list) and isinstance(attrs, dict):
        try:
            if inspect.isfunction(getattr(cls, "__init__", None)):
                # Python-level __init__: its arguments need not be its args (HttpError(503)
                # passing f"HTTP {status}" on, keyword-only arguments). Rebuilt as pickle
                # would, from args and attributes, without calling it.
                exc = cls.__new__(cls, *args)
                exc.args = tuple(args)
            else:
                # A built-in's __init__ sets its C-level fields (from __reduce__'s arguments).
                init = error.get("init")
                exc = cls(*(init if isinstance(init, list) else args))
            exc.__dict__.update(attrs)
        except Exception:
            exc = None
    if exc is None:
        exc = TaskFailed(task_id, type_name, message, traceback if isinstance(traceback, str) else None)
    if isinstance(traceback, str) and traceback:
        exc.__cause__ = RecordedTraceback(traceback)
    return exc


_SCALARS = frozenset({int, str, bool, type(None)})


def as_recorded(value: Any, text: str) -> Any:
    """What a replay returns for a result recorded as ``text``: ``text`` read back as
    Postgres gives it (jsonb's key order and numbers), or ``value`` itself when that is a
    plain scalar (it reads back equal, of the same type)."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is float:
        return value + 0.0  # jsonb keeps no negative zero; every other float reads back as is
    return loads_as_stored(text)


CANCELLED = '{"type": "durable.TaskCancelled", "message": "the child was cancelled", "cancelled": true}'
"""The error recorded in a parent's log for a child it saw cancelled."""


def child_outcome(
    child_id: int, status: str | None, result: str | None, error: str | None
) -> Any:
    """A child's result, or its failure raised, as the parent's log or the child's row holds it."""
    if status == "completed":
        return loads(result)
    err = loads(error) or {}
    if status == "cancelled" or err.get("cancelled") is True:
        raise TaskCancelled(child_id)
    raise TaskFailed(
        child_id, str(err.get("type", "Error")), str(err.get("message", "")), err.get("traceback")
    )


def check_name(kind: str, name: object) -> None:
    """A name stored in the event log must be text Postgres accepts."""
    if not isinstance(name, str):
        raise PayloadError(f"the name of a {kind} must be a str, not {type(name).__name__}")
    if "\x00" in name:
        raise PayloadError(
            f"the name of {kind} {name!r} must not contain NUL characters (Postgres rejects them)"
        )
    if not name.isascii():
        try:
            name.encode()
        except UnicodeEncodeError:
            raise PayloadError(
                f"the name of {kind} {name!r} must be valid Unicode: it holds a lone surrogate"
            ) from None


class ChildCall:
    """``ctx.run(fn, ...)``: awaiting it starts the child (once) and waits for its result."""

    def __init__(self, ctx: Context, target: Definition[Any, Any] | str, args: Any, kwargs: Any):
        self.ctx = ctx
        self.target = target
        self.args = args
        self.kwargs = kwargs

    def __await__(self) -> Generator[Any, None, Any]:
        results = yield from self.ctx.gather(self).__await__()
        return results[0]


class ChildHandle:
    """A started child (``await ctx.spawn(...)``); await it for the child's result."""

    def __init__(self, ctx: Context, seq: int, child_id: int, event: Event | None) -> None:
        self.ctx = ctx
        self.seq = seq
        self.id = child_id
        self._event = event

    def __await__(self) -> Generator[Any, None, Any]:
        results = yield from self.ctx.gather(self).__await__()
        return results[0]


class Context:
    """The durable side of a running workflow, passed as its first argument.

    Each method below is a *durable call*: it gets the next position in the workflow's
    event log. The first time, it does the work and records the outcome; on every later
    run (after a crash, a retry or a wake-up) it returns the recorded outcome instead.
    The code between durable calls must be deterministic: the same calls, in the same
    order, with the same arguments. Await durable calls one at a time; run children in
    parallel with :meth:`gather`.
    """

    def __init__(
        self,
        store: Store,
        task: Claimed,
        events: Sequence[Event],
        checkpoints: Batcher[Checkpoint, bool],
        registry_get: Callable[[str], Definition[Any, Any] | None],
    ) -> None:
        self._store = store
        self._task = task
        self._events = {e.seq: e for e in events}
        self._checkpoints = checkpoints
        self._registry_get = registry_get
        self._seq = 0
        self._busy: str | None = None
        """The durable call under way, if any: a second one meanwhile is refused."""
        self._abort: ReplayAbort | None = None
        """A NonDeterminismError or LeaseLost raised in this attempt: raised again by every
        later durable call and at return, whatever the workflow caught."""

    @property
    def task_id(self) -> int:
        """The workflow's task id."""
        return self._task.id

    @property
    def attempt(self) -> int:
        """The attempt number, from 1; a retry after a failure adds one."""
        return self._task.attempt

    @property
    def position(self) -> int:
        """The position the next durable call will take in the event log."""
        return self._seq

    # -- the replay cursor ----------------------------------------------------------

    def _begin(self, kind: str, name: str) -> None:
        """Enter a durable call: one at a time, and none after the attempt was aborted."""
        if self._abort is not None:
            raise self._abort
        if self._busy is not None:
            # Under asyncio.gather (or tasks) calls would take their positions in the order
            # they happened to run, and a replay runs them in program order.
            raise self._aborted(
                NonDeterminismError(
                    f"{kind} {name!r} started while {self._busy} was still running: durable "
                    "calls of one workflow must not run at the same time (their order in the "
                    "event log would depend on timing). Await them one at a time; run "
                    "children in parallel with ctx.gather"
                )
            )
        self._busy = f"{kind} {name!r}"

    def _aborted(self, exc: ReplayAbort) -> ReplayAbort:
        if self._abort is None:
            self._abort = exc
        return self._abort

    def _next(self, kind: str, name: str, dig: str) -> tuple[int, Event | None]:
        seq = self._seq
        self._seq += 1
        try:
            return seq, match(self._events.get(seq), seq, kind, name, dig)
        except NonDeterminismError as exc:
            raise self._aborted(exc) from None

    def _cp(
        self,
        seq: int,
        kind: str,
        name: str,
        dig: str,
        *,
        status: str = "completed",
        result: str | None = None,
        error: str | None = None,
        started_at: datetime | None = None,
        wake_at: datetime | None = None,
    ) -> Checkpoint:
        t = self._task
        return Checkpoint(
            t.id, t.token, t.branch, seq, kind, name, dig, status, result, error, t.attempt,
            started_at or self._store.now(), wake_at,
        )

    async def _commit(self, cp: Checkpoint) -> None:
        ok = await self._checkpoints.submit(cp)
        if ok is not True:
            if isinstance(ok, Exception):  # the server refused this row alone
                raise PayloadError(
                    f"the database refused the checkpoint of {cp.kind} {cp.name!r} at position "
                    f"{cp.seq}: {type(ok).__name__}: {ok}"
                ) from ok
            raise self._aborted(
                LeaseLost(
                    f"task {cp.task_id}: checkpoint {cp.seq} rejected; another worker holds the task"
                )
            )

    def check_consumed(self) -> None:
        if self._abort is not None:
            raise self._abort
        err = unconsumed(self._events, self._seq)
        if err is not None:
            raise err

    def _failure(self, positions: list[int], error: Any) -> Exception:
        """The recorded failure at ``positions`` as the workflow sees it, marked with them:
        when it ends the attempt, the retry drops these events and runs the calls again."""
        exc = rebuild_error(self._task.id, error)
        _mark(exc, positions, self._seq)
        return exc

    def _recorded(self, seq: int, event: Event) -> Any:
        if event.status == "failed":
            raise self._failure([seq], loads(event.error))
        return loads(event.result)

    # -- steps ----------------------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` (sync or async) once and record its JSON result.

        A step runs at least once: a crash after it ran but before its checkpoint
        committed runs it again, so give side effects an idempotency key (for example
        ``f"{ctx.task_id}-{name}"``). Its result is returned as it will be on replay (read
        back as Postgres stores it: a dict's keys in jsonb's order, a tuple as a list).
        Its error is recorded and raised as it will be on replay: the same class with the
        same ``args`` and JSON attributes (built without calling its ``__init__``), or
        ``TaskFailed`` when its class cannot be rebuilt.
        """
        check_name("step", name)
        dig = digest("step", name, [args, kwargs])
        self._begin("step", name)
        try:
            seq, event = self._next("step", name, dig)
            if event is not None:
                return self._recorded(seq, event)
            started = self._store.now()
            failure: Exception | None = None
            with tracing.step_span(name, seq, "step"):
                try:
                    result = fn(*args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                except Exception as exc:
                    failure = exc
                if failure is not None:
                    error = error_text(failure)
                    del failure
                    await self._commit(
                        self._cp(seq, "step", name, dig, status="failed", error=error, started_at=started)
                    )
                    raise self._failure([seq], loads_as_stored(error))
                text = await dumps_spaced(result, what=f"the result of step {name!r}")
                await self._commit(self._cp(seq, "step", name, dig, result=text, started_at=started))
            return as_recorded(result, text)
        finally:
            self._busy = None

    async def transaction(
        self, name: str, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Run ``await fn(conn, *args, **kwargs)`` in the transaction that records it.

        ``conn`` is an asyncpg connection inside a transaction; the business writes it
        makes commit together with the checkpoint, so they happen exactly once. Its result
        and its error come back as a step's do.
        """
        check_name("transaction", name)
        dig = digest("transaction", name, [args, kwargs])
        self._begin("transaction", name)
        try:
            seq, event = self._next("transaction", name, dig)
            if event is not None:
                return self._recorded(seq, event)
            cp = self._cp(seq, "transaction", name, dig)
            failure: Exception | None = None
            with tracing.step_span(name, seq, "transaction"):
                try:
                    result = await self._store.transaction_step(cp, fn, args, kwargs)
                except LeaseLost as exc:
                    raise self._aborted(exc) from None
                except Exception as exc:
                    from durable.store import is_transient

                    if is_transient(exc):
                        # A lost connection, a deadlock, a serialization failure: the
                        # transaction rolled back and none of it happened. That is no outcome
                        # to record (replays would raise it for ever): this attempt fails and
                        # the next one runs the transaction again.
                        raise
                    failure = exc
                if failure is not None:
                    error = error_text(failure)
                    del failure
                    await self._commit(
                        self._cp(
                            seq, "transaction", name, dig, status="failed",
                            error=error, started_at=cp.started_at,
                        )
                    )
                    raise self._failure([seq], loads_as_stored(error))
            return as_recorded(result, dumps(result))
        finally:
            self._busy = None

    # -- children ---------------------------------------------------------------------

    def run(self, fn: Definition[Any, Any] | str, /, *args: Any, **kwargs: Any) -> ChildCall:
        """Start ``fn`` as a child task or workflow and wait for its result.

        ``await ctx.run(send_email, to, body)``. The parent is suspended (its slot freed)
        until the child finishes; a failed child raises ``TaskFailed`` here. Pass
        ``fn.options(queue=...)`` to change the child's options. The outcome the parent
        sees is recorded in its own log: restarting the child later does not change it.
        """
        return ChildCall(self, fn, args, kwargs)

    async def spawn(self, fn: Definition[Any, Any] | str, /, *args: Any, **kwargs: Any) -> ChildHandle:
        """Start a child now without waiting; ``await handle`` later for its result."""
        self._begin("spawn", getattr(fn, "name", str(fn)))
        try:
            return (await self._start_children([ChildCall(self, fn, args, kwargs)]))[0]
        finally:
            self._busy = None

    async def _start_children(self, calls: Sequence[ChildCall]) -> list[ChildHandle]:
        handles: list[ChildHandle | None] = []
        new: list[tuple[int, str, NewTask]] = []
        for call in calls:
            d = self._definition(call.target)
            dig = digest("child", d.name, [list(call.args), call.kwargs])
            seq, event = self._next("child", d.name, dig)
            if event is not None:
                assert event.child_id is not None
                handles.append(ChildHandle(self, seq, event.child_id, event))
                continue
            what = f"the arguments of child {d.name!r}"
            new.append(
                (
                    seq,
                    dig,
                    NewTask(
                        name=d.name,
                        args=dumps(list(call.args), what=what),
                        kwargs=dumps(call.kwargs, what=what),
                        queue=d.queue,
                        kind=d.kind,
                        priority=d.priority,
                        max_attempts=d.max_attempts,
                        timeout=d.timeout,
                        concurrency_key=(key := d.key_for(call.args, call.kwargs)),
                        key_limit=d.key_limit if key is not None else None,
                        key_rate_limit=d.key_rate[0] if d.key_rate and key else None,
                        key_rate_period=d.key_rate[1] if d.key_rate and key else None,
                        # The child's attempts join this workflow's trace.
                        trace_context=tracing.inject() or self._task.trace_context,
                    ),
                )
            )
            handles.append(None)
        if new:
            try:
                ids = await self._store.spawn_children(
                    task_id=self._task.id,
                    token=self._task.token,
                    branch=self._task.branch,
                    attempt=self._task.attempt,
                    root_id=self._task.root_id or self._task.id,
                    children=new,
                )
            except LeaseLost as exc:
                raise self._aborted(exc) from None
            it = iter(zip(new, ids, strict=True))
            for i, h in enumerate(handles):
                if h is None:
                    (seq, _, _), child_id = next(it)
                    handles[i] = ChildHandle(self, seq, child_id, None)
        return [h for h in handles if h is not None]

    def _definition(self, target: Definition[Any, Any] | str) -> Definition[Any, Any]:
        if isinstance(target, Definition):
            return target
        d = self._registry_get(target)
        if d is None:
            # A child defined elsewhere (another service's daemon runs it).
            return Definition(name=target, fn=_remote, kind="task")
        return d

    async def gather(self, *aws: ChildCall | ChildHandle) -> list[Any]:
        """Start every child among ``aws`` at once, then wait for all of them.

        The parent is woken once, when the last one finishes (a fan-out of 1000 children
        costs a handful of resumptions, not 1000). Results come back in order; if any
        child failed, the first failure in order is raised once all have finished.
        """
        for a in aws:
            if not isinstance(a, ChildCall | ChildHandle):
                raise TypeError(
                    f"ctx.gather takes ctx.run(...) calls and ctx.spawn handles, not {type(a)}"
                )
        self._begin("gather", f"{len(aws)} children")
        try:
            return await self._gather(aws)
        finally:
            self._busy = None

    async def _gather(self, aws: Sequence[ChildCall | ChildHandle]) -> list[Any]:
        calls = [a for a in aws if isinstance(a, ChildCall)]
        started = iter(await self._start_children(calls)) if calls else iter(())
        handles = [next(started) if isinstance(a, ChildCall) else a for a in aws]
        waiting = [
            h.id for h in handles
            if h._event is None
            or (h._event.status == "pending" and h._event.child_status not in TERMINAL)
        ]
        if waiting:
            raise Suspend(waiting_on=waiting)
        # What the parent now sees goes into its own log first: a child restarted later
        # (durable retry or replay of the child) cannot change this parent's past.
        fresh = [h for h in handles if h._event is not None and h._event.status == "pending"]
        if fresh:
            await self._record_children(fresh)
        out: list[Any] = []
        first_error: BaseException | None = None
        failed: list[int] = []
        for h in handles:
            ev = h._event
            assert ev is not None
            try:
                out.append(child_outcome(h.id, ev.status, ev.result, ev.error))
            except (TaskFailed, TaskCancelled) as exc:
                out.append(None)
                failed.append(h.seq)
                first_error = first_error or exc
        if first_error is not None:
            _mark(first_error, failed, self._seq)
            raise first_error
        return out

    async def _record_children(self, handles: Sequence[ChildHandle]) -> None:
        rows: list[tuple[int, str, str | None, str | None]] = []
        for h in handles:
            ev = h._event
            assert ev is not None
            if ev.child_status == "completed":
                rows.append((h.seq, "completed", ev.child_result, None))
            elif ev.child_status == "cancelled":
                rows.append((h.seq, "failed", None, CANCELLED))
            else:
                rows.append((h.seq, "failed", None, ev.child_error or "{}"))
        t = self._task
        if not await self._store.record_children(t.id, t.token, t.branch, rows):
            raise self._aborted(
                LeaseLost(f"task {t.id}: its children's outcomes were not recorded; the claim was lost")
            )
        for h, (_, status, result, error) in zip(handles, rows, strict=True):
            assert h._event is not None
            h._event = replace(h._event, status=status, result=result, error=error)

    # -- time and events ----------------------------------------------------------------

    async def sleep(self, seconds: float, *, name: str = "sleep") -> None:
        """Sleep durably: the workflow is suspended and its slot freed until the time comes."""
        # The database's clock, as every deadline it compares (durable.suspend).
        await self.sleep_until(
            self._store.now() + timedelta(seconds=max(0.0, seconds)), name=name
        )

    async def sleep_until(self, when: datetime, *, name: str = "sleep") -> None:
        """Sleep durably until ``when`` (an aware datetime)."""
        check_name("sleep", name)
        if when.tzinfo is None:
            raise ValueError("sleep_until needs an aware datetime (with tzinfo)")
        dig = digest("sleep", name, None)
        self._begin("sleep", name)
        try:
            seq, event = self._next("sleep", name, dig)
            if event is None:
                await self._commit(self._cp(seq, "sleep", name, dig, wake_at=when))
                wake = when
            else:
                assert event.wake_at is not None
                wake = event.wake_at
        finally:
            self._busy = None
        if self._store.now() < wake:
            raise Suspend(wake_at=wake)

    async def wait_for_event(self, name: str, *, timeout: float | None = None) -> Any:
        """Wait for ``client.send_event(task_id, name, payload)``; returns the payload.

        An event sent before the workflow waits for it is kept and delivered. The
        workflow is suspended while it waits. After ``timeout`` seconds it raises
        ``durable.EventTimeout``; an event sent after that stays unconsumed (``send_event``
        still returns True), for a later wait of the same name to take.
        """
        check_name("event", name)
        dig = digest("event", name, None)
        self._begin("event", name)
        try:
            seq, event = self._next("event", name, dig)
            if event is not None and event.status == "completed":
                return loads(event.result)
            if event is not None and event.status == "failed":
                raise self._timeout(seq, f"no event {name!r} arrived before the timeout")
            if event is not None:
                deadline = event.wake_at
            else:
                deadline = (
                    self._store.now() + timedelta(seconds=timeout)
                    if timeout is not None
                    else None
                )
            cp = self._cp(seq, "event", name, dig, status="pending")
            try:
                outcome, payload = await self._store.resolve_wait(
                    cp, name, deadline, event is not None
                )
            except LeaseLost as exc:
                raise self._aborted(exc) from None
            if outcome == "completed":
                return loads(payload)
            if outcome == "failed":
                raise self._timeout(seq, f"no event {name!r} arrived within {timeout}s")
        finally:
            self._busy = None
        raise Suspend(wake_at=deadline, event=name)

    def _timeout(self, seq: int, message: str) -> EventTimeout:
        exc = EventTimeout(message)
        _mark(exc, [seq], self._seq)
        return exc

    # -- memoised values -------------------------------------------------------------------

    async def _memo(self, name: str, produce: Callable[[], Any]) -> Any:
        dig = digest("memo", name, None)
        self._begin("memo", name)
        try:
            seq, event = self._next("memo", name, dig)
            if event is not None:
                return loads(event.result)
            value = produce()
            await self._commit(self._cp(seq, "memo", name, dig, result=dumps(value)))
            return value
        finally:
            self._busy = None

    async def now(self) -> datetime:
        """The current time, recorded: the same value on every replay."""
        return datetime.fromisoformat(
            await self._memo("now", lambda: self._store.now().isoformat())
        )

    async def uuid4(self) -> _uuid.UUID:
        """A random UUID, recorded."""
        return _uuid.UUID(await self._memo("uuid4", lambda: str(_uuid.uuid4())))

    async def random(self) -> float:
        """A random float in [0, 1), recorded."""
        return float(await self._memo("random", _random.random))


def _mark(exc: BaseException, positions: list[int], at: int) -> None:
    """Note on ``exc`` the log positions whose recorded failure it is, and the position the
    workflow had reached when it saw it. If it ends the attempt, its stored error carries
    both (codec.error_payload): the retry drops those events, when nothing was recorded
    after they were seen, and runs the calls again."""
    attrs = getattr(exc, "__dict__", None)
    if isinstance(attrs, dict):  # one without a __dict__ ends the attempt unmarked
        attrs["__durable_failure__"] = {"positions": positions, "at": at}


async def _remote(*_args: Any, **_kwargs: Any) -> Any:  # pragma: no cover - never called
    raise RuntimeError("a task defined in another service runs there")

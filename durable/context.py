"""durable.Context: what a workflow calls to make durable progress (replay.py matches
those calls against the event log)."""

from __future__ import annotations

import inspect
import random as _random
import uuid as _uuid
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from durable import steps
from durable.codec import digest, dumps, dumps_spaced, error_text, loads, loads_as_stored
from durable.errors import (
    EventTimeout,
    LeaseLost,
    TaskCancelled,
    TaskFailed,
)
from durable.models import TERMINAL, Claimed, Event, NewTask
from durable.registry import Definition
from durable.replay import (
    CANCELLED,
    NO_TRACING,
    CheckpointWriter,
    Journal,
    StepTracer,
    Suspend,
    _mark,
    as_recorded,
    check_name,
    child_outcome,
)

if TYPE_CHECKING:
    from durable.retry import RetryPolicy
    from durable.store import Store

__all__ = ["ChildCall", "ChildHandle", "Context", "Suspend"]


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
        checkpoints: CheckpointWriter,
        registry_get: Callable[[str], Definition[Any, Any] | None],
        tracer: StepTracer = NO_TRACING,
    ) -> None:
        self._store = store
        self._task = task
        self._log = Journal(task, events, checkpoints, store.now)
        self._registry_get = registry_get
        self._tracer = tracer

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
        return self._log.seq

    def check_consumed(self) -> None:
        """At the workflow's return: its whole log was replayed, and nothing aborted it."""
        self._log.check_consumed()

    # -- steps ----------------------------------------------------------------------

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` (sync or async) once and record its JSON result.

        ``retry=durable.RetryPolicy(max_attempts=4, base=0.5)`` retries a failing step
        inside this run, with the policy's backoff (a backoff longer than a few seconds
        suspends the workflow and frees its slot); ``timeout`` (seconds) bounds each try of
        an async ``fn``. Every try is recorded in the event log. ``retry`` and ``timeout``
        are the step's own keywords, never passed to ``fn``; bind arguments of those names
        with ``functools.partial`` (they are then not part of the argument digest).

        A step runs at least once: a crash after it ran but before its checkpoint
        committed runs it again, so give side effects an idempotency key (for example
        ``f"{ctx.task_id}-{name}"``). Its result is returned as it will be on replay (read
        back as Postgres stores it: a dict's keys in jsonb's order, a tuple as a list).
        Its error is recorded and raised as it will be on replay: the same class with the
        same ``args`` and JSON attributes (built without calling its ``__init__``), or
        ``TaskFailed`` when its class cannot be rebuilt.
        """
        if retry is not None or timeout is not None:
            return await steps.run(
                self._log, self._store, self._tracer, "step", name, fn, args, kwargs, retry,
                timeout,
            )
        check_name("step", name)
        dig = digest("step", name, [args, kwargs])
        self._log.begin("step", name)
        try:
            seq, event = self._log.next("step", name, dig)
            if event is not None:
                return self._log.recorded(seq, event)
            started = self._store.now()
            failure: Exception | None = None
            with self._tracer.step_span(name, seq, "step"):
                try:
                    result = fn(*args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                except Exception as exc:
                    failure = exc
                if failure is not None:
                    error = error_text(failure)
                    del failure
                    await self._log.commit(
                        self._log.checkpoint(seq, "step", name, dig, status="failed", error=error, started_at=started)
                    )
                    raise self._log.failure([seq], loads_as_stored(error))
                text = await dumps_spaced(result, what=f"the result of step {name!r}")
                await self._log.commit(self._log.checkpoint(seq, "step", name, dig, result=text, started_at=started))
            return as_recorded(result, text)
        finally:
            self._log.busy = None

    async def transaction(
        self,
        name: str,
        fn: Callable[..., Awaitable[Any]],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``await fn(conn, *args, **kwargs)`` in the transaction that records it.

        ``conn`` is an asyncpg connection inside a transaction; the business writes it
        makes commit together with the checkpoint, so they happen exactly once. Its result
        and its error come back as a step's do; ``retry`` and ``timeout`` too (a failed try
        rolled back: its writes did not happen).
        """
        if retry is not None or timeout is not None:
            return await steps.run(
                self._log, self._store, self._tracer, "transaction", name, fn, args, kwargs,
                retry, timeout,
            )
        check_name("transaction", name)
        dig = digest("transaction", name, [args, kwargs])
        self._log.begin("transaction", name)
        try:
            seq, event = self._log.next("transaction", name, dig)
            if event is not None:
                return self._log.recorded(seq, event)
            cp = self._log.checkpoint(seq, "transaction", name, dig)
            failure: Exception | None = None
            with self._tracer.step_span(name, seq, "transaction"):
                try:
                    result = await self._store.transaction_step(cp, fn, args, kwargs)
                except LeaseLost as exc:
                    raise self._log.aborted(exc) from None
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
                    await self._log.commit(
                        self._log.checkpoint(
                            seq, "transaction", name, dig, status="failed",
                            error=error, started_at=cp.started_at,
                        )
                    )
                    raise self._log.failure([seq], loads_as_stored(error))
            return as_recorded(result, dumps(result))
        finally:
            self._log.busy = None

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
        self._log.begin("spawn", getattr(fn, "name", str(fn)))
        try:
            return (await self._start_children([ChildCall(self, fn, args, kwargs)]))[0]
        finally:
            self._log.busy = None

    async def _start_children(self, calls: Sequence[ChildCall]) -> list[ChildHandle]:
        handles: list[ChildHandle | None] = []
        new: list[tuple[int, str, NewTask]] = []
        for call in calls:
            d = self._definition(call.target)
            dig = digest("child", d.name, [list(call.args), call.kwargs])
            seq, event = self._log.next("child", d.name, dig)
            if event is not None:
                assert event.child_id is not None
                handles.append(ChildHandle(self, seq, event.child_id, event))
                continue
            # The child's attempts join this workflow's trace.
            trace = self._tracer.inject() or self._task.trace_context
            task = NewTask.from_definition(d, call.args, call.kwargs, trace_context=trace)
            new.append((seq, dig, task))
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
                raise self._log.aborted(exc) from None
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
            return Definition.elsewhere(target)
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
        self._log.begin("gather", f"{len(aws)} children")
        try:
            return await self._gather(aws)
        finally:
            self._log.busy = None

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
            _mark(first_error, failed, self._log.seq)
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
            raise self._log.aborted(
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
        self._log.begin("sleep", name)
        try:
            seq, event = self._log.next("sleep", name, dig)
            if event is None:
                await self._log.commit(self._log.checkpoint(seq, "sleep", name, dig, wake_at=when))
                wake = when
            else:
                assert event.wake_at is not None
                wake = event.wake_at
        finally:
            self._log.busy = None
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
        self._log.begin("event", name)
        try:
            seq, event = self._log.next("event", name, dig)
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
            cp = self._log.checkpoint(seq, "event", name, dig, status="pending")
            try:
                outcome, payload = await self._store.resolve_wait(
                    cp, name, deadline, event is not None
                )
            except LeaseLost as exc:
                raise self._log.aborted(exc) from None
            if outcome == "completed":
                return loads(payload)
            if outcome == "failed":
                raise self._timeout(seq, f"no event {name!r} arrived within {timeout}s")
        finally:
            self._log.busy = None
        raise Suspend(wake_at=deadline, event=name)

    def _timeout(self, seq: int, message: str) -> EventTimeout:
        exc = EventTimeout(message)
        _mark(exc, [seq], self._log.seq)
        return exc

    # -- progress --------------------------------------------------------------------------

    def progress(self, value: Any = None, message: str | None = None) -> None:
        """Report the workflow's progress, as ``durable.TaskContext.progress`` does.

        Not a durable call: it takes no position in the event log, and a replay reports
        again what the run it repeats reported (the latest report is what is stored).
        """
        from durable.taskcontext import current

        current().progress(value, message)

    # -- memoised values -------------------------------------------------------------------

    async def _memo(self, name: str, produce: Callable[[], Any]) -> Any:
        dig = digest("memo", name, None)
        self._log.begin("memo", name)
        try:
            seq, event = self._log.next("memo", name, dig)
            if event is not None:
                return loads(event.result)
            value = produce()
            await self._log.commit(self._log.checkpoint(seq, "memo", name, dig, result=dumps(value)))
            return value
        finally:
            self._log.busy = None

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

"""durable.Context: what a workflow calls to make durable progress, and its replay cursor."""

from __future__ import annotations

import importlib
import inspect
import random as _random
import uuid as _uuid
from collections.abc import Awaitable, Callable, Generator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from durable import tracing
from durable.batch import Batcher
from durable.codec import digest, dumps, error_payload, loads
from durable.errors import (
    EventTimeout,
    LeaseLost,
    NonDeterminismError,
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


def rebuild_error(task_id: int, error: dict[str, Any] | None) -> Exception:
    """The recorded error of a step, raised again on replay as its own type when possible."""
    error = error or {}
    type_name = str(error.get("type", "Exception"))
    message = str(error.get("message", ""))
    module, _, qualname = type_name.rpartition(".")
    args = error.get("args")
    if module and isinstance(args, list):
        try:
            cls = getattr(importlib.import_module(module), qualname)
            if isinstance(cls, type) and issubclass(cls, Exception):
                return cls(*args)
        except Exception:
            pass
    return TaskFailed(task_id, type_name, message, error.get("traceback"))


_SCALARS = frozenset({int, float, str, bool, type(None)})


def as_recorded(value: Any, text: str) -> Any:
    """What a replay would return for a result recorded as ``text``: its decoding, or
    ``value`` itself when that is a plain scalar (it decodes to an equal one)."""
    if type(value) in _SCALARS:
        return value
    return loads(text)


def child_outcome(child_id: int, status: str | None, result: str | None, error: str | None) -> Any:
    if status == "completed":
        return loads(result)
    if status == "cancelled":
        raise TaskCancelled(child_id)
    err = loads(error) or {}
    raise TaskFailed(
        child_id, str(err.get("type", "Error")), str(err.get("message", "")), err.get("traceback")
    )


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

    def _next(self, kind: str, name: str, dig: str) -> tuple[int, Event | None]:
        seq = self._seq
        self._seq += 1
        return seq, match(self._events.get(seq), seq, kind, name, dig)

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
        if not await self._checkpoints.submit(cp):
            raise LeaseLost(
                f"task {cp.task_id}: checkpoint {cp.seq} rejected; another worker holds the task"
            )

    def check_consumed(self) -> None:
        err = unconsumed(self._events, self._seq)
        if err is not None:
            raise err

    def _recorded(self, event: Event) -> Any:
        if event.status == "failed":
            raise rebuild_error(self._task.id, loads(event.error))
        return loads(event.result)

    # -- steps ----------------------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` (sync or async) once and record its JSON result.

        A step runs at least once: a crash after it ran but before its checkpoint
        committed runs it again, so give side effects an idempotency key (for example
        ``f"{ctx.task_id}-{name}"``). Its error is recorded too and raised again on replay.
        """
        dig = digest("step", name, [args, kwargs])
        seq, event = self._next("step", name, dig)
        if event is not None:
            return self._recorded(event)
        started = self._store.now()
        with tracing.step_span(name, seq, "step"):
            try:
                result = fn(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                await self._commit(
                    self._cp(
                        seq, "step", name, dig, status="failed",
                        error=dumps(error_payload(exc)), started_at=started,
                    )
                )
                raise
            text = dumps(result, what=f"the result of step {name!r}")
            await self._commit(self._cp(seq, "step", name, dig, result=text, started_at=started))
        return as_recorded(result, text)

    async def transaction(
        self, name: str, fn: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Run ``await fn(conn, *args, **kwargs)`` in the transaction that records it.

        ``conn`` is an asyncpg connection inside a transaction; the business writes it
        makes commit together with the checkpoint, so they happen exactly once.
        """
        dig = digest("transaction", name, [args, kwargs])
        seq, event = self._next("transaction", name, dig)
        if event is not None:
            return self._recorded(event)
        cp = self._cp(seq, "transaction", name, dig)
        with tracing.step_span(name, seq, "transaction"):
            try:
                result = await self._store.transaction_step(cp, fn, args, kwargs)
            except LeaseLost:
                raise
            except Exception as exc:
                from durable.store import is_transient

                if is_transient(exc):
                    # A lost connection, a deadlock, a serialization failure: the
                    # transaction rolled back and none of it happened. That is no outcome
                    # to record (replays would raise it for ever): this attempt fails and
                    # the next one runs the transaction again.
                    raise
                await self._commit(
                    self._cp(
                        seq, "transaction", name, dig, status="failed",
                        error=dumps(error_payload(exc)), started_at=cp.started_at,
                    )
                )
                raise
        return as_recorded(result, dumps(result))

    # -- children ---------------------------------------------------------------------

    def run(self, fn: Definition[Any, Any] | str, /, *args: Any, **kwargs: Any) -> ChildCall:
        """Start ``fn`` as a child task or workflow and wait for its result.

        ``await ctx.run(send_email, to, body)``. The parent is suspended (its slot freed)
        until the child finishes; a failed child raises ``TaskFailed`` here. Pass
        ``fn.options(queue=...)`` to change the child's options.
        """
        return ChildCall(self, fn, args, kwargs)

    async def spawn(self, fn: Definition[Any, Any] | str, /, *args: Any, **kwargs: Any) -> ChildHandle:
        """Start a child now without waiting; ``await handle`` later for its result."""
        return (await self._start_children([ChildCall(self, fn, args, kwargs)]))[0]

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
            ids = await self._store.spawn_children(
                task_id=self._task.id,
                token=self._task.token,
                branch=self._task.branch,
                attempt=self._task.attempt,
                root_id=self._task.root_id or self._task.id,
                children=new,
            )
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
        calls = [a for a in aws if isinstance(a, ChildCall)]
        for a in aws:
            if not isinstance(a, ChildCall | ChildHandle):
                raise TypeError(
                    f"ctx.gather takes ctx.run(...) calls and ctx.spawn handles, not {type(a)}"
                )
        started = iter(await self._start_children(calls)) if calls else iter(())
        handles = [next(started) if isinstance(a, ChildCall) else a for a in aws]
        waiting = [
            h.id for h in handles if h._event is None or h._event.child_status not in TERMINAL
        ]
        if waiting:
            raise Suspend(waiting_on=waiting)
        out: list[Any] = []
        first_error: BaseException | None = None
        for h in handles:
            ev = h._event
            assert ev is not None
            try:
                out.append(child_outcome(h.id, ev.child_status, ev.child_result, ev.child_error))
            except (TaskFailed, TaskCancelled) as exc:
                out.append(None)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return out

    # -- time and events ----------------------------------------------------------------

    async def sleep(self, seconds: float, *, name: str = "sleep") -> None:
        """Sleep durably: the workflow is suspended and its slot freed until the time comes."""
        # The database's clock, as every deadline it compares (durable.suspend).
        await self.sleep_until(
            self._store.now() + timedelta(seconds=max(0.0, seconds)), name=name
        )

    async def sleep_until(self, when: datetime, *, name: str = "sleep") -> None:
        """Sleep durably until ``when`` (an aware datetime)."""
        if when.tzinfo is None:
            raise ValueError("sleep_until needs an aware datetime (with tzinfo)")
        dig = digest("sleep", name, None)
        seq, event = self._next("sleep", name, dig)
        if event is None:
            await self._commit(self._cp(seq, "sleep", name, dig, wake_at=when))
            wake = when
        else:
            assert event.wake_at is not None
            wake = event.wake_at
        if self._store.now() < wake:
            raise Suspend(wake_at=wake)

    async def wait_for_event(self, name: str, *, timeout: float | None = None) -> Any:
        """Wait for ``client.send_event(task_id, name, payload)``; returns the payload.

        An event sent before the workflow waits for it is kept and delivered. The
        workflow is suspended while it waits. After ``timeout`` seconds it raises
        ``durable.EventTimeout``.
        """
        dig = digest("event", name, None)
        seq, event = self._next("event", name, dig)
        if event is not None and event.status == "completed":
            return loads(event.result)
        if event is not None and event.status == "failed":
            raise EventTimeout(f"no event {name!r} arrived before the timeout")
        if event is not None:
            deadline = event.wake_at
        else:
            deadline = (
                self._store.now() + timedelta(seconds=timeout) if timeout is not None else None
            )
        cp = self._cp(seq, "event", name, dig, status="pending")
        outcome, payload = await self._store.resolve_wait(cp, name, deadline, event is not None)
        if outcome == "completed":
            return loads(payload)
        if outcome == "failed":
            raise EventTimeout(f"no event {name!r} arrived within {timeout}s")
        raise Suspend(wake_at=deadline, event=name)

    # -- memoised values -------------------------------------------------------------------

    async def _memo(self, name: str, produce: Callable[[], Any]) -> Any:
        dig = digest("memo", name, None)
        seq, event = self._next("memo", name, dig)
        if event is not None:
            return loads(event.result)
        value = produce()
        await self._commit(self._cp(seq, "memo", name, dig, result=dumps(value)))
        return value

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


async def _remote(*_args: Any, **_kwargs: Any) -> Any:  # pragma: no cover - never called
    raise RuntimeError("a task defined in another service runs there")

"""durable.Context: what a workflow calls to make durable progress (replay.py matches
those calls against the event log)."""

from __future__ import annotations

import inspect
import random as _random
import uuid as _uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from durable import steps
from durable.children import ChildCall, ChildHandle, Children
from durable.codec import digest, dumps, dumps_spaced, error_text, heavy, loads, loads_as_stored
from durable.errors import (
    EventTimeout,
    LeaseLost,
    NonRetryable,
)
from durable.models import Claimed, Event
from durable.patching import PatchCall, Patching
from durable.registry import Definition
from durable.replay import (
    NO_TRACING,
    CheckpointWriter,
    ContinueAsNew,
    Journal,
    StepTracer,
    Suspend,
    _mark,
    as_recorded,
    check_name,
)

if TYPE_CHECKING:
    from durable.hooks import Hooks
    from durable.retry import RetryPolicy
    from durable.store import Store

__all__ = ["ChildCall", "ChildHandle", "Context", "PatchCall", "Suspend"]


class Context(Children, Patching):
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
        hooks: Hooks | None = None,
    ) -> None:
        self._store = store
        self._task = task
        self._log = Journal(task, events, checkpoints, store.now)
        self._registry_get = registry_get
        self._tracer = tracer
        self._hooks = hooks
        """The test kit's seams (durable.hooks); None in every other daemon."""

    @classmethod
    def over(
        cls,
        store: Store,
        task: Claimed,
        journal: Journal,
        registry_get: Callable[[str], Definition[Any, Any] | None],
    ) -> Context:
        """A context whose durable calls go through ``journal`` (``durable verify`` gives
        one that replays and never writes)."""
        ctx = cls(store, task, (), journal.writer, registry_get)
        ctx._log = journal
        return ctx

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
                timeout, self._hooks,
            )
        check_name("step", name)
        dig = digest("step", name, [args, kwargs])
        self._log.begin("step", name)
        try:
            seq, event = self._log.next("step", name, dig)
            if event is not None:
                return self._log.recorded(seq, event)
            started = self._store.epoch()
            failure: Exception | None = None
            with self._tracer.step_span(name, seq, "step"):
                try:
                    if self._hooks is not None:
                        await self._hooks.before_call(self._task, "step", name)
                    result = fn(*args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                except Exception as exc:
                    failure = exc
                if self._hooks is not None:
                    await self._hooks.after_call(self._task, "step", name)
                if failure is not None:
                    error = error_text(failure)
                    del failure
                    await self._log.commit(
                        self._log.checkpoint(seq, "step", name, dig, status="failed", error=error, started_at=started)
                    )
                    raise self._log.failure([seq], loads_as_stored(error))
                what = f"the result of step {name!r}"
                # The common case without the coroutines of dumps_spaced and Journal.commit:
                # every level a step's wait passes through costs each resumption.
                text = dumps(result, what=what) if not heavy(result) else await dumps_spaced(result, what=what)
                cp = self._log.checkpoint(seq, "step", name, dig, result=text, started_at=started)
                ok = await self._log.writer.submit(cp)
                if ok is not True:
                    self._log.refused(cp, ok)
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
                retry, timeout, self._hooks,
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
                    if self._hooks is not None:
                        await self._hooks.before_call(self._task, "transaction", name)
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

    # -- time and events ----------------------------------------------------------------

    async def sleep(self, seconds: float, *, name: str = "sleep") -> None:
        """Sleep durably: the workflow is suspended and its slot freed until the time comes."""
        # The database's clock, as every deadline it compares (durable.suspend).
        delta = timedelta(seconds=_wait_seconds(seconds, "ctx.sleep: seconds"))
        await self._sleep(self._store.now() + delta, name)

    async def sleep_until(self, when: datetime, *, name: str = "sleep") -> None:
        """Sleep durably until ``when`` (an aware datetime)."""
        if isinstance(when, datetime) and when.tzinfo is not None and self._hooks is not None:
            when = when - self._hooks.shift()  # from the test's moved clock to the database's
        await self._sleep(when, name)

    async def _sleep(self, when: datetime, name: str) -> None:
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
        if self._log.asleep(wake):
            raise Suspend(wake_at=wake)

    async def wait_for_event(self, name: str, *, timeout: float | None = None) -> Any:
        """Wait for ``client.send_event(task_id, name, payload)``; returns the payload.

        An event sent before the workflow waits for it is kept and delivered. The
        workflow is suspended while it waits. After ``timeout`` seconds it raises
        ``durable.EventTimeout``; an event sent after that stays unconsumed (``send_event``
        still returns True), for a later wait of the same name to take.
        """
        check_name("event", name)
        if timeout is not None:
            timeout = _wait_seconds(timeout, "ctx.wait_for_event: timeout")
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
        return datetime.fromisoformat(await self._memo("now", self._now_text))

    def _now_text(self) -> str:
        now = self._store.now()
        if self._hooks is not None:
            now += self._hooks.shift()  # the test's moved clock (durable.testing)
        return now.isoformat()

    async def uuid4(self) -> _uuid.UUID:
        """A random UUID, recorded."""
        return _uuid.UUID(await self._memo("uuid4", lambda: str(_uuid.uuid4())))

    async def random(self) -> float:
        """A random float in [0, 1), recorded."""
        return float(await self._memo("random", _random.random))

    # -- chains ----------------------------------------------------------------------------

    def continue_as_new(self, *args: Any, **kwargs: Any) -> NoReturn:
        """End this run and start the workflow afresh with these arguments and an empty
        event log: the answer to a loop that would otherwise grow its log without end.

        ``raise``-like: nothing after it runs. The new run is a new task that takes over
        the idempotency key; ``client.result`` of any run of the chain returns the last
        run's outcome, and ``durable show`` names the previous and next runs. Not for a
        child workflow (its parent waits on this run): that fails it.
        """
        if self._task.parent_id is not None:
            raise NonRetryable(
                f"ctx.continue_as_new is for workflows started by a client: task "
                f"{self._task.id} is a child of {self._task.parent_id}"
            )
        self._log.check_consumed()
        raise ContinueAsNew(
            dumps(list(args), what="the arguments of continue_as_new"),
            dumps(kwargs, what="the keyword arguments of continue_as_new"),
        )


MAX_WAIT = 10 * 365 * 86400.0
"""Longest sleep or event timeout, in seconds: ten years, as for a start's delay."""


def _wait_seconds(value: object, what: str) -> float:
    """Seconds to wait, as ``ctx.sleep`` and ``ctx.wait_for_event`` take them: a negative
    number is no wait; NaN, infinity, more than ten years or not a number are refused."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value <= MAX_WAIT  # NaN too
    ):
        raise ValueError(
            f"{what} must be a number of seconds up to 10 years, got {value!r}"[:200]
        )
    return max(0.0, float(value))

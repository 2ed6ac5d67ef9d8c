"""Suspended workflows kept in memory: a resume on the daemon that suspended a workflow
continues its parked coroutine where it stopped, instead of replaying its whole log.

A workflow's coroutine runs inside its attempt's asyncio task, stepped by a trampoline
(``_drive``) that forwards everything it awaits to the event loop except one thing: the
``Park`` a ``ParkingContext`` awaits where a plain ``Context`` raises ``Suspend``. There
the trampoline stops stepping and the attempt ends as suspended, while the coroutine stays
parked at that ``await``, in a bounded least-recently-used table. The next attempt of the
same task on this daemon takes it back, checks with one statement that nobody ran the task
since (``load_tail``: the claim token of the attempt that suspended it, and the events from
the parked call's position on), and steps it again from the parked call, which runs once
more against those events. Anything else (no entry, another daemon's suspension, a retry,
replay or fork in between) is a cold resume: the log is loaded and replayed from the start,
as without the table. A dropped entry is unwound in a task of its own: the exception
``Evicted`` is thrown in at the parked call, so the workflow's ``finally`` blocks run as
they would have at a cold suspension; every durable call it makes meanwhile raises.

docs/architecture.md ("Warm resumes") says why a parked coroutine and not a replay.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from durable.context import ChildCall, ChildHandle, Context
from durable.errors import LeaseLost
from durable.logs import get_logger
from durable.metrics import Metrics, WorkflowCounts
from durable.models import Claimed, Event
from durable.replay import NO_TRACING, CheckpointWriter, StepTracer, Suspend

if TYPE_CHECKING:
    from durable.hooks import Hooks
    from durable.registry import Definition
    from durable.store import Store

log = get_logger("durable.sticky")

T = TypeVar("T")

UNWIND_TIMEOUT = 5.0
"""Seconds a dropped workflow's unwinding (its own ``finally`` blocks) gets at shutdown."""


class Evicted(BaseException):
    """Thrown into a parked workflow that this daemon no longer keeps: its run ends here
    (its next attempt, on any daemon, replays its log)."""


@dataclass
class Park:
    """What a ParkingContext awaits instead of raising ``suspend``: the trampoline stops at
    it. ``start`` is the position of the call that suspended; when it resumes, the call
    reads again the events from there on and those at the positions ``also`` (before it:
    the children of handles it waits for)."""

    suspend: Suspend
    start: int
    also: tuple[int, ...] = ()

    def __await__(self) -> Generator[Any, None, None]:
        yield self


class ParkingContext(Context):
    """A Context whose waits park the coroutine instead of ending it.

    A suspending call (sleep, wait_for_event, children) keeps its position; once resumed
    with the events from that position on, it runs again, as a replay would run it."""

    async def sleep(self, seconds: float, *, name: str = "sleep") -> None:
        # Run again after a resume, it finds its recorded wake-up time.
        await self._parking(lambda: super(ParkingContext, self).sleep(seconds, name=name))

    async def sleep_until(self, when: datetime, *, name: str = "sleep") -> None:
        await self._parking(lambda: super(ParkingContext, self).sleep_until(when, name=name))

    async def wait_for_event(self, name: str, *, timeout: float | None = None) -> Any:
        return await self._parking(
            lambda: super(ParkingContext, self).wait_for_event(name, timeout=timeout)
        )

    async def _parking(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``; where it would suspend, park, and run it again once resumed."""
        while True:
            start = self._log.seq
            try:
                return await call()
            except Suspend as s:
                await Park(s, start)

    async def gather(self, *aws: ChildCall | ChildHandle) -> list[Any]:
        while True:
            start = self._log.seq
            try:
                return await super().gather(*aws)
            except Suspend as s:
                # A handle from an earlier spawn reads its child's event again, as a
                # replay finds it: that event alone, not every event since it.
                handles = [a for a in aws if isinstance(a, ChildHandle)]
                await Park(s, start, tuple(h.seq for h in handles if h.seq < start))
                for h in handles:
                    h._event = self._log.events.get(h.seq, h._event)

    def _resumed(self, task: Claimed, start: int, events: Sequence[Event]) -> None:
        """Continue under a new claim: the parked call runs again at ``start``."""
        self._task = task
        log_ = self._log
        log_.task = task
        log_.events = {e.seq: e for e in events}
        log_.seq = start
        log_.busy = None
        log_.abort = None


@dataclass
class Parked:
    """One suspended workflow this daemon keeps: its coroutine, parked at ``park``."""

    task_id: int
    token: int
    branch: int
    attempt: int
    coro: Coroutine[Any, Any, Any]
    ctx: ParkingContext
    park: Park
    context: contextvars.Context
    """The attempt's context variables as it parked (its task context, its log fields):
    an unwinding runs in them, not in those of whichever attempt dropped it."""


class Finished:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Drive:
    """``await _Drive(coro)``: step ``coro`` in the current task until it returns
    (Finished) or awaits a Park (returned); what it raises propagates."""

    def __init__(self, coro: Coroutine[Any, Any, Any], error: BaseException | None = None):
        self.coro = coro
        self.error = error

    def __await__(self) -> Generator[Any, Any, Finished | Park]:
        coro = self.coro
        value: Any = None
        error = self.error
        while True:
            try:
                yielded = coro.throw(error) if error is not None else coro.send(value)
            except StopIteration as stop:
                return Finished(stop.value)
            finally:
                error = None
            if isinstance(yielded, Park):
                return yielded
            try:
                value = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancel or a timeout of the attempt
                value, error = None, exc


class WorkflowRuns:
    """Runs workflow attempts; keeps up to ``size`` suspended ones parked (0: none, and
    every wait raises Suspend through the workflow as a plain Context's does)."""

    def __init__(
        self,
        store: Store,
        checkpoints: CheckpointWriter,
        registry_get: Callable[[str], Definition[Any, Any] | None],
        *,
        size: int = 0,
        history_warning: int | None = None,
        tracer: StepTracer = NO_TRACING,
        metrics: Metrics | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self.store = store
        self.hooks = hooks
        self.checkpoints = checkpoints
        self.registry_get = registry_get
        self.size = size
        self.history_warning = history_warning
        self.tracer = tracer
        self.counts = metrics.workflows if metrics is not None else WorkflowCounts()
        self.parked: OrderedDict[int, Parked] = OrderedDict()
        self._unwinding: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self.parked)

    async def run(
        self,
        task: Claimed,
        call: Callable[[Context], Coroutine[Any, Any, Any]],
    ) -> Any:
        """Run (or resume) the workflow of ``task``: its result, or ``Suspend`` raised."""
        entry = self.parked.pop(task.id, None)
        known = await self._warm(task, entry) if entry is not None else None
        ctx: Context
        if entry is not None and known is not None:
            ctx, coro, start = entry.ctx, entry.coro, entry.park.start
        else:
            events: list[Event] = []
            if not task.fresh:
                events = await self.store.resume_events(task.id, task.branch, task.token)
                self.counts.cold += 1
                self.counts.loaded += len(events)
            # Without a table, a plain Context: its waits raise Suspend through the workflow.
            kind = ParkingContext if self.size > 0 else Context
            ctx = kind(
                self.store, task, events, self.checkpoints, self.registry_get, self.tracer,
                self.hooks,
            )
            made = call(ctx)
            if not asyncio.iscoroutine(made):
                return await made  # not an async function: fails as awaiting it does
            coro, start, known = made, 0, len(events)
        # Stepped here rather than in a coroutine of its own: a workflow resumes once per
        # step through every coroutine level between its task and the step.
        try:
            outcome = await _Drive(coro)
        finally:
            self._count(task, ctx, start, known)
        if isinstance(outcome, Finished):
            ctx.check_consumed()
            return outcome.value
        assert isinstance(ctx, ParkingContext)  # only a ParkingContext parks
        # Kept before the suspension is written: a claim of the task that comes back
        # first finds it. load_tail decides whether it may continue it.
        ctx._log.events = {}  # what it replayed; a resume reads what it needs again
        stale = self.parked.pop(task.id, None)
        if stale is not None:  # parked by an attempt that lost its claim meanwhile
            self._drop(stale, "replaced")
        self.parked[task.id] = Parked(
            task.id, task.token, task.branch, task.attempt, coro, ctx, outcome,
            contextvars.copy_context(),
        )
        while len(self.parked) > self.size:
            _, oldest = self.parked.popitem(last=False)
            self._drop(oldest, "full")
        raise outcome.suspend

    async def _warm(self, task: Claimed, entry: Parked) -> int | None:
        """Prepare a parked workflow for this claim: the number of events read, or None
        (and the entry dropped) when the claim may not continue it."""
        if (entry.branch, entry.attempt) == (task.branch, task.attempt):
            # Same branch and attempt: no retry, replay or fork since (each changes one).
            try:
                token, tail = await self.store.load_tail(
                    task.id, task.branch, entry.park.start, entry.park.also
                )
            except BaseException:
                self._drop(entry, "unread")  # the attempt fails; the next one replays
                raise
            if token == entry.token:
                # The attempt that suspended the task was this one's, and none ran it since.
                self.counts.warm += 1
                self.counts.loaded += len(tail)
                entry.ctx._resumed(task, entry.park.start, tail)
                return len(tail)
        self._drop(entry, "stale")
        return None

    def _count(self, task: Claimed, ctx: Context, start: int, known: int) -> None:
        self.counts.replayed += min(known, max(0, ctx.position - start))
        limit = self.history_warning
        if limit is not None and start + known < limit <= ctx.position:
            # Passed during this attempt: once per crossing, not at every resume after.
            self.counts.history_warnings += 1
            log.warning(
                "workflow_history_large",
                task_id=task.id,
                name=task.name,
                events=ctx.position,
                limit=limit,
                note="a cold resume replays the whole log; ctx.continue_as_new starts afresh",
            )

    def discard(self, task_id: int, token: int) -> None:
        """The suspension of this attempt was not written: drop what was kept of it."""
        entry = self.parked.get(task_id)
        if entry is not None and entry.token == token:
            del self.parked[task_id]
            self._drop(entry, "not_suspended")

    def _drop(self, entry: Parked, reason: str) -> None:
        self.counts.evicted += 1
        log.debug("workflow_evicted", task_id=entry.task_id, reason=reason)
        entry.ctx._log.abort = LeaseLost(
            f"task {entry.task_id}: this daemon no longer keeps its suspended run"
        )
        t = asyncio.get_running_loop().create_task(_unwind(entry.coro), context=entry.context)
        self._unwinding.add(t)
        t.add_done_callback(self._unwinding.discard)

    async def close(self) -> None:
        """Drop every parked workflow and let their unwinding finish (bounded)."""
        while self.parked:
            _, entry = self.parked.popitem(last=False)
            self._drop(entry, "stopping")
        if self._unwinding:
            await asyncio.wait(set(self._unwinding), timeout=UNWIND_TIMEOUT)
            for t in list(self._unwinding):
                t.cancel()


async def _unwind(coro: Coroutine[Any, Any, Any]) -> None:
    error: BaseException = Evicted()
    for _ in range(3):  # a workflow that parks again while unwinding is thrown out again
        try:
            outcome = await _Drive(coro, error)
        except BaseException:
            return  # Evicted, or whatever its own code raised while unwinding
        if isinstance(outcome, Finished):
            return
        error = Evicted()
    coro.close()

"""A workflow's children: ``ctx.run``, ``ctx.spawn`` and ``ctx.gather`` of
``durable.Context``, started in one statement and awaited through the event log."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from durable.codec import digest, error_text
from durable.errors import LeaseLost, TaskCancelled, TaskFailed
from durable.models import TERMINAL, Claimed, Event, NewTask
from durable.registry import Definition
from durable.replay import (
    CANCELLED,
    Journal,
    StepTracer,
    Suspend,
    _mark,
    child_outcome,
)

if TYPE_CHECKING:
    from durable.store import Store

__all__ = ["ChildCall", "ChildHandle", "Children"]


class ChildCall:
    """``ctx.run(fn, ...)``: awaiting it starts the child (once) and waits for its result."""

    def __init__(self, ctx: Children, target: Definition[Any, Any] | str, args: Any, kwargs: Any):
        self.ctx = ctx
        self.target = target
        self.args = args
        self.kwargs = kwargs

    def __await__(self) -> Generator[Any, None, Any]:
        results = yield from self.ctx.gather(self).__await__()
        return results[0]


class ChildHandle:
    """A started child (``await ctx.spawn(...)``); await it for the child's result."""

    def __init__(self, ctx: Children, seq: int, child_id: int, event: Event | None) -> None:
        self.ctx = ctx
        self.seq = seq
        self.id = child_id
        self._event = event

    def __await__(self) -> Generator[Any, None, Any]:
        results = yield from self.ctx.gather(self).__await__()
        return results[0]


class Children:
    """The child calls of ``durable.Context``."""

    _log: Journal
    _store: Store
    _task: Claimed
    _registry_get: Callable[[str], Definition[Any, Any] | None]
    _tracer: StepTracer

    def run(self, fn: Definition[Any, Any] | str, /, *args: Any, **kwargs: Any) -> ChildCall:
        """Start ``fn`` as a child task or workflow and wait for its result.

        ``await ctx.run(send_email, to, body)``. The parent is suspended (its slot freed)
        until the child finishes; a failed child raises ``TaskFailed`` here. Pass
        ``fn.options(queue=...)`` to change the child's options. The outcome the parent
        sees is recorded in its own log: restarting the child later does not change it.
        """
        return ChildCall(self, fn, args, kwargs)

    async def spawn(self, fn: Definition[Any, Any] | str, /, *args: Any, **kwargs: Any) -> ChildHandle:
        """Start a child now without waiting; ``await handle`` later for its result.

        Each spawn is a transaction of its own: to start many children, :meth:`spawn_many`
        starts them in one.
        """
        self._log.begin("spawn", getattr(fn, "name", str(fn)))
        try:
            return (await self._start_children([ChildCall(self, fn, args, kwargs)]))[0]
        finally:
            self._log.busy = None

    async def spawn_many(
        self,
        fn: Definition[Any, Any] | str,
        calls: Iterable[Sequence[Any] | tuple[Sequence[Any], dict[str, Any]]],
        /,
    ) -> list[ChildHandle]:
        """Start a child of ``fn`` for each of ``calls`` now, in one transaction, without
        waiting; their handles, in order.

        ``calls`` holds one argument list per child, or ``(args, kwargs)`` pairs, as
        ``client.start_many`` takes them. The log is the one the same ``ctx.spawn`` calls
        made one after the other record (a position per child), so either replays the
        other's history. A crash before the transaction commits leaves no child and the
        next attempt starts them all; after it, the next attempt finds them all.
        """
        name = getattr(fn, "name", str(fn))
        children: list[ChildCall] = []
        for i, call in enumerate(calls):
            if isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], dict):
                args, kwargs = call
            else:
                args, kwargs = call, {}
            if not isinstance(args, list | tuple):
                raise TypeError(
                    f"ctx.spawn_many: calls[{i}] must be a list of arguments or an (args, "
                    f"kwargs) pair, not {type(call).__name__}"
                )
            children.append(ChildCall(self, fn, tuple(args), kwargs))
        self._log.begin("spawn", f"{len(children)} children of {name!r}")
        try:
            return await self._start_children(children) if children else []
        finally:
            self._log.busy = None

    async def _start_children(self, calls: Sequence[ChildCall]) -> list[ChildHandle]:
        handles: list[ChildHandle | None] = []
        new: list[tuple[int, str, NewTask]] = []
        resolved: dict[str, Definition[Any, Any]] = {}  # a fan-out asks once per name
        for call in calls:
            target = call.target
            name = target.name if isinstance(target, Definition) else target
            dig = digest("child", name, [list(call.args), call.kwargs])
            seq, event = self._log.next("child", name, dig)
            if event is not None:
                assert event.child_id is not None
                handles.append(ChildHandle(self, seq, event.child_id, event))
                continue
            d = resolved.get(name) or await self._definition(target)
            resolved[name] = d
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

    async def _definition(self, target: Definition[Any, Any] | str) -> Definition[Any, Any]:
        """A child's definition: its own, this daemon's registry's, else the catalog's (a
        child another service's daemons define and run gets their queue, kind and
        defaults); a name nobody published starts with the defaults and waits, visibly."""
        if isinstance(target, Definition):
            return target
        d = self._registry_get(target)
        if d is not None:
            return d
        entry = await self._store.resolve_definition(target)
        return entry.definition() if entry is not None else Definition.elsewhere(target)

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
        waiting = [h for h in handles if _unsettled(h)]
        if waiting and not calls:
            # Handles spawned earlier, whose children may have finished since: one look
            # at their events, rather than a suspension whose resume would find them.
            await self._look(waiting)
            waiting = [h for h in waiting if _unsettled(h)]
        if waiting:
            raise Suspend(waiting_on=[h.id for h in waiting])
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

    async def _look(self, handles: Sequence[ChildHandle]) -> None:
        """Read again the events of ``handles`` with their children's states."""
        t = self._task
        events = await self._store.child_events(t.id, t.branch, [h.seq for h in handles])
        seen = {e.seq: e for e in events}
        for h in handles:
            h._event = seen.get(h.seq, h._event)

    async def _record_children(self, handles: Sequence[ChildHandle]) -> None:
        rows: list[tuple[int, str, str | None, str | None]] = []
        for h in handles:
            ev = h._event
            assert ev is not None
            if ev.child_status == "completed":
                rows.append((h.seq, "completed", ev.child_result, None))
            elif ev.child_status == "cancelled":
                rows.append((h.seq, "failed", None, CANCELLED))
            elif ev.child_status is None:
                gone = LookupError(f"child task {h.id} no longer exists: it was deleted")
                rows.append((h.seq, "failed", None, error_text(gone)))
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


def _unsettled(h: ChildHandle) -> bool:
    """Whether the parent must still wait for ``h``'s child. One that no longer exists
    (deleted by hand, or pruned with a tree that was restarted meanwhile) counts as failed:
    waiting on it would wait for ever."""
    ev = h._event
    return ev is None or (
        ev.status == "pending" and ev.child_status is not None and ev.child_status not in TERMINAL
    )

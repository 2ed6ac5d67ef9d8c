"""Replay: matching a workflow's durable calls against its event log, and the values a
replay gives back (recorded results, rebuilt errors, children's outcomes).

What a workflow run writes goes through two interfaces it is handed: a CheckpointWriter
(the engine's group commit) and a StepTracer (spans, when tracing is on). Replay knows
nothing of either implementation.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Any, NoReturn, Protocol

from durable.codec import LegacyDigest, loads, loads_as_stored
from durable.errors import (
    LeaseLost,
    NonDeterminismError,
    PayloadError,
    ReplayAbort,
    TaskCancelled,
    TaskFailed,
)
from durable.models import Checkpoint, Claimed, Event


class CheckpointWriter(Protocol):
    """Where a workflow's checkpoints go: ``submit`` resolves True once the checkpoint is
    durable, False if the attempt no longer holds the task."""

    def submit(self, item: Checkpoint, /) -> Awaitable[bool]: ...


class StepTracer(Protocol):
    """Spans around a workflow's steps and the trace context its children inherit."""

    def step_span(self, name: str, seq: int, kind: str) -> AbstractContextManager[Any]: ...

    def inject(self) -> str | None: ...


class NoTracing:
    """A StepTracer that traces nothing."""

    def step_span(self, name: str, seq: int, kind: str) -> AbstractContextManager[Any]:
        return nullcontext()

    def inject(self) -> str | None:
        return None


NO_TRACING = NoTracing()


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


PATCH = "patch"
"""The kind of the marker ``ctx.patched`` and ``ctx.deprecate_patch`` record."""

MAX_PATCH_ID = 200
"""Longest patch id, in characters."""


def check_patch_id(what: str, patch_id: object) -> str:
    """A patch id as ``what`` (``ctx.patched``...) takes it: 1 to 200 printable characters,
    no space at either end."""
    if not isinstance(patch_id, str):
        raise TypeError(f"{what}: the patch id must be a str, not {type(patch_id).__name__}")
    if (
        not 1 <= len(patch_id) <= MAX_PATCH_ID
        or not patch_id.isprintable()
        or patch_id != patch_id.strip()
    ):
        raise ValueError(
            f"{what}: the patch id must be 1 to {MAX_PATCH_ID} printable characters with no "
            f"space at either end, got {patch_id[:80]!r}"
        )
    return patch_id


class PatchCall:
    """``ctx.patched(id)``: await it for the answer. Used as a truth value without the
    await it raises, where a forgotten ``await`` would otherwise always read True."""

    def __init__(self, answer: Coroutine[Any, Any, bool]) -> None:
        self._answer = answer

    def __await__(self) -> Generator[Any, None, bool]:
        return self._answer.__await__()

    def __bool__(self) -> bool:
        self._answer.close()
        raise TypeError("ctx.patched(...) must be awaited: `if await ctx.patched(...):`")


class ContinueAsNew(BaseException):
    """Ends a workflow's run and starts the next run of its chain with these arguments
    (JSON texts): ``ctx.continue_as_new``. A BaseException, as Suspend is."""

    def __init__(self, args: str, kwargs: str) -> None:
        super().__init__("workflow continued as new")
        self.args_json = args
        self.kwargs_json = kwargs


def describe(kind: str, name: str, dig: str) -> str:
    return f"{kind} {name!r} (arguments digest {dig[:12]})"


def match(event: Event | None, seq: int, kind: str, name: str, dig: str) -> Event | None:
    """The recorded event at ``seq`` if it is this call; raise if it is another call."""
    if event is None:
        return None
    if (event.kind, event.name, event.digest) != (kind, name, dig) and not (
        (event.kind, event.name) == (kind, name)
        and isinstance(dig, LegacyDigest)
        and event.digest == dig.legacy
    ):
        raise NonDeterminismError(
            f"at position {seq} the event log holds {describe(event.kind, event.name, event.digest)}"
            f" but the code asked for {describe(kind, name, dig)}"
        )
    return event


def unconsumed(events: dict[int, Event], next_seq: int) -> NonDeterminismError | None:
    """A workflow that returns must have consumed its whole log."""
    # A patch marker the code no longer asks for is no durable call (ctx.deprecate_patch).
    rest = sorted(s for s, e in events.items() if s >= next_seq and e.kind != PATCH)
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


def _mark(exc: BaseException, positions: list[int], at: int) -> None:
    """Note on ``exc`` the log positions whose recorded failure it is, and the position the
    workflow had reached when it saw it. If it ends the attempt, its stored error carries
    both (codec.error_payload): the retry drops those events, when nothing was recorded
    after they were seen, and runs the calls again."""
    attrs = getattr(exc, "__dict__", None)
    if isinstance(attrs, dict):  # one without a __dict__ ends the attempt unmarked
        attrs["__durable_failure__"] = {"positions": positions, "at": at}


class Journal:
    """A workflow attempt's place in its event log: each durable call takes the next
    position, is matched against what the log holds there, and commits its checkpoint
    through the writer it was given."""

    def __init__(
        self,
        task: Claimed,
        events: Sequence[Event],
        writer: CheckpointWriter,
        now: Callable[[], datetime],
    ) -> None:
        self.task = task
        self.events = {e.seq: e for e in events}
        self.writer = writer
        self.now = now
        self.seq = 0
        self.busy: str | None = None
        """The durable call under way, if any: a second one meanwhile is refused."""
        self.abort: ReplayAbort | None = None
        """A NonDeterminismError or LeaseLost raised in this attempt: raised again by every
        later durable call and at return, whatever the workflow caught."""
        self.patches: dict[str, bool] = {}
        """What ``ctx.patched`` answered for each patch id this attempt asked about: the
        first ask decides, later ones get the same answer and take no position."""
        self.passed: dict[str, int] = {}
        """Patch markers stepped over by another call, by id and position."""

    def begin(self, kind: str, name: str) -> None:
        """Enter a durable call: one at a time, and none after the attempt was aborted."""
        if self.abort is not None:
            raise self.abort
        if self.busy is not None:
            # Under asyncio.gather (or tasks) calls would take their positions in the order
            # they happened to run, and a replay runs them in program order.
            raise self.aborted(
                NonDeterminismError(
                    f"{kind} {name!r} started while {self.busy} was still running: durable "
                    "calls of one workflow must not run at the same time (their order in the "
                    "event log would depend on timing). Await them one at a time; run "
                    "children in parallel with ctx.gather"
                )
            )
        self.busy = f"{kind} {name!r}"

    def aborted(self, exc: ReplayAbort) -> ReplayAbort:
        if self.abort is None:
            self.abort = exc
        return self.abort

    def next(self, kind: str, name: str, dig: str) -> tuple[int, Event | None]:
        event = self.events.get(self.seq)
        if event is not None and event.kind == PATCH:
            self.pass_markers()
        seq = self.seq
        self.seq += 1
        try:
            return seq, match(self.events.get(seq), seq, kind, name, dig)
        except NonDeterminismError as exc:
            raise self.aborted(exc) from None

    def pass_markers(self, keep: str | None = None) -> None:
        """Step over the patch markers at the current position (but ``keep``'s): code that
        no longer asks for a patch replays a log that recorded it."""
        while (event := self.events.get(self.seq)) is not None and event.kind == PATCH:
            if event.name == keep:
                return
            self.passed.setdefault(event.name, event.seq)
            self.seq += 1

    def patch(self, patch_id: str) -> tuple[bool, int | None]:
        """Decide ``ctx.patched(patch_id)``: (the answer, the position where its marker must
        now be recorded, or None).

        True when the log holds the patch's marker here, or holds nothing more (the run is
        on new code from here on); False when it holds another call here: the history was
        recorded before the patch, and the old branch it took must be taken again. False
        takes no position, so later replays meet the same call here and answer the same.
        """
        answer = self.patches.get(patch_id)
        if answer is not None:
            return answer, None
        where = self.passed.get(patch_id)
        if where is not None:
            raise self.aborted(
                NonDeterminismError(
                    f"at position {self.seq} the code asked for patch {patch_id!r}, whose "
                    f"marker the event log holds at position {where}, where the code made "
                    "another call"
                )
            )
        self.pass_markers(keep=patch_id)
        seq = self.seq
        event = self.events.get(seq)
        record: int | None = None
        if event is None:
            answer, record = True, seq
            self.seq += 1
        elif event.kind == PATCH:
            answer = True
            self.seq += 1
        else:
            answer = False
        self.patches[patch_id] = answer
        return answer, record

    def asleep(self, wake: datetime) -> bool:
        """Whether a sleep recorded to end at ``wake`` still holds the workflow."""
        return self.now() < wake

    def checkpoint(
        self,
        seq: int,
        kind: str,
        name: str,
        dig: str,
        *,
        status: str = "completed",
        result: str | None = None,
        error: str | None = None,
        started_at: float | None = None,
        wake_at: datetime | None = None,
    ) -> Checkpoint:
        """``started_at``: seconds since the epoch on the database's clock (Store.epoch)."""
        t = self.task
        return Checkpoint(
            t.id, t.token, t.branch, seq, kind, name, dig, status, result, error, t.attempt,
            started_at or self.now().timestamp(),
            wake_at.timestamp() if wake_at is not None else None,
        )

    async def commit(self, cp: Checkpoint) -> None:
        """Write ``cp`` and wait until it is durable (see :meth:`refused`)."""
        ok = await self.writer.submit(cp)
        if ok is not True:
            self.refused(cp, ok)

    def refused(self, cp: Checkpoint, ok: Any) -> NoReturn:
        """Raise for a checkpoint the writer did not accept: ``ok`` is the server's error
        for this row alone, or False when the attempt no longer holds the task."""
        if isinstance(ok, Exception):
            raise PayloadError(
                f"the database refused the checkpoint of {cp.kind} {cp.name!r} at position "
                f"{cp.seq}: {type(ok).__name__}: {ok}"
            ) from ok
        raise self.aborted(
            LeaseLost(
                f"task {cp.task_id}: checkpoint {cp.seq} rejected; another worker holds the task"
            )
        )

    def check_consumed(self) -> None:
        if self.abort is not None:
            raise self.abort
        err = unconsumed(self.events, self.seq)
        if err is not None:
            raise err

    def failure(self, positions: list[int], error: Any) -> Exception:
        """The recorded failure at ``positions`` as the workflow sees it, marked with them:
        when it ends the attempt, the retry drops these events and runs the calls again."""
        exc = rebuild_error(self.task.id, error)
        _mark(exc, positions, self.seq)
        return exc

    def recorded(self, seq: int, event: Event) -> Any:
        if event.status == "failed":
            raise self.failure([seq], loads(event.error))
        return loads(event.result)

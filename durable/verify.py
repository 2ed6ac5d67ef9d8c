"""Replaying recorded histories against the code installed now, without running anything.

``durable verify`` (and ``verify_history`` in a test suite) runs a workflow's function
over its recorded event log: every durable call gets its outcome from the log, none runs
(no step, transaction, child, sleep or wait), and nothing is written. The replay ends
where the log ends; it fails where the code makes another call than the log holds, or
ends differently than the recorded run did. A run that would fail on its next resumption
fails here first, before a deploy.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from durable.codec import dumps
from durable.context import Context
from durable.errors import DurableError, NonDeterminismError, ReplayAbort
from durable.models import Claimed, Event, History
from durable.registry import Definition
from durable.replay import PATCH, ContinueAsNew, Journal, Suspend, describe
from durable.taskcontext import TaskContext, enter, leave

if TYPE_CHECKING:
    from durable.models import Checkpoint
    from durable.store import Store

__all__ = [
    "HISTORY_FORMAT",
    "History",
    "HistoryMismatch",
    "Verdict",
    "check_history",
    "history_from_json",
    "verify_history",
]

HISTORY_FORMAT = 1
"""The version of the JSON `durable show ID --json` writes (its ``history_format``)."""

REPLAY_TIMEOUT = 60.0
"""Seconds one replay may take: a workflow awaiting something that never comes (its own
I/O between durable calls) is reported, not waited for."""


class HistoryEnd(Suspend):
    """The replay reached the end of the recorded history: the code's next durable call
    would be new work."""

    def __init__(self, position: int, call: str) -> None:
        super().__init__()
        self.position = position
        self.call = call


class HistoryMismatch(DurableError, AssertionError):
    """A recorded history does not replay on the code given (``verify_history``)."""


@dataclass(frozen=True)
class Verdict:
    """How one recorded run replays on the code installed now."""

    task_id: int
    name: str
    branch: int
    status: str
    """The run's status when its history was read."""
    ok: bool
    replayed: int
    """Positions of the log the replay went through."""
    events: int
    """Events in the log."""
    outcome: str
    """How the replay ended, in a few words."""
    position: int | None = None
    """Where it failed."""
    recorded: str | None = None
    """What the log holds there (or how the recorded run ended)."""
    call: str | None = None
    """What the code does there now."""
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class _Diverged:
    position: int
    recorded: str | None
    call: str


class _ReplayOnly(Journal):
    """A journal over a recorded log that never writes: where the log ends, the replay ends."""

    def __init__(self, task: Claimed, events: Sequence[Event], returned: bool = False) -> None:
        super().__init__(task, events, _NO_WRITES, _now)
        self.diverged: _Diverged | None = None
        self.returned = returned
        """The recorded run returned: every sleep it reached had ended."""

    def _recorded(self, seq: int) -> str | None:
        event = self.events.get(seq)
        return None if event is None else describe(event.kind, event.name, event.digest)

    def begin(self, kind: str, name: str) -> None:
        seq = self.seq
        try:
            super().begin(kind, name)
        except NonDeterminismError:
            if self.diverged is None:
                self.diverged = _Diverged(seq, self._recorded(seq), f"{kind} {name!r} (concurrent)")
            raise

    def next(self, kind: str, name: str, dig: str) -> tuple[int, Event | None]:
        try:
            seq, event = super().next(kind, name, dig)
        except NonDeterminismError:
            if self.diverged is None:
                seq = self.seq - 1
                self.diverged = _Diverged(seq, self._recorded(seq), describe(kind, name, dig))
            raise
        if event is None:
            raise HistoryEnd(seq, describe(kind, name, dig))
        return seq, event

    def patch(self, patch_id: str) -> tuple[bool, int | None]:
        seq = self.seq
        try:
            return super().patch(patch_id)
        except NonDeterminismError:
            if self.diverged is None:
                self.diverged = _Diverged(seq, self._recorded(seq), f"patch {patch_id!r}")
            raise

    async def commit(self, cp: Checkpoint) -> None:
        if cp.kind == PATCH:
            return  # a patch asked at the end of the log: True, as on a real run, unwritten
        raise RuntimeError(f"verify must not write: {cp.kind} {cp.name!r} at {cp.seq}")

    def asleep(self, wake: datetime) -> bool:
        # Recorded calls after the sleep, or a run that returned after it: it ended.
        # Neither: the run sleeps there now.
        return not self.returned and not self.left()

    def left(self) -> list[Event]:
        """The recorded calls at and after the current position (patch markers aside)."""
        return [e for s, e in sorted(self.events.items()) if s >= self.seq and e.kind != PATCH]


class _Unreported:
    """Progress a replay reports again: checked as on a real run, written nowhere."""

    def report(self, encoded: str, message: str | None) -> None:
        pass


class _ReplayTaskContext(TaskContext):
    """``durable.current()`` during a replay: the run's own, its progress unwritten."""

    __slots__ = ()

    def __init__(self, task: Claimed, store: Any) -> None:
        super().__init__(task, store)
        self._reporter = cast("Any", _Unreported())


class _NoWrites:
    def submit(self, item: Checkpoint, /) -> Awaitable[bool]:
        raise RuntimeError(f"verify must not write: {item.kind} {item.name!r} at {item.seq}")


_NO_WRITES = _NoWrites()


def _now() -> datetime:
    return datetime.now(UTC)


class _NoStore:
    """What a replay's context may ask of a store: the time. A recorded wait or child
    outcome not yet settled in the log is where the recorded history ends."""

    def now(self) -> datetime:
        return _now()

    async def resolve_wait(self, cp: Checkpoint, name: str, *_: Any) -> Any:
        raise HistoryEnd(cp.seq, describe(cp.kind, cp.name, cp.digest))

    async def record_children(self, task_id: int, token: int, branch: int, rows: Any) -> bool:
        raise HistoryEnd(min(r[0] for r in rows), "the outcome of its children")

    async def child_events(self, task_id: int, branch: int, seqs: Any) -> list[Event]:
        return []  # the log holds all a replay knows of its children

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"verify must not reach the database (store.{name})")


def _function(fn: Definition[Any, Any] | Callable[..., Any]) -> Callable[..., Any]:
    if isinstance(fn, Definition):
        if fn.kind != "workflow":
            raise DurableError(f"{fn.name!r} is a task, not a workflow: it has no history to replay")
        return fn.fn
    if not callable(fn):
        raise TypeError(f"verify needs a workflow function, not {type(fn).__name__}")
    return fn


async def check_history(
    fn: Definition[Any, Any] | Callable[..., Any],
    history: History,
    *,
    registry_get: Callable[[str], Definition[Any, Any] | None] | None = None,
    timeout: float = REPLAY_TIMEOUT,
) -> Verdict:
    """Replay ``history`` on ``fn`` (a workflow, or its function) and say how it went."""
    func = _function(fn)
    task = Claimed(
        id=history.task_id, queue="", name=history.name, kind="workflow", args="[]",
        kwargs="{}", attempt=history.attempt, max_attempts=history.attempt, timeout=None,
        token=0, branch=history.branch, parent_id=None, root_id=None, cancel_requested=False,
    )  # fmt: skip
    completed = history.status == "completed"
    journal = _ReplayOnly(task, history.events, returned=completed)
    store = cast("Store", _NoStore())
    ctx = Context.over(store, task, journal, registry_get or (lambda _name: None))
    total = len(history.events)

    def verdict(ok: bool, outcome: str, **fields: Any) -> Verdict:
        return Verdict(
            history.task_id, history.name, history.branch, history.status, ok,
            min(journal.seq, total), total, outcome, **fields,
        )  # fmt: skip

    try:
        inspect.signature(func).bind(ctx, *history.args, **history.kwargs)
    except TypeError as exc:
        return verdict(False, "arguments do not fit", position=0,
                       recorded=f"arguments {dumps(history.args)} {dumps(history.kwargs)}",
                       call=f"{getattr(func, '__qualname__', func)}{inspect.signature(func)}",
                       message=f"the recorded arguments do not fit the function: {exc}")  # fmt: skip
    except ValueError:
        pass  # no signature to check against
    # ctx.progress and durable.current() work as on the daemon, which enters the run's own.
    entered = enter(_ReplayTaskContext(task, store))
    try:
        async with asyncio.timeout(timeout):
            await func(ctx, *history.args, **history.kwargs)
        ctx.check_consumed()
    except ContinueAsNew:
        # ctx.continue_as_new checked the whole log was replayed: the run ends as recorded.
        return verdict(True, "continues as new")
    except NonDeterminismError as exc:
        d = journal.diverged
        if d is not None:
            return verdict(False, "diverged", position=d.position, recorded=d.recorded,
                           call=d.call, message=str(exc))  # fmt: skip
        left = journal.left()
        first = left[0] if left else None
        return verdict(False, "returned early",
                       position=first.seq if first else journal.seq,
                       recorded=describe(first.kind, first.name, first.digest) if first else None,
                       call="return", message=str(exc))  # fmt: skip
    except HistoryEnd as end:
        if completed:
            return verdict(False, "goes on past the recorded return", position=end.position,
                           recorded="the workflow returned", call=end.call,
                           message=f"the recorded run returned at position {end.position}, but "
                           f"the code now makes another durable call there: {end.call}")  # fmt: skip
        return verdict(True, f"the log ends at position {end.position}; next: {end.call}")
    except Suspend:
        left = journal.left()
        if left or completed:
            first = left[0] if left else None
            return verdict(False, "suspends early", position=journal.seq - 1,
                           recorded=describe(first.kind, first.name, first.digest) if first
                           else "the workflow returned", call="suspend",
                           message=f"the code suspends at position {journal.seq - 1} where the "
                           "recorded run went on")  # fmt: skip
        return verdict(True, f"waits at position {journal.seq - 1}")
    except TimeoutError:
        return verdict(False, "timed out", position=journal.seq, call="(no durable call)",
                       message=f"the replay did not reach its end within {timeout:g}s: the "
                       "workflow awaits something other than durable calls")  # fmt: skip
    except ReplayAbort as exc:
        return verdict(False, type(exc).__name__, position=journal.seq, message=str(exc))
    except Exception as exc:
        raised = f"raise {type(exc).__name__}: {exc}"
        left = journal.left()
        if left:
            first = left[0]
            return verdict(False, "raises early", position=first.seq,
                           recorded=describe(first.kind, first.name, first.digest), call=raised,
                           message=f"the code raises {type(exc).__name__} at position "
                           f"{journal.seq} but the event log holds {len(left)} more call(s): "
                           f"position {first.seq} holds "
                           f"{describe(first.kind, first.name, first.digest)}")  # fmt: skip
        if completed:
            return verdict(False, "raises where the recorded run returned",
                           position=journal.seq, recorded="the workflow returned", call=raised,
                           message=f"the recorded run returned, but the code now raises "
                           f"{type(exc).__name__}: {exc}")  # fmt: skip
        return verdict(True, f"raises {type(exc).__name__} at the end of the log")
    finally:
        leave(entered)
    return verdict(True, "returns")


def verify_history(
    fn: Definition[Any, Any] | Callable[..., Any],
    history: History | Mapping[str, Any] | str | Path,
) -> Verdict:
    """Replay a recorded history on ``fn`` and raise ``HistoryMismatch`` (an
    ``AssertionError``) naming the position, the recorded event and the call the code makes
    now when it would fail; return the verdict when it passes.

    ``history`` is a file written by ``durable show ID --json``, that JSON already parsed,
    or a ``History``. Nothing runs and nothing is written: call it from a test::

        def test_fulfill_replays_order_17() -> None:
            verify_history(fulfill, "tests/histories/order-17.json")
    """
    h = history if isinstance(history, History) else history_from_json(history)
    if isinstance(fn, Definition) and fn.name != h.name:
        raise HistoryMismatch(f"the history of task {h.task_id} is of {h.name!r}, not {fn.name!r}")
    result: list[Verdict] = []
    failure: list[BaseException] = []

    def replay() -> None:
        try:
            result.append(asyncio.run(check_history(fn, h)))
        except BaseException as exc:
            failure.append(exc)

    # A test may call this from inside a running event loop: the replay gets a loop of its own.
    thread = threading.Thread(target=replay, name="durable-verify")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    verdict = result[0]
    if not verdict.ok:
        raise HistoryMismatch(explain(verdict))
    return verdict


def explain(v: Verdict) -> str:
    """A failed verdict in one paragraph: the run, the position, both sides, the message."""
    return (
        f"task {v.task_id} ({v.name!r}, branch {v.branch}, {v.status}) does not replay at "
        f"position {v.position}: recorded {v.recorded or '-'}; the code now: {v.call or '-'}"
        f" ({v.message})"
    )


# -- the history file -------------------------------------------------------------------------


def history_from_json(source: Mapping[str, Any] | str | Path) -> History:
    """A history from what ``durable show ID --json`` wrote: a path, or the parsed JSON.
    A file that is not one raises ``DurableError`` naming the field at fault."""
    where = "the history"
    data: Any = source
    if isinstance(source, str | Path):
        where = str(source)
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise DurableError(f"{where}: cannot read it: {reason}") from None
        except ValueError as exc:
            raise DurableError(f"{where}: not JSON: {exc}") from None
    hint = "export it with `durable show ID --json`"
    if not isinstance(data, Mapping):
        raise DurableError(f"{where}: expected a JSON object ({hint})")

    def field(obj: Mapping[str, Any], key: str, types: Any, path: str, optional: bool = False) -> Any:
        if key not in obj:
            if optional:
                return None
            raise DurableError(f"{where}: {path}{key} is missing ({hint})")
        value = obj[key]
        if value is None and optional:
            return None
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            raise DurableError(f"{where}: {path}{key} must be {_name(types)}, got {type(value).__name__}")
        return value

    version = field(data, "history_format", int, "")
    if version != HISTORY_FORMAT:
        raise DurableError(
            f"{where}: history_format {version} is not {HISTORY_FORMAT}, the one this durable reads"
        )
    if field(data, "kind", str, "") != "workflow":
        raise DurableError(f"{where}: kind must be workflow: a plain task has no history to replay")
    events: list[Event] = []
    raw = field(data, "events", list, "")
    for i, e in enumerate(raw):
        at = f"events[{i}]."
        if not isinstance(e, Mapping):
            raise DurableError(f"{where}: events[{i}] must be an object")
        wake = field(e, "wake_at", str, at, optional=True)
        try:
            wake_at = datetime.fromisoformat(wake) if wake is not None else None
        except ValueError:
            raise DurableError(f"{where}: {at}wake_at is not a timestamp: {wake[:40]!r}") from None
        if wake_at is not None and wake_at.utcoffset() is None:
            raise DurableError(
                f"{where}: {at}wake_at has no time zone: {wake[:40]!r} (as durable show writes"
                " it, e.g. 2026-01-01T00:00:00+00:00)"
            )
        events.append(Event(
            seq=field(e, "seq", int, at), kind=field(e, "kind", str, at),
            name=field(e, "name", str, at), digest=field(e, "digest", str, at),
            status=field(e, "status", str, at), result=_text(e.get("result")),
            error=_text(field(e, "error", dict, at, optional=True)),
            child_id=field(e, "child_id", int, at, optional=True), wake_at=wake_at,
            child_status=field(e, "child_status", str, at, optional=True),
            child_result=_text(e.get("child_result")),
            child_error=_text(field(e, "child_error", dict, at, optional=True)),
        ))  # fmt: skip
    seqs = [e.seq for e in events]
    if seqs != sorted(set(seqs)):
        raise DurableError(f"{where}: events must be in order of seq, each seq once")
    branch = field(data, "branch_shown", int, "", optional=True)
    return History(
        task_id=field(data, "id", int, ""),
        name=field(data, "name", str, ""),
        args=list(field(data, "args", list, "")),
        kwargs=dict(field(data, "kwargs", dict, "")),
        status=field(data, "status", str, ""),
        branch=branch if branch is not None else field(data, "branch", int, ""),
        attempt=field(data, "attempt", int, ""),
        events=tuple(events),
    )


def export(shown: Mapping[str, Any], branch: int, events: Sequence[Event]) -> dict[str, Any]:
    """``durable show ID --json``'s object made a history ``verify --file`` reads: the
    format, the branch shown, and on each event what replay matches and reads (its digest,
    its child's outcome)."""
    by_seq = {e.seq: e for e in events}
    out = {**shown, "history_format": HISTORY_FORMAT, "branch_shown": branch}
    rows = []
    for row in shown.get("events", []):
        e = by_seq.get(row["seq"])
        if e is not None:
            row = {**row, "digest": e.digest, "child_result": _value(e.child_result),
                   "child_error": _value(e.child_error)}  # fmt: skip
        rows.append(row)
    out["events"] = rows
    return out


def _text(value: Any) -> str | None:
    return None if value is None else dumps(value)


def _value(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _tuple(types: Any) -> tuple[Any, ...]:
    return types if isinstance(types, tuple) else (types,)


def _name(types: Any) -> str:
    names = {int: "a whole number", str: "a string", list: "an array", dict: "an object"}
    return " or ".join(names.get(t, t.__name__) for t in _tuple(types))

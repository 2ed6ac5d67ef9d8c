"""The pure parts of replay: matching calls to the log, leftovers, rebuilt errors, digests,
and live results shaped as replays return them."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from durable.codec import LegacyDigest, digest, dumps, error_text, loads, loads_as_stored
from durable.errors import NonDeterminismError, TaskFailed
from durable.models import Event
from durable.replay import as_recorded, match, rebuild_error, unconsumed


def event(seq: int, kind: str = "step", name: str = "charge", dig: str | None = None) -> Event:
    return Event(
        seq=seq,
        kind=kind,
        name=name,
        digest=dig if dig is not None else digest(kind, name, [[1], {}]),
        status="completed",
        result="1",
        error=None,
        child_id=None,
        wake_at=None,
    )


class Unbuildable(Exception):
    """Needs two arguments: rebuilding it from one must fall back to TaskFailed."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(a + b)


# -- match ------------------------------------------------------------------------------


def test_match_without_a_recorded_event_is_a_new_call() -> None:
    assert match(None, 3, "step", "charge", digest("step", "charge", None)) is None


def test_match_returns_the_recorded_event_of_the_same_call() -> None:
    ev = event(2)
    assert match(ev, 2, "step", "charge", digest("step", "charge", [[1], {}])) is ev


@pytest.mark.parametrize(
    ("kind", "name", "args", "held", "asked"),
    [
        ("step", "refund", [[1], {}], "step 'charge'", "step 'refund'"),  # renamed
        ("step", "charge", [[2], {}], "step 'charge'", "step 'charge'"),  # other arguments
        ("memo", "charge", [[1], {}], "step 'charge'", "memo 'charge'"),  # other kind
        ("step", "charge", [[1], {"x": 1}], "step 'charge'", "step 'charge'"),  # a new kwarg
    ],
)
def test_match_rejects_another_call_naming_position_and_both_calls(
    kind: str, name: str, args: object, held: str, asked: str
) -> None:
    ev = event(7)
    dig = digest(kind, name, args)
    with pytest.raises(NonDeterminismError) as caught:
        match(ev, 7, kind, name, dig)
    message = str(caught.value)
    assert "position 7" in message
    assert f"holds {held} (arguments digest {ev.digest[:12]})" in message
    assert f"asked for {asked} (arguments digest {dig[:12]})" in message


# -- unconsumed ---------------------------------------------------------------------------


def test_unconsumed_is_none_when_every_event_was_used() -> None:
    events = {s: event(s) for s in range(3)}
    assert unconsumed(events, 3) is None
    assert unconsumed({}, 0) is None
    assert unconsumed({}, 5) is None


def test_unconsumed_names_the_first_leftover_position_and_how_many() -> None:
    events = {0: event(0), 1: event(1), 2: event(2, "event", "approved"), 4: event(4, "sleep")}
    err = unconsumed(events, 2)
    assert isinstance(err, NonDeterminismError)
    message = str(err)
    assert "returned after 2 durable calls" in message
    assert "holds 2 more" in message
    assert "position 2 holds event 'approved'" in message


def test_unconsumed_ignores_positions_before_the_cursor() -> None:
    events = {0: event(0), 5: event(5, "memo", "now")}
    err = unconsumed(events, 1)
    assert err is not None and "position 5 holds memo 'now'" in str(err)
    assert unconsumed(events, 6) is None


# -- rebuild_error --------------------------------------------------------------------------


def test_rebuild_error_raises_a_builtin_error_as_its_own_type() -> None:
    err = rebuild_error(
        1, {"type": "builtins.ValueError", "message": "bad card", "args": ["bad card"]}
    )
    assert type(err) is ValueError and err.args == ("bad card",)


def test_rebuild_error_imports_the_error_class_by_module() -> None:
    err = rebuild_error(
        1, {"type": "durable.errors.NonRetryable", "message": "no", "args": ["no"]}
    )
    assert type(err).__name__ == "NonRetryable" and str(err) == "no"


@pytest.mark.parametrize(
    "error",
    [
        None,
        {},
        {"type": "no_such_module_xyz.Boom", "message": "m", "args": []},
        {"type": "builtins.NoSuchErrorXyz", "message": "m", "args": []},
        {"type": "builtins.KeyboardInterrupt", "message": "m", "args": []},  # not an Exception
        {"type": "builtins.len", "message": "m", "args": []},  # not a class
        {"type": "builtins.ValueError", "message": "m", "args": None},  # args not kept
        {"type": "ValueError", "message": "m", "args": ["m"]},  # no module
        {"type": f"{__name__}.Unbuildable", "message": "3", "args": [3], "attrs": []},  # bad attrs
        {"type": f"{__name__}.Local.<locals>.E", "message": "m", "args": []},  # not reachable
    ],
)
def test_rebuild_error_falls_back_to_task_failed(error: dict[str, object] | None) -> None:
    err = rebuild_error(42, error)
    assert isinstance(err, TaskFailed)
    assert err.task_id == 42
    expected_type = "Exception" if not error else str(error["type"])
    assert err.type == expected_type
    assert err.message == (str(error["message"]) if error else "")


def test_rebuild_error_keeps_the_traceback_in_task_failed() -> None:
    err = rebuild_error(
        5, {"type": "x.Y", "message": "m", "traceback": "Traceback ...", "args": []}
    )
    assert isinstance(err, TaskFailed) and err.traceback == "Traceback ..."


# -- digest ----------------------------------------------------------------------------------


def test_digest_is_stable_and_short_hex() -> None:
    d = digest("step", "charge", [["order-1", 100], {"currency": "EUR"}])
    assert d == digest("step", "charge", [["order-1", 100], {"currency": "EUR"}])
    assert re.fullmatch(r"[0-9a-f]{32}", d)


def test_digest_ignores_keyword_order() -> None:
    a = digest("step", "s", [[], {"a": 1, "b": 2}])
    assert a == digest("step", "s", [[], {"b": 2, "a": 1}])


@pytest.mark.parametrize(
    ("kind", "name", "payload"),
    [
        ("memo", "charge", [["order-1"], {}]),
        ("step", "charge2", [["order-1"], {}]),
        ("step", "charge", [["order-2"], {}]),
        ("step", "charge", [["order-1", None], {}]),
        ("step", "charge", [[], {"order": "order-1"}]),
        ("step", "charge", [["order-1"], {"x": 1}]),
        ("step", "charge", None),
    ],
)
def test_digest_differs_by_kind_name_and_arguments(kind: str, name: str, payload: object) -> None:
    assert digest(kind, name, payload) != digest("step", "charge", [["order-1"], {}])


def test_digest_of_values_that_are_not_json_uses_their_type() -> None:
    class Money:
        pass

    a = digest("step", "s", [[Money()], {}])
    b = digest("step", "s", [[Money()], {}])
    assert a == b  # two instances of one type: the digest cannot see inside them
    assert a != digest("step", "s", [[object()], {}])


def test_digest_distinguishes_a_string_from_a_number() -> None:
    assert digest("step", "s", [["1"], {}]) != digest("step", "s", [[1], {}])


def test_digests_stay_what_earlier_versions_stored() -> None:
    # Histories written by earlier versions replay only if their digests come out the same:
    # these values were stored before the canonical encoder was built once.
    assert digest("step", "charge", [["order-1", 100], {"currency": "EUR"}]) == (
        "a4865aa0c8d7b25d38e3500d012975a8"
    )
    mixed = ["é☃", 1.5, -0.0, 1e300, 10**30, True, None, float("nan"), {"b": 1, "a": [{1, 2}, b"x"]}]
    dig = digest("step", "s", [mixed, {"z": [], "y": {}}])
    assert dig == "2d512e90b758ba50bdd1027a23a0a6db"
    # Before values that are not JSON were digested by value, they were by type alone: a
    # call recorded then still matches.
    assert isinstance(dig, LegacyDigest) and dig.legacy == "975dcc3067178087fe6389426b29fae6"
    recorded = Event(0, "step", "s", "975dcc3067178087fe6389426b29fae6", "completed", "1", None,
                     None, None)  # fmt: skip
    assert match(recorded, 0, "step", "s", dig) is recorded


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Point:
    x: int
    y: int


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({1, 2}, {3, 4}),
        (frozenset("ab"), frozenset("ac")),
        (Decimal("10.00"), Decimal("99.99")),
        (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)),
        (date(2026, 1, 1), date(2026, 1, 2)),
        (timedelta(seconds=1), timedelta(seconds=2)),
        (UUID(int=1), UUID(int=2)),
        (b"a", b"b"),
        (Colour.RED, Colour.BLUE),
        (Point(1, 2), Point(1, 3)),
        (1 + 2j, 1 + 3j),
    ],
    ids=lambda v: type(v).__name__,
)
def test_a_changed_argument_that_is_not_json_changes_the_digest(before: Any, after: Any) -> None:
    # Digested by type alone, a changed set or decimal replayed the other call's result.
    assert digest("step", "s", [[before], {}]) != digest("step", "s", [[after], {}])
    # The same value, built again, digests the same (sets in any order).
    again = type(before)(list(before)) if isinstance(before, set | frozenset) else before
    assert digest("step", "s", [[before], {}]) == digest("step", "s", [[again], {}])
    with pytest.raises(NonDeterminismError, match="at position 3"):
        recorded = Event(3, "step", "s", digest("step", "s", [[before], {}]), "completed",
                         "1", None, None, None)  # fmt: skip
        match(recorded, 3, "step", "s", digest("step", "s", [[after], {}]))



def test_a_cyclic_argument_is_an_error_not_a_digest() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises((ValueError, RecursionError)):
        digest("step", "s", [[loop], {}])


class Level(IntEnum):
    HIGH = 2


@pytest.mark.parametrize(
    "value",
    [7, 1.5, -0.0, "text", True, None, (1, "a"), [1, [2]], {"a": (1,)}, Level.HIGH],
    ids=repr,
)
def test_a_live_result_is_what_its_replay_returns(value: object) -> None:
    text = dumps(value)
    live = as_recorded(value, text)
    replayed = loads(text)
    assert live == replayed and type(live) is type(replayed)
    if isinstance(value, (list, dict, tuple)):
        assert live is not value  # the workflow cannot mutate what it recorded


# -- errors rebuilt faithfully ------------------------------------------------------------


class HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class KwError(Exception):
    def __init__(self, *, code: str) -> None:
        super().__init__(code)
        self.code = code


def rebuilt(exc: Exception) -> Exception:
    return rebuild_error(1, loads_as_stored(error_text(exc)))


def test_an_error_whose_init_changes_its_arguments_comes_back_the_same() -> None:
    err = rebuilt(HttpError(503))
    assert type(err) is HttpError and err.status == 503 and err.args == ("HTTP 503",)


def test_an_error_with_keyword_only_arguments_comes_back_its_own_class() -> None:
    err = rebuilt(KwError(code="E42"))
    assert type(err) is KwError and err.code == "E42" and str(err) == "E42"


def test_a_builtin_error_keeps_its_fields() -> None:
    err = rebuilt(FileNotFoundError(2, "gone", "/x"))
    assert type(err) is FileNotFoundError and (err.errno, err.filename) == (2, "/x")


def test_a_rebuilt_error_carries_the_recorded_traceback() -> None:
    try:
        raise HttpError(500)
    except HttpError as exc:
        err = rebuilt(exc)
    assert "raise HttpError(500)" in str(err.__cause__)


def test_rebuild_never_imports_the_module_a_row_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "planted_module_xyz.py").write_text(
        "import os\nos.environ['PLANTED_RAN'] = '1'\nclass Boom(Exception): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PLANTED_RAN", raising=False)
    err = rebuild_error(7, {"type": "planted_module_xyz.Boom", "message": "m", "args": ["m"]})
    assert isinstance(err, TaskFailed) and err.type == "planted_module_xyz.Boom"
    assert "planted_module_xyz" not in sys.modules and "PLANTED_RAN" not in os.environ

"""The JSON codec: durable's encoder writes what json.dumps writes, and refuses what is
not JSON with an error naming what was being encoded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from durable.codec import dumps, loads
from durable.errors import PayloadError

VALUES: list[Any] = [
    0, -1, 10**30, 1.5, -0.0, 1e300, 5e-324, True, False, None, "", "x",
    "é \u2028 \" \\ \t \x7f 🎉", [], {}, [1, [2, {"a": None, "b": [True, 2.25]}]],
    {"z": 1, "a": 2}, {1: "an int key", False: "a bool key", None: "a null key", 2.5: "a float key"}, (1, "tuple"),
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_the_encoder_writes_what_json_dumps_writes(value: Any) -> None:
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert dumps(value) == expected
    assert loads(dumps(value)) == json.loads(expected)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), "NaN and Infinity are not JSON"),
        ([1, float("inf")], "NaN and Infinity are not JSON"),
        ({"k": {1, 2}}, "Object of type set is not JSON serializable"),
        ([object()], "Object of type object is not JSON serializable"),
        ({(1, 2): 3}, "keys must be str, int, float, bool or None"),
        ("a\x00b", "must not contain NUL characters"),
    ],
)
def test_what_is_not_json_is_refused_naming_what_was_encoded(value: Any, message: str) -> None:
    with pytest.raises(PayloadError) as caught:
        dumps(value, what="the arguments of 'job'")
    assert "the arguments of 'job'" in str(caught.value) and message in str(caught.value)


def test_a_value_that_contains_itself_is_refused() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(PayloadError, match="nested too deeply"):
        dumps({"args": cyclic}, what="the result of 'job'")
    assert dumps([1, 2]) == "[1,2]"  # and the encoder is fine afterwards


@pytest.mark.parametrize(
    "text",
    ['[123]', '[1, "a", {"k": 2}]', ' [1]', '[1] ', '\n{"a": 1}\t', '"x"', '12', 'null',
     '{"a": [1.5, -0.0, 1e300]}', '["é", "\\u2028"]'],
)
def test_loads_reads_what_json_loads_reads(text: str) -> None:
    # Postgres writes no space around a document; one written by hand may have some.
    assert loads(text) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [("[1] [2]", "Extra data"), ("[1,", "Expecting value"), ("", "Expecting value"),
     ("x", "Expecting value"), ("[1] x", "Extra data")],
)
def test_loads_refuses_what_is_not_one_document_as_json_loads_does(
    text: str, message: str
) -> None:
    with pytest.raises(json.JSONDecodeError, match=message):
        loads(text)


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", "[1, -Infinity]"])
def test_loads_refuses_the_constants_json_does_not_have(text: str) -> None:
    with pytest.raises(PayloadError, match="is not valid JSON"):
        loads(text)

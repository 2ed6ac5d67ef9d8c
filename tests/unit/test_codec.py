"""The JSON codec: durable's encoder writes what json.dumps writes, and refuses what is
not JSON with an error naming what was being encoded."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from durable import codec
from durable.codec import ERROR_LIMIT, dumps, error_text, loads, loads_as_stored
from durable.errors import PayloadError

VALUES: list[Any] = [
    0, -1, 10**30, 1.5, 1e15, 5e-324, True, False, None, "", "x",
    "é \u2028 \" \\ \t \x7f 🎉", [], {}, [1, [2, {"a": None, "b": [True, 2.25]}]],
    {"z": 1, "a": 2}, {1: "an int key", False: "a bool key", None: "a null key", 2.5: "a float key"}, (1, "tuple"),
]
"""Values json.dumps writes as jsonb keeps them (floats from 1e16 up and -0.0 differ)."""


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


# -- what jsonb gives back ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1e16, "10000000000000000.0"),
        (-1.2345e17, "-123450000000000000.0"),
        (1e300, "1" + "0" * 300 + ".0"),
        (-0.0, "0.0"),
        ([-0.0, 1e16], "[0.0,10000000000000000.0]"),
        ({"e+": "1e+16", "-0.0": "-0.0"}, '{"e+":"1e+16","-0.0":"-0.0"}'),  # strings stay
        (['"\\\\"', 1e20], '["\\"\\\\\\\\\\"",100000000000000000000.0]'),
        (1e-7, "1e-07"),  # numeric keeps its decimal places: read back as a float
        (-0.05, "-0.05"),
    ],
    ids=repr,
)
def test_floats_are_written_so_that_jsonb_keeps_them_floats(value: Any, text: str) -> None:
    # jsonb stores numbers as numeric, which prints 1e16 as 10000000000000000 (an int once
    # read) and has no negative zero: written out in full, a float comes back a float.
    assert dumps(value) == text
    back = loads(text)
    assert back == value and type(back) is type(value)


def test_loads_as_stored_orders_keys_as_jsonb_does() -> None:
    value = {"b": 1, "aa": {"zz": [], "y": 2}, "a": 3, "é": 4, "z": 5, 1: "int key"}
    text = dumps(value)[:-1] + ',"1":"dup"}'  # a text another writer made, a key twice
    back = loads_as_stored(text)
    # By UTF-8 length, then bytewise; of duplicate keys ("1" twice) the last one.
    assert list(back) == ["1", "a", "b", "z", "aa", "é"]
    assert list(back["aa"]) == ["y", "zz"] and back["1"] == "dup"


def test_the_nul_check_runs_only_when_the_text_may_hold_one(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exploding:
        def search(self, text: str) -> None:
            raise AssertionError("the NUL regex ran on text without \\u0000")

    monkeypatch.setattr(codec, "_NUL_ESCAPE", Exploding())
    assert dumps({"data": "x" * 100_000}) == '{"data":"' + "x" * 100_000 + '"}'


def test_an_escaped_backslash_before_u0000_is_no_nul() -> None:
    assert dumps("\\u0000") == '"\\\\u0000"'
    with pytest.raises(PayloadError, match="NUL"):
        dumps("\\\x00")


# -- stored errors ------------------------------------------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def stored(exc: BaseException) -> dict[str, Any]:
    text = error_text(exc)
    assert len(text.encode()) <= ERROR_LIMIT
    assert "\\u0000" not in text.replace("\\\\", "")
    text.encode()  # no lone surrogate: UTF-8 as Postgres needs it
    value = json.loads(text)
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a\x00b"),
        ValueError("lone \udc80 surrogate"),
        Unprintable("x"),
        Unprintable(object()),
        KeyError({1, 2}),
        SystemExit(3),
    ],
    ids=["nul", "surrogate", "unprintable", "unprintable-object-arg", "set-arg", "system-exit"],
)
def test_error_text_records_any_exception(exc: BaseException) -> None:
    value = stored(exc)
    assert value["type"].endswith(type(exc).__qualname__)
    assert isinstance(value["message"], str) and isinstance(value["traceback"], str)


def test_error_text_names_what_it_could_not_read() -> None:
    value = stored(Unprintable("x"))
    assert value["message"] == "<str() failed: RuntimeError>"
    assert value["args"] == ["x"]


def test_error_text_writes_nul_and_surrogates_out() -> None:
    value = stored(ValueError("a\x00b \udc80"))
    assert value["message"] == "a\\x00b \\udc80"
    assert value["args"] is None  # not JSON: a replay raises TaskFailed


def test_error_text_cuts_long_text_and_says_how_much() -> None:
    for size in (1_000_000, 20_000_000):  # the second is no JSON argument (over MAX_PAYLOAD)
        value = stored(ValueError("m" * size))
        assert re.search(r"\[truncated: [\d,]+ bytes of message dropped\]$", value["message"])
        dropped = re.findall(r"([\d,]+) bytes of message", value["message"])[0]
        assert len(value["message"].split("\n[truncated")[0]) + int(dropped.replace(",", "")) == size
    assert value["args"] is None and "args and attributes" in value["dropped"]


def test_error_text_keeps_json_attributes_and_leaves_out_the_rest() -> None:
    exc = ValueError("no")
    exc.status = 503  # type: ignore[attr-defined]
    exc.response = object()  # type: ignore[attr-defined]
    value = stored(exc)
    assert value["args"] == ["no"] and value["attrs"] == {"status": 503}


@pytest.mark.parametrize(
    ("value", "keys"),
    [
        ({1: "int key", "1": "str key"}, "1 and '1'"),
        ([{"deep": {True: 1, "true": 2}}], "True and 'true'"),
        ({None: 1, "null": 2}, "None and 'null'"),
        (({2.5: 0, "2.5": 1},), "2.5 and '2.5'"),
        ({"-3": 0, -3: 1}, "'-3' and -3"),
    ],
    ids=repr,
)
def test_two_keys_of_one_dict_that_meet_in_json_are_refused(value: Any, keys: str) -> None:
    # jsonb keeps one value of a key written twice: the other would be lost in silence.
    with pytest.raises(PayloadError, match=f"the arguments must be JSON: the keys {re.escape(keys)} "):
        dumps(value, what="the arguments")


def test_keys_that_only_read_as_numbers_are_kept() -> None:
    value = {1: "a", "2": "b", "x": [{3: "c", "true": "d"}], "text": '{"1":"in a string"}'}
    assert loads(dumps(value)) == {"1": "a", "2": "b", "x": [{"3": "c", "true": "d"}],
                                   "text": '{"1":"in a string"}'}


def test_the_key_walk_runs_only_when_a_key_reads_as_a_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def exploding(value: Any, what: str) -> None:
        raise AssertionError("walked a value whose keys are all plain text")

    monkeypatch.setattr(codec, "_check_keys", exploding)
    assert dumps({"a": ["1", "2"], "b": {"c": "1:"}, "d": '","1":'}) is not None


async def test_a_heavy_value_is_searched_for_meeting_keys_in_slices_with_turns_between() -> None:
    # Each of the two keys straddles a slice's end: only the slices' overlap finds them.
    size = codec._KEY_SLICE
    value = {"p": "x" * (size - 9), 1: "a", "q": "y" * (size - 15), "1": "b"}
    apart = {"p": "x" * (size - 9), 1: "a", "q": "y" * (size - 15), "2": "b"}
    text = codec.dumps(apart)
    assert text.index(',"1":') == size - 2 and text.index(',"2":') == 2 * size - 2
    with pytest.raises(PayloadError, match="the keys 1 and '1' of one dict"):
        await codec.dumps_spaced(value, what="the result")
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.ensure_future(count_turns())
    text = await codec.dumps_spaced({"blob": "y" * (4 * codec._KEY_SLICE)}, what="r")
    counter.cancel()
    assert len(text) > 4 * codec._KEY_SLICE and turns >= 4  # the loop ran between slices

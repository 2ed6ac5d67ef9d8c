"""JSON in and out of the database: arguments, results, errors (never pickle)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import decimal
import enum
import fractions
import hashlib
import json
import json.scanner
import re
import traceback as _traceback
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from durable.errors import PayloadError
from durable.redaction import redact, redact_json

MAX_PAYLOAD = 16 * 1024 * 1024
"""Largest encoded arguments or result accepted, in bytes (Postgres allows 255 MB)."""


# json.dumps writes NUL as the escape \u0000 (preceded by an odd number of backslashes;
# an even number is an escaped backslash followed by the text "u0000"). Searched only when
# the plain text "\u0000" occurs: a 16 MB document costs 0.5 s in the regex, 1 ms in `in`.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

# jsonb stores a number as numeric, which prints 1e+16 as 10000000000000000 (an int when
# read back) and -0.0 as 0.0. So a float with an exponent is written out in full with a
# decimal point, and -0.0 as 0.0: what the database gives back is then what went in. The
# strings alternative skips text inside strings (run only when the text holds "e+" or "-0.0").
_FLOAT_FIX = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|(-?)(\d)(?:\.(\d+))?e\+(\d+)|-0\.0(?!\d)')


# JSON keys are text: the encoder writes a key of 1, 1.5, True or None as "1", "1.5",
# "true" or "null", and a dict holding both 1 and "1" would come back from jsonb with one
# of their values. Such a key shows in the text as a key that reads as a number or a
# constant; only a text holding one is walked to look for two keys that meet.
_NUMERIC_KEY = re.compile(r'[{,]"(?:-?[0-9][0-9.eE+-]*|true|false|null)":')


def _check_keys(value: Any, what: str) -> None:
    """Raise PayloadError when a dict in ``value`` has two keys of the same JSON text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any(type(k) is not str for k in item):
                seen: dict[str, Any] = {}
                for k in item:
                    text = _key_text(k)
                    if text in seen:
                        raise PayloadError(
                            f"{what} must be JSON: the keys {seen[text]!r} and {k!r} of one "
                            f"dict are both {text!r} in JSON (one of their values would be lost)"
                        )
                    seen[text] = k
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _key_text(key: Any) -> str:
    """A dict key as the JSON encoder writes it."""
    if isinstance(key, str):
        return key
    if key is True or key is False or key is None:
        return json.dumps(key)
    return float.__repr__(key) if isinstance(key, float) else int.__repr__(key)


def _fix_float(m: re.Match[str]) -> str:
    exponent = m.group(4)
    if exponent is None:
        return "0.0" if m.group(0) == "-0.0" else m.group(0)
    sign, lead, fraction = m.group(1), m.group(2), m.group(3) or ""
    # repr writes an exponent only from 1e16 up, with at most 17 significant digits, so the
    # zeros to add are never negative; the value is an integer.
    return f"{sign}{lead}{fraction}{'0' * (int(exponent) - len(fraction))}.0"


def _has_negative_zero(text: str) -> bool:
    return "-0.0" in text and (
        "-0.0," in text or "-0.0]" in text or "-0.0}" in text or text.endswith("-0.0")
    )


def _reject_constant(value: str) -> Any:
    raise PayloadError(f"{value} is not valid JSON")


def _not_json(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def json_encoder(*, default: Callable[[Any], Any], ascii_only: bool, sort_keys: bool,
                 allow_nan: bool, separators: tuple[str, str] = (",", ":"),
                 ) -> Callable[[Any], str]:
    """JSON with these options (compact by default), from a C encoder built once.
    JSONEncoder.encode builds its C encoder anew on every call (with a fresh dict to find
    cycles in); this one finds no cycles: a cyclic value ends in RecursionError. Half the
    cost of encoding a task's arguments (27 µs against 47 µs), a third of a step's digest
    (1.8 against 5.4)."""
    item_sep, key_sep = separators
    plain = json.JSONEncoder(
        separators=separators, ensure_ascii=ascii_only, sort_keys=sort_keys, allow_nan=allow_nan,
        default=default,
    ).encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator (another Python): the standard encoder
        return plain
    quote = json.encoder.encode_basestring_ascii if ascii_only else json.encoder.encode_basestring
    chunks = make(None, default, quote, None, key_sep, item_sep, sort_keys, False, allow_nan)

    def encode(value: Any) -> str:
        return "".join(chunks(value, 0))

    return encode


# Built once: json.dumps and json.loads build a new coder on every call given options.
# Strict JSON, no NaN, UTF-8 as is; a cyclic value's RecursionError is reported by dumps.
_encode = json_encoder(default=_not_json, ascii_only=False, sort_keys=False, allow_nan=False)
_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_decode = _decoder.decode
# The C scanner the decoder runs, called directly: JSONDecoder.decode wraps it in two
# whitespace matches and a Python frame, which cost twice the scan of a short document
# (1.47 us against 0.47 for "[123]"). Text Postgres writes has no surrounding whitespace.
_make_scanner: Any = getattr(json.scanner, "c_make_scanner", None)
_scan = _make_scanner(_decoder) if _make_scanner is not None else None


def dumps(value: Any, *, what: str = "value") -> str:
    """Encode ``value`` as strict JSON, or raise PayloadError naming ``what``."""
    if type(value) is dict and not value:
        return "{}"  # most calls' keyword arguments
    text = _dumps(value, what)
    if _NUMERIC_KEY.search(text) is not None:
        _check_keys(value, what)
    return text


def _dumps(value: Any, what: str) -> str:
    """:func:`dumps` but for the search for keys that meet in JSON (``_NUMERIC_KEY``)."""
    try:
        text = _encode(value)
    except ValueError as exc:
        if "Out of range float" in str(exc):
            raise PayloadError(f"{what} must be JSON: NaN and Infinity are not JSON") from None
        raise PayloadError(f"{what} must be JSON: {exc}") from None
    except TypeError as exc:
        raise PayloadError(f"{what} must be JSON: {exc}") from None
    except RecursionError:
        raise PayloadError(f"{what} is nested too deeply to encode") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise PayloadError(f"{what} must not contain NUL characters (Postgres jsonb rejects them)")
    if "e+" in text or _has_negative_zero(text):
        text = _FLOAT_FIX.sub(_fix_float, text)
    size = len(text)
    if not text.isascii():  # isascii is O(1) in CPython: the common case costs nothing
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise PayloadError(
                f"{what} must be valid Unicode: it holds a lone surrogate"
            ) from None
    if size > MAX_PAYLOAD:
        raise PayloadError(f"{what} is {size} bytes encoded; the limit is {MAX_PAYLOAD} bytes")
    return text


HEAVY = 256 * 1024
"""Characters of text, or items of a container, from which an encoding takes turns with
the rest of the event loop (see dumps_spaced)."""


def heavy(value: Any) -> bool:
    """Whether encoding ``value`` may take long: a long string, a large container, or a
    container holding one, looked for two levels down. Cheap and approximate: a small
    value costs a type check or two."""
    kind = type(value)
    if kind is str or kind is bytes:
        return len(value) >= HEAVY
    if kind is dict:
        items = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return False
    if len(items) >= 1024:
        return True
    for item in items:
        t = type(item)
        if t is str:
            if len(item) >= HEAVY:
                return True
        elif (t is list or t is tuple or t is dict) and len(item) >= 1024:
            return True
    return False


_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def dumps_spaced(value: Any, *, what: str = "value") -> str:
    """:func:`dumps`, taking turns when ``value`` is :func:`heavy`: one heavy encoding per
    turn of the event loop, with timers and I/O (heartbeats) served in between, rather
    than many large results finishing at once encoded back to back (seconds of a stalled
    loop). A thread would not help: CPython's encoder holds the GIL for each C call, and
    every step of the loop would wait for it."""
    if not heavy(value):
        return dumps(value, what=what)
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = asyncio.Lock()
    async with gate:
        await asyncio.sleep(0)  # a turn of the loop of its own
        text = _dumps(value, what)
        # The search for keys that meet, a slice per turn: over 15 MiB it takes about a
        # third as long as the encoding. Slices overlap by more than the longest key that
        # can match (an int's text stops at 4,300 digits).
        for start in range(0, len(text), _KEY_SLICE):
            if _NUMERIC_KEY.search(text, start, start + _KEY_SLICE + _KEY_OVERLAP):
                _check_keys(value, what)
                break
            await asyncio.sleep(0)
        return text


_KEY_SLICE = 1 << 20
_KEY_OVERLAP = 4400


def loads(text: str | None) -> Any:
    if text is None:
        return None
    if text == "{}":
        return {}  # most tasks' keyword arguments (a new dict each time)
    if _scan is not None:
        try:
            value, end = _scan(text, 0)
        except StopIteration:
            pass  # not a document at position 0: decode() says why, or skips the space
        else:
            if end == len(text):
                return value
    return _decode(text)


def _type_name(v: Any) -> str:
    return f"<{type(v).__module__}.{type(v).__qualname__}>"


class _Described:
    """The digest's view of values that are not JSON: by type and value where the value
    reads the same in every process (sets, decimals, dates and times, UUIDs, bytes,
    enums, dataclasses), else by type alone (a repr may hold a memory address)."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, v: Any) -> Any:
        self.seen = True
        tag = _type_name(v)
        if isinstance(v, set | frozenset):
            return {tag: sorted(_canonical(item) for item in v)}
        if isinstance(v, _BY_TEXT):
            return {tag: str(v)}
        if isinstance(v, bytes | bytearray | memoryview):
            return {tag: bytes(v).hex()}
        if isinstance(v, enum.Enum):
            return {tag: v.value}
        if isinstance(v, complex):
            return {tag: [v.real, v.imag]}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {tag: {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}}
        return tag


_BY_TEXT = (decimal.Decimal, fractions.Fraction, datetime.date, datetime.time,
            datetime.timedelta, uuid.UUID)  # fmt: skip
_described = _Described()

# Stored digests depend on these exact options: changing any of them makes every recorded
# call look like another one (NonDeterminismError on replay); a test pins the digests.
_canonical = json_encoder(default=_described, ascii_only=True, sort_keys=True, allow_nan=True)
# How digests saw values that are not JSON before they saw their values: by type alone.
# A call recorded then still matches its digest (LegacyDigest).
_canonical_by_type = json_encoder(
    default=_type_name, ascii_only=True, sort_keys=True, allow_nan=True
)


def canonical(value: Any) -> str:
    """A stable encoding for digests: sorted keys; values that are not JSON as _Described."""
    return _canonical(value)


class LegacyDigest(str):
    """A digest of arguments that are not all JSON, with the digest the same call had
    when such values were digested by type alone: a log recorded then still matches."""

    __slots__ = ("legacy",)
    legacy: str


def digest(kind: str, name: str, payload: Any) -> str:
    """The identity of a durable call: kind, name and arguments."""
    _described.seen = False
    value = [kind, name, payload]
    text = _canonical(value)
    out = hashlib.sha256(text.encode()).hexdigest()[:32]
    if not _described.seen:
        return out  # JSON alone: the two encodings agree
    d = LegacyDigest(out)
    d.legacy = hashlib.sha256(_canonical_by_type(value).encode()).hexdigest()[:32]
    return d


def _jsonb_key(pair: tuple[str, Any]) -> tuple[int, str]:
    key = pair[0]
    # jsonb orders keys by UTF-8 length, then bytewise; UTF-8's byte order is code point
    # order, which is how Python compares str.
    return (len(key) if key.isascii() else len(key.encode()), key)


def _jsonb_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > 1:
        pairs.sort(key=_jsonb_key)  # stable: of duplicate keys the last wins, as in jsonb
    return dict(pairs)


_stored_decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_jsonb_object)


_scan_stored = _make_scanner(_stored_decoder) if _make_scanner is not None else None


def loads_as_stored(text: str) -> Any:
    """Decode ``text`` (written by :func:`dumps`) as Postgres will give it back once stored
    as jsonb: object keys in jsonb's order (shorter first, then bytewise), the last of
    duplicate keys kept. A workflow's first run sees what its replays will read."""
    if _scan_stored is not None:
        try:
            value, end = _scan_stored(text, 0)
        except StopIteration:
            pass
        else:
            if end == len(text):
                return value
    return _stored_decoder.decode(text)


ERROR_LIMIT = 64 * 1024
"""Largest stored error, in bytes of JSON: an error is always recorded, cut to fit."""

_PRIVATE_ATTRS = ("__durable_",)
"""Attributes durable sets on an exception, not part of its recorded state."""


def _safe(describe: Callable[[], str], what: str) -> str:
    try:
        text = describe()
        if type(text) is not str:
            text = str.__str__(text) if isinstance(text, str) else repr(type(text))
    except BaseException as exc:  # user code: an error must still be recorded
        text = f"<{what} failed: {type(exc).__name__}>"
    return text


def _clean(text: str) -> str:
    """Text Postgres accepts: NUL and lone surrogates written out as escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode()
    return text


def _cut(text: str, limit: int, what: str) -> str:
    """``text`` within ``limit`` UTF-8 bytes, naming how much of it was dropped."""
    data = text.encode()
    if len(data) <= limit:
        return text
    note = f"\n[truncated: {len(data) - limit:,} bytes of {what} dropped]"
    kept = data[: max(0, limit - len(note.encode()))].decode("utf-8", "ignore")
    return kept + f"\n[truncated: {len(data) - len(kept.encode()):,} bytes of {what} dropped]"


def _state(exc: BaseException) -> dict[str, Any]:
    """The JSON attributes of ``exc`` (those that are not JSON are left out)."""
    out: dict[str, Any] = {}
    attrs = getattr(exc, "__dict__", None)
    if not isinstance(attrs, dict):
        return out
    for name, value in list(attrs.items()):
        if not isinstance(name, str) or name.startswith(_PRIVATE_ATTRS):
            continue
        try:
            dumps(value)
        except (PayloadError, RecursionError):
            continue
        out[name] = value
    return out


def error_payload(exc: BaseException) -> dict[str, Any]:
    """An exception as the JSON stored on a task or event: its type, message, traceback,
    and what rebuilds it (``args`` and the JSON attributes in ``attrs``; ``args`` is null
    when they are not JSON). Never raises; :func:`error_text` bounds and encodes it."""
    cls = type(exc)
    type_name = _safe(lambda: f"{cls.__module__}.{cls.__qualname__}", "type name")
    payload: dict[str, Any] = {
        "type": type_name,
        "message": _safe(lambda: str(exc), "str()"),
        "traceback": _safe(lambda: "".join(_traceback.format_exception(exc)), "traceback"),
        "args": None,
        "attrs": {},
    }
    try:
        args = list(exc.args)
        dumps(args)
        payload["args"] = args
        payload["attrs"] = _state(exc)
    except BaseException:  # not JSON (or raising): replay rebuilds a TaskFailed
        payload["dropped"] = "args and attributes: not JSON"
    try:
        reduced = exc.__reduce__()
        args = payload["args"]
        if args is not None and reduced[0] is cls and list(reduced[1]) != args:
            init = list(reduced[1])  # a built-in's own arguments: OSError's filename, say
            dumps(init)
            payload["init"] = init
    except BaseException:  # rebuilt from args alone
        pass
    replay = getattr(exc, "__durable_failure__", None)
    if isinstance(replay, dict):
        payload["replay"] = replay
    return payload


def error_text(exc: BaseException) -> str:
    """The stored form of ``exc``: JSON that Postgres jsonb accepts, at most ERROR_LIMIT
    bytes, whatever the exception holds (NUL, lone surrogates, a ``__str__`` that raises,
    megabytes of text). Never raises; what does not fit is cut, naming what was dropped."""
    try:
        return _error_text(exc)
    except BaseException:  # the last resort is a fixed description
        return '{"type":"builtins.Exception","message":"<the error could not be described>"}'


def _error_text(exc: BaseException) -> str:
    payload = error_payload(exc)
    for key in ("type", "message", "traceback"):
        payload[key] = _clean(payload[key])
    # A stored error is shown (durable show, the dashboard) and kept: an exception that
    # quotes a database URL must not take its password along.
    payload["message"] = redact(payload["message"])
    payload["traceback"] = redact(payload["traceback"])
    for key in ("args", "attrs", "init"):
        if key in payload:
            payload[key] = redact_json(payload[key])
    payload["type"] = _cut(payload["type"], 1024, "type name")
    payload["message"] = _cut(payload["message"], ERROR_LIMIT // 4, "message")
    state = dumps([payload["args"], payload["attrs"]])
    if len(state.encode()) > ERROR_LIMIT // 4:
        payload["args"], payload["attrs"] = None, {}
        payload["dropped"] = f"args and attributes: {len(state.encode()):,} bytes of JSON"
    traceback = payload["traceback"]
    room = ERROR_LIMIT - len(dumps({**payload, "traceback": ""}).encode()) - 128
    for _ in range(4):  # JSON escapes (newlines, quotes) make the text longer than its bytes
        payload["traceback"] = _cut(traceback, max(room, 0), "traceback")
        text = dumps(payload)
        over = len(text.encode()) - ERROR_LIMIT
        if over <= 0:
            return text
        room -= over + 128
    payload["traceback"] = "[truncated: the traceback did not fit]"
    return dumps(payload)


def describe_error(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` for a log line, whatever the exception holds."""
    text = f"{type(exc).__name__}: {_safe(lambda: str(exc), 'str()')}"
    return _cut(_clean(text), limit, "message")

"""Hostile input through the client and the SQL API: each value works or gets a clear
error at the call (DurableError / PayloadError from Python, a Postgres error with a
message from SQL), and an error never leaves half a write behind."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import durable
from durable.codec import MAX_PAYLOAD, loads
from durable.errors import DurableError, PayloadError
from durable.models import CancelResult

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    # One database serves every example; each one counts the rows before and after.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# Any text: quotes, backslashes, control characters, NUL, lone surrogates, non-BMP, long.
any_text = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.sampled_from(["", "'", '"', "\\", "\x00", "a\x00b", "\ud800", "é", "名前", "😀",
                     "x" * 200, "x" * 201, "é" * 200, "\n\t\r", "durable_ready", "';--"]),
    st.text(min_size=190, max_size=260),
)
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), any_text,
)
non_json = st.one_of(
    st.sets(st.integers(), max_size=3), st.binary(max_size=8), st.builds(object),
    st.just(float("nan")), st.just(float("inf")), st.just(-float("inf")),
    st.complex_numbers(max_magnitude=10), st.just(datetime.now(UTC)),
)
payloads = st.recursive(
    st.one_of(json_leaf, non_json),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(any_text, st.integers(), st.tuples(st.integers())), inner,
                        max_size=4),
    ),
    max_leaves=12,
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.booleans(), st.none(), st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1,
                                               1e-9, 1e300, "5", [1]]),
)


START_OPTIONS = {"queue", "idempotency_key", "priority", "delay", "run_at", "max_attempts",
                 "timeout", "conn", "allow_unknown"}


@pytest.fixture
async def client(dsn: str) -> AsyncIterator[durable.Client]:
    async with durable.connect(dsn) as c:
        yield c


async def counts(dsn: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "select (select count(*) from durable.tasks) as tasks,"
            " (select count(*) from durable.signals) as signals,"
            " (select count(*) from durable.events) as events"
        )
        assert row is not None
        return row["tasks"], row["signals"], row["events"]
    finally:
        await conn.close()


def unchanged_on_error(exc: BaseException, before: tuple[int, ...], after: tuple[int, ...]) -> None:
    message = str(exc.args[0]) if exc.args else ""  # a Postgres error's DETAIL follows it
    assert message, f"{type(exc).__name__} without a message"
    assert "\n" not in message.strip(), f"not one line: {exc!r}"
    assert after == before, f"half-written: {before} -> {after} after {exc!r}"


def is_json(value: Any) -> bool:
    """What strict JSON (and jsonb) can carry: dumps must accept exactly these."""
    if value is None or isinstance(value, bool | str):
        return "\x00" not in value and _utf8(value) if isinstance(value, str) else True
    if isinstance(value, int):
        return len(str(abs(value))) < 4000
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(is_json(v) for v in value)
    if isinstance(value, dict):
        return all(
            isinstance(k, str | int) and (not isinstance(k, str) or is_json(k)) and is_json(v)
            for k, v in value.items()
        )
    return False


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@SETTINGS
@given(name=any_text, queue=any_text)
async def test_any_name_and_queue_starts_or_is_refused_whole(
    client: durable.Client, dsn: str, name: str, queue: str
) -> None:
    before = await counts(dsn)
    try:
        handle = await client.start(name, queue=queue)
    except DurableError as exc:
        unchanged_on_error(exc, before, await counts(dsn))
        return
    info = await client.get(handle.id)
    assert (info.name, info.queue) == (name, queue)
    assert await counts(dsn) == (before[0] + 1, *before[1:])


@SETTINGS
@given(
    args=st.lists(payloads, max_size=3),
    kwargs=st.dictionaries(any_text.filter(lambda k: k not in START_OPTIONS), payloads, max_size=3),
)
async def test_any_arguments_are_stored_as_json_or_refused_whole(
    client: durable.Client, dsn: str, args: list[Any], kwargs: dict[str, Any]
) -> None:
    before = await counts(dsn)
    try:
        handle = await client.start("hostile_args", *args, allow_unknown=True, **kwargs)
    except TypeError:
        assume(False)  # a keyword the method itself takes (queue=, delay=...)
        return
    except PayloadError as exc:
        assert not (is_json(args) and is_json(kwargs)), f"valid JSON refused: {exc}"
        unchanged_on_error(exc, before, await counts(dsn))
        return
    assert is_json(args) and is_json(kwargs)
    info = await client.get(handle.id)
    assert same_json(info.args, loads(durable.codec.dumps(args)))
    assert same_json(info.kwargs, loads(durable.codec.dumps(kwargs)))


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values. jsonb keeps numbers as decimals, so a float with an integral
    value (3.602879701896397e+16) comes back as an int: compare numbers as floats."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return bool(a == b)


@SETTINGS
@given(delay=numbers, priority=numbers, max_attempts=numbers, timeout=numbers)
async def test_any_delay_priority_attempts_and_timeout_start_or_are_refused_whole(
    client: durable.Client, dsn: str, delay: Any, priority: Any, max_attempts: Any, timeout: Any
) -> None:
    before = await counts(dsn)
    try:
        handle = await client.start(
            "hostile_options", delay=delay, priority=priority, max_attempts=max_attempts,
            timeout=timeout,
        )
    except DurableError as exc:
        unchanged_on_error(exc, before, await counts(dsn))
        return
    info = await client.get(handle.id)
    if priority is not None:
        assert info.priority == priority
    if max_attempts is not None:
        assert info.max_attempts == max_attempts
    if timeout is not None:
        assert info.timeout == timeout
    if delay is not None:
        assert info.run_at >= info.created_at + timedelta(seconds=delay) - timedelta(seconds=1)


@SETTINGS
@given(key=any_text)
async def test_any_idempotency_key_starts_once_or_is_refused_whole(
    client: durable.Client, dsn: str, key: str
) -> None:
    before = await counts(dsn)
    try:
        first = await client.start("hostile_key", idempotency_key=key, allow_unknown=True)
    except DurableError as exc:
        unchanged_on_error(exc, before, await counts(dsn))
        return
    again = await client.start("hostile_key", idempotency_key=key, allow_unknown=True)
    assert again.id == first.id and not again.created
    assert (await client.get(first.id)).idempotency_key == key


@SETTINGS
@given(name=any_text, payload=payloads, task=st.one_of(st.none(), numbers))
async def test_any_event_is_sent_or_refused_whole(
    client: durable.Client, dsn: str, name: str, payload: Any, task: Any
) -> None:
    waiter = "hostile_waiter"
    target = (await client.start(waiter, allow_unknown=True)).id if task is None else task
    before = await counts(dsn)
    try:
        sent = await client.send_event(target, name, payload)
    except DurableError as exc:
        unchanged_on_error(exc, before, await counts(dsn))
        return
    after = await counts(dsn)
    assert after == ((before[0], before[1] + 1, before[2]) if sent else before)
    if task is None:
        assert sent  # a queued task keeps the event until it waits for it


@SETTINGS
@given(task=numbers)
async def test_any_task_id_is_found_or_reported_missing(client: durable.Client, task: Any) -> None:
    for call in (client.get, client.cancel, client.retry, client.history):
        try:
            out = await call(task)
        except DurableError as exc:
            assert str(exc)
        else:
            # Nothing found: nothing listed, nothing cancelled.
            assert out == [] or out is None or out == CancelResult(task), (call, task, out)


@SETTINGS
@given(
    name=any_text, queue=any_text, args=payloads, kwargs=payloads, priority=numbers,
    max_attempts=numbers, key=st.one_of(st.none(), any_text), kind=any_text,
)
async def test_sql_start_with_any_values_works_or_raises_a_postgres_error(
    dsn: str, name: str, queue: str, args: Any, kwargs: Any, priority: Any, max_attempts: Any,
    key: str | None, kind: str,
) -> None:
    """``select durable.start(...)`` from a session: values reach it as text; whatever
    they hold, it inserts one task or raises, inserting nothing."""
    import json

    def text(value: Any) -> str | None:
        if value is None:
            return None
        try:
            return json.dumps(value, default=str)  # NaN/Infinity come out as bare words
        except (TypeError, ValueError):
            return str(value)

    before = await counts(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        task_id = await conn.fetchval(
            "select durable.start($1::text, $2::text::jsonb, $3::text::jsonb, queue => $4::text,"
            " priority => $5::text::integer, max_attempts => $6::text::integer,"
            " idempotency_key => $7::text, kind => $8::text)",
            name, text(args), text(kwargs), queue, text(priority), text(max_attempts), key, kind,
        )
    except (asyncpg.PostgresError, asyncpg.DataError, UnicodeEncodeError, ValueError) as exc:
        unchanged_on_error(exc, before, await counts(dsn))
        return
    finally:
        await conn.close()
    assert task_id is not None
    assert await counts(dsn) == (before[0] + 1, *before[1:])


async def test_a_payload_over_the_limit_is_refused_before_anything_is_written(
    client: durable.Client, dsn: str
) -> None:
    before = await counts(dsn)
    with pytest.raises(PayloadError, match="limit"):
        await client.start("hostile_big", "x" * (MAX_PAYLOAD + 1), allow_unknown=True)
    with pytest.raises(PayloadError, match="limit"):
        await client.start(  # bytes, not characters
            "hostile_big", "é" * (MAX_PAYLOAD // 2 + 1), allow_unknown=True
        )
    with pytest.raises(PayloadError):
        await client.start(
            "hostile_big", [[[[]]]] * 3, deep=_nested(100_000), allow_unknown=True
        )
    assert await counts(dsn) == before
    handle = await client.start("hostile_big", "x" * 1_000_000, allow_unknown=True)
    assert len((await client.get(handle.id)).args[0]) == 1_000_000


def _nested(depth: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(depth):
        out = [out]
    return out

"""Every way in refuses what a daemon could not work with, at the door, in one line.

Queue limits, schedules, events and tasks, through the store (the Python API the command
line uses), the SQL functions and the tables themselves: a hostile value (NUL, a lone
surrogate, a megabyte, SQL and `%I` metacharacters, a period past the end of time) is
either refused with an error naming the field, writing nothing, or stored in a form the
claim and the scheduler then work with.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import durable
from durable.registry import Registry
from durable.scheduler import run_schedules
from durable.store import DatabaseError, Store, grant
from durable.validation import InvalidValue
from tests.support.helpers import durable_cli

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

MEGABYTE = "x" * 1_000_000
hostile_text = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=30),
    st.sampled_from([
        "", "\x00", "q\x00", "\ud800", "a\udfffb", MEGABYTE, "x" * 200, "x" * 201, "é" * 200,
        "'; drop table durable.tasks; --", '"', '""', 'a"b', "%I", "%s%s", "%L", "$1", "$$",
        "q' or '1'='1", "\\", "durable.tasks", "public.unnest", "UTC", "Europe/Paris",
        "../../etc/passwd", "Mars/Olympus", "* * * * *", "@daily", "61 * * * *",
    ]),
    st.text(min_size=190, max_size=210),
)
numbers = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 1_000_000, 1_000_001, 0.0005, 0.001, 1e-300, 31_536_000,
                     31_536_000.5, 8.64e12, 1e300, "5"]),
)


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[Store]:
    s = await Store.open(dsn, min_size=1, max_size=2)
    try:
        yield s
    finally:
        await s.close()


async def row_count(conn: asyncpg.Connection, table: str) -> int:
    value: int = await conn.fetchval(f"select count(*) from durable.{table}")
    return value


def one_line(exc: BaseException) -> str:
    message = str(exc.args[0]) if exc.args else str(exc)
    assert message and "\n" not in message.strip(), repr(exc)
    return message


@SETTINGS
@given(queue=hostile_text, concurrency=numbers, rate=numbers, period=numbers)
async def test_queue_limits_are_refused_or_claimable(
    store: Store, dsn: str, queue: Any, concurrency: Any, rate: Any, period: Any
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        before = await row_count(conn, "queues")
        try:
            await store.set_queue_limits(queue, concurrency, rate, period)
        except InvalidValue as exc:
            one_line(exc)
            assert await row_count(conn, "queues") == before
            return
        # Accepted: the claim, which every daemon runs for this queue, works with it.
        await conn.fetch(
            "select * from durable.claim($1, array['n'], 5, 30, gen_random_uuid())", queue
        )
        await conn.fetchval("select durable.claim_delay($1)", queue)
    finally:
        await conn.close()


@SETTINGS
@given(
    name=hostile_text, task=hostile_text, cron=hostile_text, timezone=hostile_text,
    queue=st.one_of(st.none(), hostile_text),
)
async def test_schedules_are_refused_or_fire(
    store: Store, dsn: str, name: Any, task: Any, cron: Any, timezone: Any, queue: Any
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        before = await row_count(conn, "schedules")
        try:
            await store.upsert_schedule(
                name, task, cron, timezone, "[]", "{}", queue, "cli", datetime.now(UTC)
            )
        except InvalidValue as exc:
            one_line(exc)
            assert await row_count(conn, "schedules") == before
            return
        # Accepted and due: the scheduler starts its task.
        await run_schedules(store, Registry(), datetime.now(UTC))
        assert await conn.fetchval(
            "select last_task_id is not null from durable.schedules where name = $1", name
        )
        await conn.execute("delete from durable.schedules")
    finally:
        await conn.close()


@SETTINGS
@given(name=hostile_text)
async def test_event_names_are_refused_or_sent(dsn: str, name: Any) -> None:
    async with durable.connect(dsn) as client:
        task = (await client.start("entry_waiter", allow_unknown=True)).id
        try:
            assert await client.send_event(task, name)
        except InvalidValue as exc:
            one_line(exc)
    conn = await asyncpg.connect(dsn)
    try:
        try:
            sent = await conn.fetchval("select durable.send_event($1, $2)", task, name)
        except (asyncpg.InvalidParameterValueError, asyncpg.CharacterNotInRepertoireError) as exc:
            one_line(exc)  # refused by the function, or by the server as it reads the text
        except (asyncpg.DataError, UnicodeEncodeError):
            pass  # a lone surrogate never leaves the client
        else:
            assert sent and 1 <= len(name) <= 200
    finally:
        await conn.close()


sql_numbers = st.one_of(
    st.none(), st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.sampled_from([0, -1, 1, 2**31 - 1]),
)
sql_floats = st.one_of(
    st.none(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e300])
)


@SETTINGS
@given(
    name=hostile_text, queue=hostile_text, kind=hostile_text, priority=sql_numbers,
    max_attempts=sql_numbers, timeout=sql_floats, key=st.one_of(st.none(), hostile_text),
    key_limit=sql_numbers, idempotency_key=st.one_of(st.none(), hostile_text),
)
async def test_sql_start_refuses_in_one_line_naming_the_argument(
    dsn: str, name: Any, queue: Any, kind: Any, priority: Any, max_attempts: Any,
    timeout: Any, key: Any, key_limit: Any, idempotency_key: Any,
) -> None:
    """Never a column's CHECK, a NOT NULL or an index row too big from inside the insert."""
    conn = await asyncpg.connect(dsn)
    try:
        before = await row_count(conn, "tasks")
        try:
            await conn.fetchval(
                "select durable.start($1, queue => $2, kind => $3, priority => $4,"
                " max_attempts => $5, timeout => $6, concurrency_key => $7, key_limit => $8,"
                " idempotency_key => $9)",
                name, queue, kind, priority, max_attempts, timeout, key, key_limit,
                idempotency_key,
            )  # fmt: skip
        except asyncpg.InvalidParameterValueError as exc:
            assert one_line(exc).startswith("durable.start: "), exc
            assert await row_count(conn, "tasks") == before
        except (asyncpg.CharacterNotInRepertoireError, asyncpg.DataError, UnicodeEncodeError):
            assert await row_count(conn, "tasks") == before  # text Postgres cannot hold
        else:
            assert await row_count(conn, "tasks") == before + 1
            if timeout is not None:
                assert math.isfinite(timeout) and timeout > 0
    finally:
        await conn.close()


@SETTINGS
@given(name=hostile_text, period=numbers, args=st.sampled_from(["[]", "{}", "1", "null"]))
async def test_rows_written_by_hand_are_refused_by_the_tables(
    dsn: str, name: Any, period: Any, args: str
) -> None:
    """A superuser's INSERT goes past every API: the tables' checks still keep out what
    would stop the claim or the scheduler."""
    conn = await asyncpg.connect(dsn)
    try:
        try:
            await conn.execute(
                "insert into durable.queues (name, rate_limit, rate_period) values ($1, 1, $2)",
                name, period if isinstance(period, float | int) and not isinstance(period, bool)
                else None,
            )  # fmt: skip
        except (asyncpg.CheckViolationError, asyncpg.CharacterNotInRepertoireError,
                asyncpg.NotNullViolationError, asyncpg.UniqueViolationError,
                asyncpg.ProgramLimitExceededError, UnicodeEncodeError,
                asyncpg.DataError):  # fmt: skip
            pass
        else:
            await conn.fetch(
                "select * from durable.claim($1, array['n'], 5, 30, gen_random_uuid())", name
            )
            await conn.execute("delete from durable.queues")
        try:
            await conn.execute(
                "insert into durable.schedules (name, task_name, cron, args, next_run_at)"
                " values ($1, $1, '* * * * *', $2::jsonb, now())",
                name, args,
            )  # fmt: skip
        except (asyncpg.CheckViolationError, asyncpg.CharacterNotInRepertoireError,
                asyncpg.UniqueViolationError, asyncpg.ProgramLimitExceededError,
                UnicodeEncodeError, asyncpg.DataError):  # fmt: skip
            pass
        else:
            assert 1 <= len(name) <= 200 and args == "[]"
            await conn.execute("delete from durable.schedules")
    finally:
        await conn.close()


@SETTINGS
@given(role=hostile_text)
async def test_grant_quotes_any_role_name(dsn: str, role: Any) -> None:
    """`durable migrate --grant ROLE` builds GRANT statements around the name: whatever it
    holds, it stays one identifier (a role that does not exist is reported)."""
    try:
        await grant(dsn, role)
    except (durable.DurableError, DatabaseError, UnicodeEncodeError, ValueError) as exc:
        one_line(exc) if not isinstance(exc, UnicodeEncodeError) else None
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("select to_regclass('durable.tasks') is not null")
    finally:
        await conn.close()


# -- the command line: exit 2 and one line naming the flag ------------------------------------


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["schedules", "add", "s", "--cron", "* * * * *", "--queue", "q" * 201], "--queue"),
        (["schedules", "add", "s" * 201, "--cron", "* * * * *"], "NAME (the schedule)"),
        (["schedules", "add", "s", "--cron", "* * * * *", "--task", "t" * 201], "--task"),
        (["schedules", "add", "s", "--cron", "* * * * *", "--timezone", "Mars/Olympus"],
         "unknown time zone 'Mars/Olympus'"),
        (["schedules", "add", "s", "--cron", "* * * * *", "--args", "[1"], "--args is not JSON"),
        (["queues", "set", "h", "--rate", "1/100000000d"], "--rate"),
        (["queues", "set", "h", "--rate", "1/0.1ms"], "--rate"),
        (["queues", "set", "q" * 201], "NAME (the queue)"),
        (["event", "1", "e" * 201], "an event name"),
        (["start", "t", "--queue", "q" * 201], "a queue name"),
    ],
)
def test_the_command_line_refuses_with_exit_2(dsn: str, argv: list[str], names: str) -> None:
    done = durable_cli(*argv, dsn=dsn)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("durable: ") and names in lines[0], lines
    assert len(lines[0]) < 300


async def test_grant_refuses_a_role_name_postgres_would_cut(dsn: str) -> None:
    """A 64-byte name is cut to its first 63 bytes by the server: the grants would go to
    another role, the one with the shorter name."""
    short = "r" * 63
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f'do $$ begin create role "{short}"; exception when duplicate_object then null;'
            " end $$"
        )
        with pytest.raises(InvalidValue, match=r"^ROLE must be at most 63 bytes, got 64"):
            await grant(dsn, short + "x")
        assert not await conn.fetchval(
            "select has_schema_privilege($1, 'durable', 'usage')", short
        )
    finally:
        await conn.close()

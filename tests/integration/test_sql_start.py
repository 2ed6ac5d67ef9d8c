"""durable.start in SQL takes the options client.start has: a deadline, the idempotency
scope and debounce, checked as client.start checks them (SQLSTATE 22023, one line naming
the argument); and migration 0009, which gave it those arguments, keeps explicit grants."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

import durable
from durable.store import migrate
from durable.store.schema import migration_files
from tests.conftest import admin, database_dsn, quote_ident

QUEUE = "sql_start_q"  # served by no daemon here: tasks stay queued


@durable.task(name="ss_echo", queue=QUEUE)
async def ss_echo(x: int) -> int:
    return x


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(dsn)
    try:
        yield c
    finally:
        await c.close()


async def test_a_deadline_is_seconds_from_now(conn: asyncpg.Connection) -> None:
    task_id = await conn.fetchval(
        "select durable.start('ss_echo', '[1]', queue => $1, deadline => 30)", QUEUE
    )
    left = await conn.fetchval(
        "select extract(epoch from deadline - created_at) from durable.tasks where id = $1",
        task_id,
    )
    assert 30 <= left < 31
    plain = await conn.fetchval("select durable.start('ss_echo', '[1]', queue => $1)", QUEUE)
    assert await conn.fetchval("select deadline from durable.tasks where id = $1", plain) is None


async def test_an_active_key_frees_once_its_task_finishes(conn: asyncpg.Connection) -> None:
    start = ("select durable.start('ss_echo', '[1]', queue => $1, idempotency_key => $2,"
             " idempotency => $3)")
    first = await conn.fetchval(start, QUEUE, "k-active", "active")
    assert await conn.fetchval(start, QUEUE, "k-active", "active") == first  # still queued
    await conn.execute("select * from durable.cancel(array[$1::bigint])", first)
    second = await conn.fetchval(start, QUEUE, "k-active", "active")
    assert second != first  # the first one finished: the key is free again
    kept = await conn.fetchval(start, QUEUE, "k-forever", "forever")
    await conn.execute("select * from durable.cancel(array[$1::bigint])", kept)
    assert await conn.fetchval(start, QUEUE, "k-forever", "forever") == kept


async def test_debounce_from_sql_and_from_python_meet_in_one_task(
    dsn: str, conn: asyncpg.Connection
) -> None:
    first = await conn.fetchval(
        "select durable.start('ss_echo', '[1]', queue => $1, debounce => 60,"
        " debounce_key => 'dk', max_delay => 120)", QUEUE,
    )
    async with durable.connect(dsn) as client:
        handle = await client.start(ss_echo, 2, debounce=60, debounce_key="dk", max_delay=120)
    again = await conn.fetchval(
        "select durable.start('ss_echo', '[3]', queue => $1, debounce => 60,"
        " debounce_key => 'dk')", QUEUE,
    )
    assert handle.id == first == again
    row = await conn.fetchrow(
        "select args::text, extract(epoch from run_at - created_at) as wait,"
        " extract(epoch from debounce_until - created_at) as bound"
        " from durable.tasks where id = $1", first,
    )
    assert row is not None and row["args"] == "[3]"  # the last start's arguments
    assert 60 <= row["wait"] <= 120 and 120 <= row["bound"] < 121
    assert await conn.fetchval(
        "select count(*) from durable.tasks where debounce_key = 'dk'") == 1
    with pytest.raises(asyncpg.PostgresError, match="pending for a task other than") as exc:
        await conn.fetchval(
            "select durable.start('other', queue => $1, debounce => 5, debounce_key => 'dk')",
            QUEUE,
        )
    assert exc.value.sqlstate == "22023"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("deadline => 'NaN'", "deadline must be within 10 years"),
        ("deadline => 1e12", "deadline must be within 10 years"),
        ("idempotency => 'sometimes', idempotency_key => 'k'",
         "idempotency must be 'forever' or 'active'"),
        ("idempotency => 'active'", "idempotency needs an idempotency_key"),
        ("debounce_key => 'k'", "debounce_key and max_delay need debounce"),
        ("max_delay => 5", "debounce_key and max_delay need debounce"),
        ("debounce => -1", "debounce must be a number of seconds from 0 to 10 years"),
        ("debounce => 10, max_delay => 5", r"max_delay \(5s\) must be at least debounce \(10s\)"),
        ("debounce => 10, idempotency_key => 'k'", "debounce cannot be combined"),
        ("debounce => 10, run_at => now()", "debounce cannot be combined"),
        ("debounce => 10, debounce_key => ''", "debounce_key must be 1 to 2000 bytes"),
    ],
)
async def test_bad_options_are_refused_naming_the_argument(
    conn: asyncpg.Connection, options: str, message: str
) -> None:
    before = await conn.fetchval("select count(*) from durable.tasks")
    with pytest.raises(asyncpg.PostgresError, match=message) as exc:
        await conn.fetchval(f"select durable.start('ss_echo', queue => $1, {options})", QUEUE)
    assert exc.value.sqlstate == "22023"
    assert await conn.fetchval("select count(*) from durable.tasks") == before


async def test_limits_hold_at_and_past_their_edge(conn: asyncpg.Connection) -> None:
    ten_years = 10 * 365 * 86400
    start = "select durable.start('ss_echo', queue => $1, {})"
    for ok in (f"deadline => {ten_years - 1}", "deadline => -1", "debounce => 0",
               f"debounce => {ten_years - 1}, debounce_key => 'edge'",
               "debounce => 1, max_delay => 1, debounce_key => 'same'",
               f"debounce => 1, debounce_key => '{'k' * 2000}'"):
        assert await conn.fetchval(start.format(ok), QUEUE) is not None, ok
    for bad, message in ((f"deadline => {ten_years}", "deadline must be within 10 years"),
                         (f"debounce => {ten_years}", "debounce must be a number of seconds"),
                         (f"debounce => 1, debounce_key => '{'k' * 2001}'",
                          "debounce_key must be 1 to 2000 bytes")):
        with pytest.raises(asyncpg.PostgresError, match=message):
            await conn.fetchval(start.format(bad), QUEUE)


NEW = ("durable.start(text, jsonb, jsonb, text, integer, timestamptz, integer,"
       " double precision, text, text, text, integer, boolean, double precision, text,"
       " double precision, text, double precision)")
OLD = ("durable.start(text, jsonb, jsonb, text, integer, timestamptz, integer,"
       " double precision, text, text, text, integer, boolean)")


async def test_migration_0009_keeps_who_may_call_durable_start(server_dsn: str) -> None:
    """An operator who revoked durable.start from PUBLIC and granted it to a producer role
    finds the same after the upgrade that changed its signature."""
    db = f"durable_grant_{secrets.token_hex(4)}"
    producer, stranger = f"producer_{secrets.token_hex(4)}", f"stranger_{secrets.token_hex(4)}"
    await admin(server_dsn, f"create database {quote_ident(db)}",
                f"create role {quote_ident(producer)}", f"create role {quote_ident(stranger)}")
    dsn = database_dsn(server_dsn, db)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "create schema durable; create table durable.migrations ("
                " version integer primary key, name text not null,"
                " applied_at timestamptz not null default now())"
            )
            for version, name, path in migration_files():
                if version < 9:
                    async with conn.transaction():
                        await conn.execute(path.read_text())
                        await conn.execute(
                            "insert into durable.migrations (version, name) values ($1, $2)",
                            version, name,
                        )
            await conn.execute(f"revoke execute on function {OLD} from public")
            await conn.execute(f"grant execute on function {OLD} to {quote_ident(producer)}")
            assert await migrate(dsn) == [v for v, _, _ in migration_files() if v >= 9]
            may = "select has_function_privilege($1, $2, 'execute')"
            assert await conn.fetchval(may, producer, NEW) is True
            assert await conn.fetchval(may, stranger, NEW) is False
        finally:
            await conn.close()
    finally:
        await admin(server_dsn, f"drop database if exists {quote_ident(db)} with (force)",
                    f"drop role if exists {quote_ident(producer)}",
                    f"drop role if exists {quote_ident(stranger)}")

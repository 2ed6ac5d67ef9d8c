"""Large payloads: client.start_many splits its statement as a fan-out does, and the SQL
API holds arguments and event payloads to the client's limit (codec.MAX_PAYLOAD)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

import durable
import durable.store.workflows
from durable.codec import MAX_PAYLOAD
from durable.errors import PayloadError

QUEUE = "sl_nobody"
"""No daemon serves it: what start_many enqueued stays as it was written."""


@durable.task(name="sl_echo", queue=QUEUE)
async def sl_echo(text: str) -> str:
    return text


@durable.task(name="sl_keyed", queue=QUEUE, concurrency_key=lambda text: text[:3], key_limit=1)
async def sl_keyed(text: str) -> str:
    return text


@durable.workflow(name="sl_waiter", queue=QUEUE)
async def sl_waiter(ctx: durable.Context) -> None: ...


@asynccontextmanager
async def session(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


# -- client.start_many ------------------------------------------------------------------

VERSIONS = (
    "select count(*), count(distinct xmin::text), count(distinct cmin::text),"
    " bool_and(args->>0 = rpad(split_part(args->>0, ':', 1) || ':', $2, 'x')),"
    " array_agg(split_part(args->>0, ':', 1)::int order by id) = array(select generate_series(0, $3 - 1))"
    " from durable.tasks where id = any($1)"
)
"""How many rows, in how many transactions and statements (xmin names a row version's
transaction, cmin the statement in it); every argument whole; ids in the order of the
calls."""


@pytest.mark.parametrize("fn", [sl_echo, sl_keyed], ids=["uniform", "keyed"])
async def test_a_start_many_larger_than_one_statement_goes_in_several_of_one_transaction(
    dsn: str, monkeypatch: pytest.MonkeyPatch, fn: durable.Definition[..., str]
) -> None:
    # start_many sent every call's arguments in one statement: past 1 GB (sixty calls of
    # 16 MB) Postgres closes the connection. It now goes in statements of at most
    # STATEMENT_BYTES, in one transaction; shown at 300 kB.
    monkeypatch.setattr(durable.store.workflows, "STATEMENT_BYTES", 300_000)
    n, size = 24, 50_000
    calls = [[f"{i}:".ljust(size, "x")] for i in range(n)]
    async with durable.connect(dsn) as client, session(dsn) as conn:
        ids = [h.id for h in await client.start_many(fn, calls)]
        row = await conn.fetchrow(VERSIONS, ids, size, n)
        assert row is not None
        rows, xacts, statements, whole, ordered = row
        assert (rows, xacts, whole, ordered) == (n, 1, True, True)
        assert statements >= 4, statements
        # Within the caller's transaction, all or nothing with it.
        async with conn.transaction():
            more = [h.id for h in await client.start_many(fn, calls, conn=conn)]
            again = await conn.fetchrow(VERSIONS, more, size, n)
            assert again is not None and tuple(again)[:3] == (n, 1, statements)
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                gone = [h.id for h in await client.start_many(fn, calls, conn=conn)]
                raise RuntimeError("rolled back")
        assert await conn.fetchval("select count(*) from durable.tasks where id = any($1)", gone) == 0


# -- the SQL API's payload limit ------------------------------------------------------


def over(n: int, comma: bool = False) -> str:
    """A JSON array of one string and a number, ``n`` bytes as the client writes it: one
    separator, so jsonb's text (a space after the comma) is a byte longer. With ``comma``
    the string holds ", " too, which only a count outside strings tells from a separator."""
    text = '["' + (", " if comma else "") + "x" * (n - 6 - 2 * comma) + '",1]'
    assert len(text) == n
    return text


async def refused(conn: asyncpg.Connection, query: str, *args: object) -> str:
    with pytest.raises(asyncpg.InvalidParameterValueError) as caught:
        await conn.execute(query, *args)
    return str(caught.value)


@pytest.mark.timeout(120)
async def test_the_sql_api_refuses_payloads_over_the_clients_limit(dsn: str) -> None:
    # durable.start and durable.send_event stored arguments and payloads of any size,
    # which the Python client refuses past 16 MiB.
    start = "select durable.start('sl_echo', $1::jsonb, $2::jsonb, queue => 'sl_nobody')"
    async with durable.connect(dsn) as client, session(dsn) as conn:
        waiter = await client.start(sl_waiter)
        send = "select durable.send_event($1, 'e', $2::jsonb)"
        assert await refused(conn, start, over(MAX_PAYLOAD + 1), "{}") == (
            f"durable.start: args is at least {MAX_PAYLOAD + 1} bytes as JSON; the limit is"
            f" {MAX_PAYLOAD} bytes"
        )
        assert await refused(conn, start, over(MAX_PAYLOAD + 1, comma=True), "{}") == (
            f"durable.start: args is {MAX_PAYLOAD + 1} bytes as JSON; the limit is {MAX_PAYLOAD} bytes"
        )
        kwargs = '{"k":"' + "x" * (2 * MAX_PAYLOAD) + '"}'
        assert await refused(conn, start, "[]", kwargs) == (
            f"durable.start: kwargs is at least {len(kwargs)} bytes as JSON; the limit is"
            f" {MAX_PAYLOAD} bytes"
        )
        assert await refused(conn, send, waiter.id, over(MAX_PAYLOAD + 1, comma=True)) == (
            f"durable.send_event: payload is {MAX_PAYLOAD + 1} bytes as JSON; the limit is"
            f" {MAX_PAYLOAD} bytes"
        )
        assert not await conn.fetchval(
            "select count(*) from durable.signals where task_id = $1", waiter.id
        )
        # At the limit as the client measures it (jsonb's own text is a byte over): taken,
        # from SQL and from the client, which sends it through durable.send_event.
        assert await conn.fetchval(start, over(MAX_PAYLOAD, comma=True), "{}")
        assert await conn.fetchval(send, waiter.id, over(MAX_PAYLOAD))
        assert await client.send_event(waiter.id, "e", ["x" * (MAX_PAYLOAD - 6), 1])
        with pytest.raises(PayloadError):
            await client.send_event(waiter.id, "e", ["x" * (MAX_PAYLOAD - 5), 1])
        assert await conn.fetchval(
            "select count(*) from durable.signals where task_id = $1", waiter.id
        ) == 2

"""Tasks a subprocess daemon imports with ``durable run --app tests.apps.queue_tasks``.

The fault and CLI tests drive these through the database only: a blocking task records
each start in ``q_runs`` and then waits until the test opens its gate in ``q_gates``.
``create_tables`` makes both tables in a test's database.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg

import durable

TABLES = """
create table if not exists q_runs (
    id bigint generated always as identity primary key,
    key text not null,
    pid integer not null,
    started_at timestamptz not null default clock_timestamp()
);
create table if not exists q_gates (key text primary key, open boolean not null default false);
"""


GATE_CHANNEL = "q_gates"


async def create_tables(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(TABLES)
    finally:
        await conn.close()


async def open_gate(dsn: str, key: str) -> None:
    """Let the bodies of ``q_block(key)`` finish, now and in any later attempt."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "insert into q_gates (key, open) values ($1, true)"
                " on conflict (key) do update set open = true",
                key,
            )
            await conn.execute("select pg_notify($1, $2)", GATE_CHANNEL, key)
    finally:
        await conn.close()


def _dsn() -> str:
    return os.environ["DURABLE_DATABASE_URL"]


@durable.task(max_attempts=3)
async def q_block(key: str) -> str:
    """Record this start, then wait until the gate ``key`` is open; returns who finished."""
    conn = await asyncpg.connect(_dsn())
    try:
        changed = asyncio.Event()
        await conn.add_listener(GATE_CHANNEL, lambda *_: changed.set())
        await conn.execute("insert into q_runs (key, pid) values ($1, $2)", key, os.getpid())
        # The test, not a timer, decides when this body may finish (open_gate notifies).
        while not await conn.fetchval("select open from q_gates where key = $1", key):
            await changed.wait()
            changed.clear()
    finally:
        await conn.close()
    return f"finished by {os.getpid()}"


@durable.task
async def q_cli_add(a: int, b: int) -> int:
    return a + b


@durable.task(max_attempts=1)
async def q_cli_fail(message: str) -> None:
    raise RuntimeError(message)

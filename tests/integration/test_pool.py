"""The daemon's connection pool: the hot path's connections are open and warm at start."""

from __future__ import annotations

import asyncpg

from durable.daemon import WARM_CONNECTIONS
from durable.store import queries
from durable.store.tasks import WARM_UP
from tests.helpers import running_daemon


async def test_a_daemon_starts_with_its_hot_statements_prepared(dsn: str) -> None:
    q = queries()
    async with running_daemon(dsn) as daemon:
        assert daemon.store is not None
        pool = daemon.store.pool
        assert pool.get_size() >= WARM_CONNECTIONS
        held: list[asyncpg.Connection] = []
        try:
            for _ in range(WARM_CONNECTIONS):
                held.append(await pool.acquire())
            for conn in held:
                prepared = {
                    r["statement"]
                    for r in await conn.fetch("select statement from pg_prepared_statements")
                }
                assert {name for name, _ in WARM_UP} == {
                    name for name, _ in WARM_UP if q[name] in prepared
                }
        finally:
            for conn in held:
                await pool.release(conn)

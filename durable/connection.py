"""``durable.connect``: a Client on a pool of its own, and where its database is."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio

from durable.client import Client
from durable.store import Store

__all__ = ["connect", "resolve_dsn"]


async def resolve_dsn(dsn: str | None = None) -> str | None:
    """The database to use: ``dsn``, the environment, else the embedded server."""
    if dsn is not None:
        return dsn
    from durable.settings import Settings

    s = Settings.from_env()
    if s.database_url is not None or s.use_libpq_env:
        return s.database_url
    from durable.embedded import EmbeddedServer
    from durable.store import migrate

    url = await anyio.to_thread.run_sync(EmbeddedServer(s.home).ensure_started)
    await migrate(url)  # the embedded server is ours: keep its schema current
    return url


@asynccontextmanager
async def connect(
    dsn: str | None = None,
    *,
    max_size: int = 5,
    server_settings: Mapping[str, str] | None = None,
    listen_dsn: str | None = None,
    statement_cache_size: int | None = None,
) -> AsyncIterator[Client]:
    """``async with durable.connect() as client:`` — a Client on a small pool
    (``max_size`` connections, and one more kept for single enqueues).

    ``dsn`` defaults to DURABLE_DATABASE_URL / DATABASE_URL / PG* variables, else the
    embedded server (started if needed). ``server_settings``: Postgres settings for
    the session of every connection (e.g. ``{"search_path": "app, public"}``).
    ``listen_dsn``: where ``handle.result()`` listens for finished tasks, when ``dsn``
    goes through PgBouncer in transaction mode (default: DURABLE_LISTEN_URL when ``dsn``
    is not given, else ``dsn``). ``statement_cache_size``: prepared statements per
    connection, 0 through such a pooler (default: DURABLE_STATEMENT_CACHE, else 100).
    """
    if statement_cache_size is None or (listen_dsn is None and dsn is None):
        from durable.settings import Settings

        # Only the variables read here: a connection given its URL does not fail on
        # settings meant for the daemon.
        env = Settings.from_env({
            v: os.environ[v] for v in ("DURABLE_LISTEN_URL", "DURABLE_STATEMENT_CACHE")
            if v in os.environ
        })  # fmt: skip
        if listen_dsn is None and dsn is None:
            listen_dsn = env.listen_url
        if statement_cache_size is None:
            statement_cache_size = env.statement_cache
    url = await resolve_dsn(dsn)
    store = await Store.open(
        url, min_size=1, max_size=max_size, name="durable-client", kept_enqueue=True,
        server_settings=server_settings, statement_cache_size=statement_cache_size,
    )
    client = Client(store, url, listen_dsn)
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()

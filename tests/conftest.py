"""Database fixtures: one server per session, a migrated template, a fresh database per test.

The server is `DURABLE_TEST_DSN` when set (a server where we may create databases),
else an embedded Postgres in a temporary home.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from durable.embedded import EmbeddedServer

if TYPE_CHECKING:
    # Only for types: imported first, the plugin's module could not be rewritten by pytest.
    from durable.testing import TestServer

# The test kit users enable the same way; its session server is the suite's too.
pytest_plugins = ["durable.testing"]


@dataclass(frozen=True)
class PgServer:
    dsn: str  # the maintenance database
    embedded: EmbeddedServer | None  # None when DURABLE_TEST_DSN points at an external server


def database_dsn(server_dsn: str, database: str) -> str:
    """`server_dsn` with its database replaced by `database`."""
    parts = urlsplit(server_dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"DURABLE_TEST_DSN must be a postgresql:// URL, not {server_dsn!r}")
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def admin(server_dsn: str, *statements: str) -> None:
    # A fresh connection per call: a fault test may restart the session server.
    conn = await asyncpg.connect(server_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def migrate(dsn: str) -> None:
    import durable.store  # imported late: unit tests must not need the store

    await durable.store.migrate(dsn)


@contextmanager
def server_home() -> Iterator[Path]:
    """A path for an embedded server's home, not created yet (durable creates it), in a
    fresh directory removed afterwards. Run as root, the server runs as another account,
    which must be able to enter that directory: the test grants it search, as an
    administrator would (durable never changes directories it did not create)."""
    base = Path(tempfile.mkdtemp(prefix="durable-test-"))
    if os.geteuid() == 0:
        base.chmod(0o711)
    try:
        yield base / "home"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(durable_server: TestServer) -> PgServer:
    return PgServer(durable_server.dsn, durable_server.embedded)


@pytest.fixture(scope="session")
def server_dsn(pg_server: PgServer) -> str:
    return pg_server.dsn


@pytest.fixture(scope="session")
async def template_db(server_dsn: str) -> AsyncIterator[str]:
    """A database with the schema applied, cloned by every test's `dsn`."""
    name = f"durable_tpl_{secrets.token_hex(4)}"
    await admin(server_dsn, f"create database {quote_ident(name)}")
    try:
        await migrate(database_dsn(server_dsn, name))
        # No connections allowed: a stray session would make `create ... template` fail.
        await admin(server_dsn, f"alter database {quote_ident(name)} allow_connections false")
        yield name
    finally:
        await admin(server_dsn, f"drop database if exists {quote_ident(name)} with (force)")


@pytest.fixture
async def dsn(server_dsn: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test only."""
    name = f"durable_test_{secrets.token_hex(6)}"
    await admin(
        server_dsn, f"create database {quote_ident(name)} template {quote_ident(template_db)}"
    )
    try:
        yield database_dsn(server_dsn, name)
    finally:
        await admin(server_dsn, f"drop database if exists {quote_ident(name)} with (force)")


@pytest.fixture
async def restartable_server() -> AsyncIterator[EmbeddedServer]:
    """An embedded server of this test's own, with `postgres` migrated; free to restart or stop."""
    with server_home() as home:
        server = EmbeddedServer(home)
        try:
            url = await asyncio.to_thread(server.ensure_started)
            await migrate(url)
            yield server
        finally:
            # Throwaway data: no shutdown checkpoint needed.
            await asyncio.to_thread(server.stop, "immediate")


def pytest_configure(config: pytest.Config) -> None:
    # The loop the async tests run on: uvloop, the one `durable run` serves on (it differs
    # from asyncio's in ways that have mattered: a timer under a millisecond away, writes
    # to a reset connection, the text of a refused connection), unless
    # DURABLE_TEST_LOOP=asyncio asks for the standard library's. CI runs both.
    if os.environ.get("DURABLE_TEST_LOOP", "uvloop") != "asyncio":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

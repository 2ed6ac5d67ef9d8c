"""The test kit's Postgres: one server per test session (``DURABLE_TEST_DSN``, else an
embedded one), a migrated template database, and a fresh copy of it per test."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from durable.embedded import EmbeddedServer

T = TypeVar("T")


@dataclass(frozen=True)
class TestServer:
    """A Postgres server tests may create and drop databases on."""

    __test__ = False  # not a test class, whatever pytest's name rules say

    dsn: str
    """The maintenance database's URL."""
    embedded: EmbeddedServer | None
    """The embedded server, or None when ``DURABLE_TEST_DSN`` named one."""


def database_dsn(server_dsn: str, database: str) -> str:
    """``server_dsn`` with its database replaced by ``database``."""
    parts = urlsplit(server_dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"DURABLE_TEST_DSN must be a postgresql:// URL, not {server_dsn!r}")
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def blocking(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to its end from synchronous code, on a thread of its own (a test's
    event loop may be running in this one, or not exist yet)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(("ok", asyncio.run(make())))  # type: ignore[arg-type]
        except BaseException as exc:
            out.append(("error", exc))

    thread = threading.Thread(target=run, name="durable-test-admin")
    thread.start()
    thread.join()
    kind, value = out[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


async def admin(server_dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def server_home() -> Iterator[Path]:
    """A path for an embedded server's home, not created yet, in a fresh directory removed
    afterwards. Run as root, the server runs as another account, which must be able to
    enter that directory: it is given search permission."""
    base = Path(tempfile.mkdtemp(prefix="durable-test-"))
    if os.geteuid() == 0:
        base.chmod(0o711)
    try:
        yield base / "home"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def test_server() -> Iterator[TestServer]:
    """``DURABLE_TEST_DSN`` when set, else an embedded server in a temporary home,
    stopped afterwards."""
    external = os.environ.get("DURABLE_TEST_DSN")
    if external:
        database_dsn(external, "probe")  # a clear error for a URL of another kind
        yield TestServer(external, None)
        return
    with server_home() as home:
        server = EmbeddedServer(home)
        try:
            yield TestServer(server.ensure_started(), server)
        finally:
            server.stop("fast")


test_server.__test__ = False  # type: ignore[attr-defined]


@contextmanager
def template_database(server_dsn: str) -> Iterator[str]:
    """A migrated database that each test's database is copied from; dropped afterwards."""
    from durable.store import migrate

    name = f"durable_tpl_{secrets.token_hex(4)}"
    blocking(lambda: admin(server_dsn, f"create database {quote_ident(name)}"))
    try:
        blocking(lambda: migrate(database_dsn(server_dsn, name)))
        # No connections allowed: a stray session would make `create ... template` fail.
        blocking(lambda: admin(
            server_dsn, f"alter database {quote_ident(name)} allow_connections false"))
        yield name
    finally:
        blocking(lambda: admin(
            server_dsn, f"drop database if exists {quote_ident(name)} with (force)"))


@contextmanager
def fresh_database(server_dsn: str, template: str) -> Iterator[str]:
    """A copy of ``template`` for one test; dropped afterwards. Yields its URL."""
    name = f"durable_test_{secrets.token_hex(6)}"
    blocking(lambda: admin(
        server_dsn, f"create database {quote_ident(name)} template {quote_ident(template)}"))
    try:
        yield database_dsn(server_dsn, name)
    finally:
        blocking(lambda: admin(
            server_dsn, f"drop database if exists {quote_ident(name)} with (force)"))

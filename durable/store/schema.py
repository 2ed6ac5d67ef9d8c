"""Where the SQL lives, migrations, grants, and errors worth retrying."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from contextlib import suppress
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from durable.errors import DurableError

MIGRATION_LOCK = 0x64757261626C65  # pg_advisory_lock key: "durable" in ASCII
PRUNE_LOCK = MIGRATION_LOCK + 1  # held by whoever prunes finished tasks

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    TimeoutError,
    # A connection whose protocol state broke under it: a process that was frozen wakes
    # up to the server's goodbye and a new query at once ("another operation is in
    # progress"). That connection is done for; a new one works.
    asyncpg.InternalClientError,
)
"""Errors after which the same call may succeed later (connection lost, server restarting)."""

PINNED_SESSION = {"search_path": "pg_catalog, pg_temp"}
"""Session settings for connections that run no user code (migrations, grants, the command
line): with the catalog alone on the path, nothing planted in a schema such as `public`
can stand in for a built-in function or operator in durable's statements."""

MAX_IDENTIFIER = 63
"""Longest identifier Postgres keeps, in bytes (NAMEDATALEN - 1)."""

DatabaseError = asyncpg.PostgresError
Connection = asyncpg.Connection


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


def is_fatal(exc: BaseException) -> bool:
    """Whether trying again later cannot help a daemon's loop: the schema is not the one
    this code expects (an undefined table, column or function: SQLSTATE class 42 but for
    42501), a feature is missing (0A), or durable itself failed (not a database error).
    Every other database error is the environment's or a row's: a login refused, a
    privilege revoked, a database that does not accept connections now, a value that a
    statement cannot use. A loop logs those and tries again."""
    if is_transient(exc):
        return False
    if not isinstance(exc, asyncpg.PostgresError):
        return True
    state = exc.sqlstate or ""
    return (state.startswith("42") and state != "42501") or state.startswith("0A")


def sql_dir() -> Path:
    """sql/ as installed in the wheel (durable/_sql), or beside the package in a checkout."""
    packaged = Path(str(resources.files("durable"))) / "_sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


@cache
def named_queries(filename: str | Path) -> dict[str, str]:
    """A file of named statements parsed into {name: statement} (sections start with
    `-- name: x`): a bare name is a file of sql/, a Path is read where it points."""
    text = (filename if isinstance(filename, Path) else sql_dir() / filename).read_text()
    parts = _NAME.split(text)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in out:
            raise DurableError(f"{filename} defines {name!r} twice")
        out[name] = body.strip()
    return out


def queries() -> dict[str, str]:
    """sql/queries.sql parsed into {name: statement}."""
    return named_queries("queries.sql")


def schema_sql() -> str:
    return (sql_dir() / "schema.sql").read_text()


def migration_files() -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted((sql_dir() / "migrations").glob("*.sql")):
        number, _, rest = path.stem.partition("_")
        found.append((int(number), rest, path))
    return found


async def connect(dsn: str | None, **kwargs: Any) -> asyncpg.Connection:
    """A single connection; ``dsn=None`` lets libpq's PG* variables decide."""
    try:
        return await asyncpg.connect(dsn, **kwargs)
    except OSError as exc:
        raise naming_the_server(exc, dsn) from exc


def naming_the_server(exc: OSError, dsn: str | None) -> OSError:
    """``exc``, a failure to connect, saying where it tried (the URL without its password).
    Under uvloop, the daemon's loop, a refused connection says only "Connection refused"."""
    if dsn is None:
        return exc
    from durable.values import masked_url

    text = f"{exc.strerror or exc} (connecting to {masked_url(dsn)})"
    try:
        return type(exc)(exc.errno, text) if exc.errno is not None else type(exc)(text)
    except Exception:  # an OSError subclass built otherwise
        return exc


PRE_RELEASE_MIGRATIONS = (
    "initial",
    "trace_context",
    "prune_index",
    "trigger_one_pass",
    "async_claim",
    "restart_budget",
    "lean_hot_triggers",
    "due_order",
    "checkpoint_rows",
    "events_without_fk",
    "ready_index_ascending",
    "column_domains",
    "claims_and_cancels",
    "retry_keeps_handled_failures",
    "search_path_and_entry_checks",
)
"""The names of migrations 1..15 before 0.1.0 folded them into one 0001: all fifteen
applied give exactly the schema of the folded 0001."""

PRE_RELEASE_REVISION = "4d90691"
"""The last git revision with the fifteen separate migrations."""


async def _adopt_pre_release(conn: asyncpg.Connection, done: dict[int, str]) -> dict[int, str]:
    """A database migrated before 0.1.0 records versions 1..15 under their old names. With all
    fifteen applied its schema is the folded 0001's: record just that one (and so leave the
    numbers 2..15 free for later migrations). A part of them cannot be finished from here."""
    old = {v for v, name in done.items() if PRE_RELEASE_MIGRATIONS[v - 1 : v] == (name,)}
    # Version 1 alone is the folded 0001, or the old one that 0002 never extended: the
    # column 0002 added tells them apart.
    if not old - {1} and (
        1 not in old
        or await conn.fetchval(
            "select exists (select from pg_attribute where attrelid = 'durable.tasks'::regclass"
            " and attname = 'trace_context' and not attisdropped)"
        )
    ):
        return done
    if old == set(range(1, len(PRE_RELEASE_MIGRATIONS) + 1)):
        await conn.execute("delete from durable.migrations where version between 2 and 15")
        return {1: done[1]}
    raise DurableError(
        f"this database holds pre-0.1.0 migrations {', '.join(map(str, sorted(old)))} of 1-15:"
        f" run `durable migrate` with durable at git revision {PRE_RELEASE_REVISION} to"
        " apply the rest, then again with this version"
    )


LOCK_TIMEOUT = 2.0
"""Seconds a migration's statement waits for a table's lock before it gives way."""

LOCK_WAIT = 120.0
"""Seconds ``durable migrate`` keeps trying a migration that gave way, by default."""


async def migrate(
    dsn: str | None,
    *,
    lock_timeout: float = LOCK_TIMEOUT,
    lock_wait: float = LOCK_WAIT,
    on_wait: Callable[[int, str, float], None] | None = None,
) -> list[int]:
    """Apply the numbered migrations not applied yet; returns the versions applied.

    Safe to run from several processes at once: they queue on an advisory lock. A database
    that applied all of the pre-0.1.0 migrations is recorded as at 0001; one that applied
    only some of them is refused with a line saying how to finish them. A migration that
    fails (or whose session is cut off) is rolled back whole and named in one line; the
    ones before it stay applied.

    A migration that alters a table waits for every transaction using it, and while it
    waits, every statement on that table queues behind it: one long transaction would stop
    a live fleet. So a statement waits ``lock_timeout`` seconds for a lock at most; then the
    migration rolls back, lets the queue through, and tries again, for ``lock_wait``
    seconds in all (``on_wait(version, name, seconds waited)`` hears of each retry).
    """
    conn = await connect(dsn, server_settings=PINNED_SESSION)
    applied: list[int] = []
    try:
        await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await _record_table(conn)
            rows = await conn.fetch("select version, name from durable.migrations")
            done = await _adopt_pre_release(conn, {r[0]: r[1] for r in rows})
            if not done and await conn.fetchval(queries()["schema_holds_objects"]):
                raise DurableError(
                    "the schema durable holds tables or functions but durable.migrations"
                    " records no migration (dropped or emptied by hand?): restore"
                    " durable.migrations from a backup, or drop the schema durable if"
                    " nothing in it is worth keeping, then run `durable migrate` again"
                )
            at = max(done, default=None)
            for version, name, path in migration_files():
                if version in done:
                    continue
                try:
                    await _apply(conn, version, name, path.read_text(), lock_timeout,
                                 lock_wait, on_wait)
                except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    # A session cut off under the migration surfaces as the rollback's
                    # failure: the server's reason is the error it happened in.
                    cause = exc.__context__ if isinstance(exc, asyncpg.InterfaceError) else None
                    raise DurableError(
                        f"migration {version:04d} ({name}) did not complete:"
                        f" {_one_line(cause if isinstance(cause, asyncpg.PostgresError) else exc)};"
                        f" the schema stays at version {at or 'none'} (a migration commits whole"
                        " or not at all): run `durable migrate` again once that is fixed"
                    ) from exc
                applied.append(version)
                at = max(version, at or 0)
            if at == latest_version() and (missing := await missing_tables(conn)):
                raise DurableError(_missing_message(at, missing))
        finally:
            # A session that broke (its backend terminated) released the lock as it ended;
            # an error here would only hide the one that broke it.
            if not conn.is_closed():
                with suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()
    return applied


async def _apply(
    conn: asyncpg.Connection, version: int, name: str, sql: str, lock_timeout: float,
    lock_wait: float, on_wait: Callable[[int, str, float], None] | None,
) -> None:
    """Run migration ``version`` in a transaction of its own, tried again while it gives
    way to a lock (see migrate)."""
    started = time.monotonic()
    pause = 0.1
    while True:
        left = lock_wait - (time.monotonic() - started)
        try:
            async with conn.transaction():
                await conn.execute(
                    "select set_config('lock_timeout', $1, true)",
                    f"{max(1, int(1000 * min(lock_timeout, max(left, 0.001))))}ms",
                )
                await conn.execute(sql)
                await conn.execute(
                    "insert into durable.migrations (version, name) values ($1, $2)",
                    version,
                    name,
                )
            return
        except asyncpg.LockNotAvailableError:
            waited = time.monotonic() - started
            if waited + pause >= lock_wait:
                raise
            if on_wait is not None:
                on_wait(version, name, waited)
            await asyncio.sleep(pause)  # the statements queued behind it go through
            pause = min(pause * 2, 2.0)


async def _record_table(conn: asyncpg.Connection) -> None:
    """The schema and its table of applied migrations, created if missing."""
    try:
        await conn.execute(
            "create schema if not exists durable;"
            "create table if not exists durable.migrations ("
            " version integer primary key, name text not null,"
            " applied_at timestamptz not null default now())"
        )
    except asyncpg.InsufficientPrivilegeError as exc:
        role = await conn.fetchval("select current_user")
        raise DurableError(
            f"cannot create or use the schema durable as role {role}: {_one_line(exc)}; run"
            " `durable migrate` as the role that owns the schema durable (or one with"
            " CREATE on the database, when the schema does not exist yet)"
        ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def schema_tables() -> list[str]:
    """The tables of sql/schema.sql: what a schema at the latest version holds."""
    return re.findall(r"^create table durable\.(\w+)", schema_sql(), re.MULTILINE)


async def missing_tables(conn: asyncpg.Connection) -> list[str]:
    """The tables of the latest schema that the database lacks (dropped by hand)."""
    return [r[0] for r in await conn.fetch(queries()["missing_tables"], schema_tables())]


def _missing_message(version: int, missing: list[str]) -> str:
    return (
        f"the schema records version {version} but lacks "
        f"{', '.join('durable.' + t for t in missing)} (dropped by hand?): durable migrate"
        " builds no table again; restore it from a backup"
    )


def schema_problem(version: int | None) -> str | None:
    """Why this code cannot serve a schema at ``version``, in one line; None when it can.
    A newer schema is served: each release's migrations keep the daemons of the release
    before it working, so a rolling deploy migrates first, then replaces the daemons."""
    need = latest_version()
    if version is not None and version >= need:
        return None
    return (
        f"the database schema is at version {version or 'none'}, this durable needs {need}:"
        " run `durable migrate`"
    )


async def check_schema(dsn: str | None) -> int | None:
    """The schema's version, read on a connection of its own; DurableError, in one line
    naming `durable migrate`, when it is older than this code needs (schema_problem)."""
    conn = await connect(dsn)
    try:
        version = await schema_version(conn)
    finally:
        await conn.close()
    if (problem := schema_problem(version)) is not None:
        raise DurableError(problem)
    return version


async def schema_version(conn: asyncpg.Connection) -> int | None:
    try:
        return await conn.fetchval("select max(version) from durable.migrations")  # type: ignore[no-any-return]
    except asyncpg.UndefinedTableError:
        return None


def latest_version() -> int:
    return max((v for v, _, _ in migration_files()), default=0)


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier, for the statements that take no parameters
    (CREATE DATABASE, GRANT): whatever it holds, it stays one identifier."""
    if not name or "\0" in name:
        raise DurableError("an SQL identifier must be non-empty and hold no NUL character")
    return '"' + name.replace('"', '""') + '"'


async def create_database(server_dsn: str | None, name: str) -> None:
    conn = await connect(server_dsn)
    try:
        await conn.execute(f"create database {quote_ident(name)}")
    finally:
        await conn.close()


async def drop_database(server_dsn: str | None, name: str) -> None:
    conn = await connect(server_dsn)
    try:
        await conn.execute(f"drop database if exists {quote_ident(name)} with (force)")
    finally:
        await conn.close()


async def grant(dsn: str | None, role: str) -> list[str]:
    """Give ``role`` what the daemon and clients need on the durable schema, and no more:
    usage on the schema (not create), read/write on the tables (only read on
    ``durable.migrations``), usage on the sequences, execute on the functions. Returns
    the statements run. Run it again after a migration adds objects (``durable migrate
    --grant`` does)."""
    from durable.validation import InvalidValue, shown, text

    text(role, "ROLE")
    if len(role.encode()) > MAX_IDENTIFIER:
        # Postgres cuts a longer identifier to its first 63 bytes: the grants would go to
        # whichever role has that shorter name.
        raise InvalidValue(
            f"ROLE must be at most {MAX_IDENTIFIER} bytes, got {len(role.encode())}: "
            f"{shown(role)}"
        )
    conn = await connect(dsn, server_settings=PINNED_SESSION)
    try:
        async with conn.transaction():
            try:
                statements = [
                    r["statement"] for r in await conn.fetch(queries()["grant_statements"], role)
                ]
                for statement in statements:
                    await conn.execute(statement)
            except asyncpg.UndefinedObjectError:
                raise DurableError(f"cannot grant to {shown(role)}: the role does not exist") from None
    finally:
        await conn.close()
    return statements


class NamedSql:
    """A small pool running the named statements of one file, for code that keeps its
    statements apart from queries.sql."""

    def __init__(self, pool: asyncpg.Pool, filename: str | Path) -> None:
        self.pool = pool
        self.q = named_queries(filename)

    @classmethod
    async def open(
        cls, dsn: str | None, filename: str | Path, *, max_size: int = 4, name: str = "durable-tool"
    ) -> NamedSql:
        pool = await asyncpg.create_pool(
            dsn, min_size=0, max_size=max_size, server_settings={"application_name": name}
        )
        return cls(pool, filename)

    async def close(self) -> None:
        await self.pool.close()

    async def run(self, name: str, *args: Any, timeout: float | None = None) -> None:
        await self.pool.execute(self.q[name], *args, timeout=timeout)

    async def rows(
        self, name: str, *args: Any, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.pool.fetch(self.q[name], *args, timeout=timeout)]

    async def value(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        return await self.pool.fetchval(self.q[name], *args, timeout=timeout)

"""The one module that talks to Postgres: every read and write durable makes."""

from __future__ import annotations

import dataclasses
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from durable import tracing
from durable.codec import dumps, loads
from durable.errors import DurableError, LeaseLost
from durable.models import (
    Checkpoint,
    Claimed,
    Event,
    HistoryEntry,
    NewTask,
    PruneResult,
    TaskInfo,
)

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
)
"""Errors after which the same call may succeed later (connection lost, server restarting)."""

DatabaseError = asyncpg.PostgresError
Connection = asyncpg.Connection


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


def sql_dir() -> Path:
    """sql/ as installed in the wheel (durable/_sql), or beside the package in a checkout."""
    packaged = Path(str(resources.files("durable"))) / "_sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


@cache
def named_queries(filename: str) -> dict[str, str]:
    """sql/FILENAME parsed into {name: statement} (sections start with `-- name: x`)."""
    text = (sql_dir() / filename).read_text()
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
    return await asyncpg.connect(dsn, **kwargs)


async def migrate(dsn: str | None) -> list[int]:
    """Apply the numbered migrations not applied yet; returns the versions applied.

    Safe to run from several processes at once: they queue on an advisory lock.
    """
    conn = await connect(dsn)
    applied: list[int] = []
    try:
        await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(
                "create schema if not exists durable;"
                "create table if not exists durable.migrations ("
                " version integer primary key, name text not null,"
                " applied_at timestamptz not null default now())"
            )
            done = {r[0] for r in await conn.fetch("select version from durable.migrations")}
            for version, name, path in migration_files():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "insert into durable.migrations (version, name) values ($1, $2)",
                        version,
                        name,
                    )
                applied.append(version)
        finally:
            await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()
    return applied


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
    conn = await connect(dsn)
    try:
        async with conn.transaction():
            try:
                statements = [
                    r["statement"] for r in await conn.fetch(queries()["grant_statements"], role)
                ]
                for statement in statements:
                    await conn.execute(statement)
            except asyncpg.UndefinedObjectError as exc:
                raise DurableError(f"cannot grant to {role!r}: {exc}") from None
    finally:
        await conn.close()
    return statements


class NamedSql:
    """A small pool running the named statements of one file of ``sql/`` (tools such as
    ``durable soak`` keep their own statements apart from queries.sql)."""

    def __init__(self, pool: asyncpg.Pool, filename: str) -> None:
        self.pool = pool
        self.q = named_queries(filename)

    @classmethod
    async def open(
        cls, dsn: str | None, filename: str, *, max_size: int = 4, name: str = "durable-tool"
    ) -> NamedSql:
        pool = await asyncpg.create_pool(
            dsn, min_size=0, max_size=max_size, server_settings={"application_name": name}
        )
        return cls(pool, filename)

    async def close(self) -> None:
        await self.pool.close()

    async def run(self, name: str, *args: Any, timeout: float | None = None) -> None:
        await self.pool.execute(self.q[name], *args, timeout=timeout)

    async def rows(self, name: str, *args: Any, timeout: float | None = None) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.pool.fetch(self.q[name], *args, timeout=timeout)]

    async def value(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        return await self.pool.fetchval(self.q[name], *args, timeout=timeout)


def _claimed(r: asyncpg.Record) -> Claimed:
    return Claimed(
        id=r["id"],
        queue=r["queue"],
        name=r["name"],
        kind=r["kind"],
        args=r["args"],
        kwargs=r["kwargs"],
        attempt=r["attempt"],
        max_attempts=r["max_attempts"],
        timeout=r["timeout"],
        token=r["claim_token"],
        branch=r["branch"],
        parent_id=r["parent_id"],
        root_id=r["root_id"],
        cancel_requested=r["cancel_requested"],
    )


def _task_info(r: asyncpg.Record) -> TaskInfo:
    return TaskInfo(
        id=r["id"],
        queue=r["queue"],
        name=r["name"],
        kind=r["kind"],
        args=loads(r["args"]),
        kwargs=loads(r["kwargs"]),
        status=r["status"],
        priority=r["priority"],
        run_at=r["run_at"],
        attempt=r["attempt"],
        max_attempts=r["max_attempts"],
        timeout=r["timeout"],
        lease_until=r["lease_until"],
        worker_id=r["worker_id"],
        result=loads(r["result"]),
        error=loads(r["error"]),
        idempotency_key=r["idempotency_key"],
        parent_id=r["parent_id"],
        root_id=r["root_id"],
        branch=r["branch"],
        wake_at=r["wake_at"],
        waiting_on=list(r["waiting_on"]) if r["waiting_on"] is not None else None,
        waiting_event=r["waiting_event"],
        cancel_requested=r["cancel_requested"],
        created_at=r["created_at"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
    )


class Subscription:
    """A dedicated connection LISTENing on channels (not from the pool)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(
        cls,
        dsn: str | None,
        channels: dict[str, Callable[[str], None]],
        on_lost: Callable[[], None],
        timeout: float = 10.0,
    ) -> Subscription:
        conn = await connect(
            dsn, timeout=timeout, server_settings={"application_name": "durable-listener"}
        )
        try:
            for channel, callback in channels.items():
                await conn.add_listener(channel, _relay(callback))
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(lambda _c: on_lost())
        return cls(conn)

    async def ping(self, timeout: float) -> None:
        """A round trip; raises if the server does not answer within ``timeout``."""
        await self._conn.fetchval("select 1", timeout=timeout)

    @property
    def backend_pid(self) -> int:
        return self._conn.get_server_pid()

    def is_closed(self) -> bool:
        return self._conn.is_closed()

    async def close(self) -> None:
        if self._conn.is_closed():
            return
        try:
            await self._conn.close(timeout=2)
        except Exception:
            self._conn.terminate()

    def terminate(self) -> None:
        self._conn.terminate()


def _relay(callback: Callable[[str], None]) -> Callable[..., None]:
    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        callback(payload)

    return on_notify


class Store:
    """A connection pool and the named queries run on it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.q = queries()

    @classmethod
    async def open(
        cls, dsn: str | None, *, min_size: int = 1, max_size: int = 10, name: str = "durable"
    ) -> Store:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings={"application_name": name},
        )
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    def terminate(self) -> None:
        self.pool.terminate()

    # -- enqueue ---------------------------------------------------------------------

    async def insert_task(
        self,
        t: NewTask,
        *,
        idempotency_key: str | None = None,
        conn: Any = None,
    ) -> tuple[int, bool]:
        """Insert one task; returns (id, inserted). An idempotency key returns the old id."""
        params = (
            t.queue,
            t.name,
            t.kind,
            t.args,
            t.kwargs,
            t.priority,
            t.run_at,
            t.max_attempts,
            t.timeout,
            idempotency_key,
            None,
            None,
            t.concurrency_key,
            t.key_limit,
            t.key_rate_limit,
            t.key_rate_period,
            t.trace_context,
        )
        if conn is not None:
            row = await conn.fetchrow(self.q["insert_task"], *params)
        else:
            row = await self.pool.fetchrow(self.q["insert_task"], *params)
        assert row is not None
        return row["id"], row["inserted"]

    async def insert_many(
        self, tasks: Sequence[NewTask], *, conn: asyncpg.Connection | None = None
    ) -> list[int]:
        params = (
            [t.queue for t in tasks],
            [t.name for t in tasks],
            [t.kind for t in tasks],
            [t.args for t in tasks],
            [t.kwargs for t in tasks],
            [t.priority for t in tasks],
            [t.run_at for t in tasks],
            [t.max_attempts for t in tasks],
            [t.timeout for t in tasks],
            [t.concurrency_key for t in tasks],
            [t.key_limit for t in tasks],
            [t.key_rate_limit for t in tasks],
            [t.key_rate_period for t in tasks],
            [t.trace_context for t in tasks],
        )
        if conn is not None:
            rows = await conn.fetch(self.q["insert_many"], *params)
        else:
            rows = await self.pool.fetch(self.q["insert_many"], *params)
        return [r["id"] for r in rows]

    # -- claiming and finishing -----------------------------------------------------

    async def claim(
        self, queue: str, names: Sequence[str], limit: int, lease: float, worker_id: uuid.UUID
    ) -> list[Claimed]:
        return (await self.ack_and_claim(queue, names, limit, lease, worker_id))[0]

    async def ack_and_claim(
        self,
        queue: str,
        names: Sequence[str],
        limit: int,
        lease: float,
        worker_id: uuid.UUID,
        acks: Sequence[tuple[int, int, str]] = (),
    ) -> tuple[list[Claimed], set[int]]:
        """Claim up to ``limit`` tasks, completing ``acks`` (id, token, result JSON) in the
        same statement and commit; returns the claimed tasks and the acks accepted."""
        acked: set[int] = set()
        if acks:
            rows = await self.pool.fetch(
                self.q["ack_and_claim"], queue, list(names), limit, lease, worker_id,
                [a[0] for a in acks], [a[1] for a in acks], [a[2] for a in acks],
            )
            acked = {r["id"] for r in rows if r["acked"]}
            rows = [r for r in rows if not r["acked"]]
        else:
            rows = await self.pool.fetch(
                self.q["claim"], queue, list(names), limit, lease, worker_id
            )
        claimed = [_claimed(r) for r in rows]
        if claimed and tracing.tracer() is not None:
            try:
                contexts = await self.trace_contexts([c.id for c in claimed])
            except Exception:
                # These tasks are claimed now: run them untraced rather than lose them
                # until their leases expire.
                contexts = {}
            claimed = [dataclasses.replace(c, trace_context=contexts.get(c.id)) for c in claimed]
        return claimed, acked

    async def trace_contexts(self, ids: Sequence[int]) -> dict[int, str]:
        """Task id -> its stored trace context (JSON), for the tasks that have one."""
        rows = await self.pool.fetch(self.q["trace_contexts"], list(ids))
        return {r["id"]: r["trace_context"] for r in rows}

    async def claim_delay(self, queue: str) -> float | None:
        """Seconds until a rate-limited queue may start another task, if it is at its limit."""
        return await self.pool.fetchval(self.q["claim_delay"], queue)  # type: ignore[no-any-return]

    async def next_due(self, queue: str, names: Sequence[str]) -> datetime | None:
        return await self.pool.fetchval(self.q["next_due"], queue, list(names))  # type: ignore[no-any-return]

    async def extend_leases(
        self, ids: Sequence[int], tokens: Sequence[int], lease: float
    ) -> set[int]:
        rows = await self.pool.fetch(self.q["extend_leases"], list(ids), list(tokens), lease)
        return {r["id"] for r in rows}

    async def reap_expired(self) -> list[tuple[int, str]]:
        rows = await self.pool.fetch(self.q["reap_expired"])
        return [(r["id"], r["status"]) for r in rows]

    async def complete_many(
        self, items: Sequence[tuple[int, int, str]]
    ) -> set[int]:
        """Fenced completions (id, token, result JSON); returns the ids accepted."""
        rows = await self.pool.fetch(
            self.q["complete"],
            [i[0] for i in items],
            [i[1] for i in items],
            [i[2] for i in items],
        )
        return {r["id"] for r in rows}

    async def retry_later(self, task_id: int, token: int, delay: float, error: str) -> bool:
        return await self.pool.fetchval(self.q["retry_later"], task_id, token, delay, error) is not None

    async def fail(self, task_id: int, token: int, error: str) -> bool:
        return await self.pool.fetchval(self.q["fail"], task_id, token, error) is not None

    async def mark_cancelled(self, task_id: int, token: int) -> bool:
        return await self.pool.fetchval(self.q["mark_cancelled"], task_id, token) is not None

    async def release(self, items: Sequence[tuple[int, int]]) -> set[int]:
        rows = await self.pool.fetch(
            self.q["release"], [i[0] for i in items], [i[1] for i in items]
        )
        return {r["id"] for r in rows}

    # -- reading ----------------------------------------------------------------------

    async def get_task(self, task_id: int) -> TaskInfo | None:
        row = await self.pool.fetchrow(self.q["get_task"], task_id)
        return _task_info(row) if row is not None else None

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[asyncpg.Record]:
        return await self.pool.fetch(self.q["list_tasks"], status, queue, name, since, limit)

    async def watch_finish(self, task_id: int) -> tuple[str, Any, Any] | None:
        row = await self.pool.fetchrow(self.q["watch_finish"], task_id)
        if row is None:
            return None
        return row["status"], loads(row["result"]), loads(row["error"])

    async def cancel(self, task_id: int) -> list[tuple[int, str]]:
        rows = await self.pool.fetch(self.q["cancel"], task_id)
        return [(r["id"], r["status"]) for r in rows]

    async def queue_stats(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(self.q["queue_stats"])

    async def list_workers(self, limit: int = 100) -> list[asyncpg.Record]:
        return await self.pool.fetch(self.q["list_workers"], limit)

    # -- workers ------------------------------------------------------------------------

    async def register_worker(
        self, worker_id: uuid.UUID, queues: dict[str, int], names: Sequence[str]
    ) -> None:
        await self.pool.execute(
            self.q["register_worker"],
            worker_id,
            socket.gethostname(),
            _pid(),
            dumps(queues),
            list(names),
        )

    async def worker_heartbeat(self, worker_id: uuid.UUID) -> None:
        await self.pool.execute(self.q["worker_heartbeat"], worker_id)

    async def worker_stopped(self, worker_id: uuid.UUID) -> None:
        await self.pool.execute(self.q["worker_stopped"], worker_id)

    # -- workflows ------------------------------------------------------------------------

    async def wake_timers(self) -> int:
        return len(await self.pool.fetch(self.q["wake_timers"]))

    async def next_timer(self) -> datetime | None:
        return await self.pool.fetchval(self.q["next_timer"])  # type: ignore[no-any-return]

    async def load_events(self, task_id: int, branch: int) -> list[Event]:
        rows = await self.pool.fetch(self.q["load_events"], task_id, branch)
        return [
            Event(
                seq=r["seq"],
                kind=r["kind"],
                name=r["name"],
                digest=r["digest"],
                status=r["status"],
                result=r["result"],
                error=r["error"],
                child_id=r["child_id"],
                wake_at=r["wake_at"],
                child_status=r["child_status"],
                child_result=r["child_result"],
                child_error=r["child_error"],
            )
            for r in rows
        ]

    async def checkpoint_many(self, items: Sequence[Checkpoint]) -> set[tuple[int, int]]:
        """Write many workflows' checkpoints in one commit; returns the (task, seq) accepted."""
        rows = await self.pool.fetch(
            self.q["checkpoint"],
            [c.task_id for c in items],
            [c.token for c in items],
            [c.branch for c in items],
            [c.seq for c in items],
            [c.kind for c in items],
            [c.name for c in items],
            [c.digest for c in items],
            [c.status for c in items],
            [c.result for c in items],
            [c.error for c in items],
            [c.wake_at for c in items],
            [c.attempt for c in items],
            [c.started_at for c in items],
        )
        return {(r["task_id"], r["seq"]) for r in rows}

    @asynccontextmanager
    async def fenced(self, task_id: int, token: int) -> AsyncIterator[Any]:
        """A transaction that commits only while this claim still holds the task.

        The fence is checked at the end, just before commit, so a long user transaction
        does not hold the task row's lock (heartbeats would queue behind it).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn
            if await conn.fetchval(self.q["fence_lock"], task_id, token) is None:
                raise LeaseLost(f"task {task_id}: the claim was lost; not committing")

    async def transaction_step(
        self,
        cp: Checkpoint,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run ``fn(conn, *args)`` and write its checkpoint in the same transaction."""
        async with self.fenced(cp.task_id, cp.token) as conn:
            result = await fn(conn, *args, **kwargs)
            text = dumps(result, what=f"the result of transaction {cp.name!r}")
            await self._insert_event(conn, cp, status="completed", result=text)
        return result

    async def record_event(self, cp: Checkpoint, **fields: Any) -> None:
        async with self.fenced(cp.task_id, cp.token) as conn:
            await self._insert_event(conn, cp, **fields)

    async def _insert_event(
        self,
        conn: asyncpg.Connection,
        cp: Checkpoint,
        *,
        status: str,
        result: str | None = None,
        error: str | None = None,
        child_id: int | None = None,
        signal_id: int | None = None,
        wake_at: datetime | None = None,
    ) -> None:
        await conn.execute(
            self.q["insert_event"],
            cp.task_id,
            cp.branch,
            cp.seq,
            cp.kind,
            cp.name,
            cp.digest,
            status,
            result,
            error,
            child_id,
            signal_id,
            wake_at,
            cp.attempt,
            cp.started_at,
        )

    async def spawn_children(
        self,
        *,
        task_id: int,
        token: int,
        branch: int,
        attempt: int,
        root_id: int,
        children: Sequence[tuple[int, str, NewTask]],
    ) -> list[int]:
        """Insert child tasks and their `child` events in one fenced transaction."""
        async with self.fenced(task_id, token) as conn:
            ids: list[int] = [
                r["id"]
                for r in await conn.fetch(
                    self.q["insert_children"],
                    [c[2].queue for c in children],
                    [c[2].name for c in children],
                    [c[2].kind for c in children],
                    [c[2].args for c in children],
                    [c[2].kwargs for c in children],
                    [c[2].priority for c in children],
                    [c[2].max_attempts for c in children],
                    [c[2].timeout for c in children],
                    list(range(len(children))),
                    task_id,
                    root_id,
                    [c[2].concurrency_key for c in children],
                    [c[2].key_limit for c in children],
                    [c[2].key_rate_limit for c in children],
                    [c[2].key_rate_period for c in children],
                    [c[2].trace_context for c in children],
                )
            ]
            await conn.execute(
                self.q["insert_child_events"],
                task_id,
                branch,
                attempt,
                [c[0] for c in children],
                [c[2].name for c in children],
                [c[1] for c in children],
                ids,
            )
        return ids

    async def resolve_wait(
        self, cp: Checkpoint, event_name: str, deadline: datetime | None, exists: bool
    ) -> tuple[str, str | None]:
        """Settle a ``wait_for_event`` at cp.seq: ('completed', payload JSON),
        ('failed', None) when the deadline passed, or ('pending', None)."""
        async with self.fenced(cp.task_id, cp.token) as conn:
            sig = await conn.fetchrow(self.q["take_signal"], cp.task_id, cp.branch, event_name)
            if sig is not None:
                outcome, payload, signal_id = "completed", sig["payload"], sig["id"]
            elif deadline is not None and deadline <= await conn.fetchval("select now()"):
                outcome, payload, signal_id = "failed", None, None
            else:
                outcome, payload, signal_id = "pending", None, None
            if exists:
                if outcome != "pending":
                    await conn.execute(
                        "update durable.events set status = $4, result = $5::jsonb,"
                        " signal_id = $6, finished_at = now()"
                        " where task_id = $1 and branch = $2 and seq = $3",
                        cp.task_id,
                        cp.branch,
                        cp.seq,
                        outcome,
                        payload,
                        signal_id,
                    )
            else:
                await self._insert_event(
                    conn,
                    cp,
                    status=outcome,
                    result=payload,
                    signal_id=signal_id,
                    wake_at=deadline,
                )
        return outcome, payload

    async def suspend(
        self,
        task_id: int,
        token: int,
        branch: int,
        waiting_on: Sequence[int] | None,
        wake_at: datetime | None,
        event: str | None,
    ) -> str | None:
        return await self.pool.fetchval(  # type: ignore[no-any-return]
            self.q["suspend"],
            task_id,
            token,
            branch,
            list(waiting_on) if waiting_on is not None else None,
            wake_at,
            event,
        )

    async def send_event(self, task_id: int, name: str, payload: str | None) -> bool:
        return bool(await self.pool.fetchval(self.q["send_event"], task_id, name, payload))

    async def history(self, task_id: int, branch: int) -> list[HistoryEntry]:
        rows = await self.pool.fetch(self.q["history"], task_id, branch)
        return [
            HistoryEntry(
                seq=r["seq"],
                kind=r["kind"],
                name=r["name"],
                status=r["status"],
                result=loads(r["result"]),
                error=loads(r["error"]),
                child_id=r["child_id"],
                child_status=r["child_status"],
                wake_at=r["wake_at"],
                attempt=r["attempt"],
                started_at=r["started_at"],
                finished_at=r["finished_at"],
            )
            for r in rows
        ]

    async def branches(self, task_id: int) -> list[int]:
        return [r["branch"] for r in await self.pool.fetch(self.q["branches"], task_id)]

    # -- flow control and schedules ---------------------------------------------------------

    async def queue_limits(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(self.q["queue_limits"])

    async def set_queue_limits(
        self, queue: str, concurrency: int | None, rate_limit: int | None, rate_period: float | None
    ) -> None:
        await self.pool.execute(self.q["set_queue_limits"], queue, concurrency, rate_limit, rate_period)

    async def upsert_schedule(
        self, name: str, task_name: str, cron: str, timezone: str, args: str, kwargs: str,
        queue: str | None, source: str, next_run_at: datetime,
    ) -> None:
        await self.pool.execute(
            self.q["upsert_schedule"], name, task_name, cron, timezone, args, kwargs, queue,
            source, next_run_at,
        )

    async def delete_schedule(self, name: str) -> bool:
        return await self.pool.fetchval(self.q["delete_schedule"], name) is not None

    async def list_schedules(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(self.q["list_schedules"])

    async def due_schedules(self, now: datetime) -> list[asyncpg.Record]:
        return await self.pool.fetch(self.q["due_schedules"], now)

    async def next_schedule(self) -> datetime | None:
        return await self.pool.fetchval(self.q["next_schedule"])  # type: ignore[no-any-return]

    async def fire_schedule(
        self, name: str, expected: datetime, next_run_at: datetime, tick: datetime, task: NewTask
    ) -> int | None:
        """Move the schedule on and start its task in one transaction; None if another
        daemon fired this tick first."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(
                self.q["advance_schedule"], name, expected, next_run_at, tick
            ) is None:
                return None
            task_id, _ = await self.insert_task(
                task, idempotency_key=f"schedule:{name}:{tick.isoformat()}", conn=conn
            )
            await conn.execute(self.q["schedule_task_started"], name, task_id)
            return task_id

    async def restart(self, task_id: int, mode: str, at: int | None = None) -> int:
        try:
            return await self.pool.fetchval(self.q["restart"], task_id, mode, at)  # type: ignore[no-any-return]
        except (asyncpg.NoDataFoundError, asyncpg.ObjectNotInPrerequisiteStateError,
                asyncpg.InvalidParameterValueError) as exc:
            raise DurableError(exc.args[0] if exc.args else str(exc)) from None

    # -- operating: probes, metrics, bulk actions, retention ------------------------------

    async def ping(self, timeout: float) -> None:
        """One round trip to the server within ``timeout`` seconds, or an exception."""
        async with self.pool.acquire(timeout=timeout) as conn:
            await conn.fetchval(self.q["ping"], timeout=timeout)

    async def schema_version(self, timeout: float) -> int | None:
        async with self.pool.acquire(timeout=timeout) as conn:
            try:
                return await conn.fetchval(self.q["schema_version"], timeout=timeout)  # type: ignore[no-any-return]
            except asyncpg.UndefinedTableError:
                return None

    async def queue_depth(self) -> list[asyncpg.Record]:
        """(queue, queued, running, waiting, oldest_ready seconds) for every busy queue."""
        return await self.pool.fetch(self.q["queue_depth"])

    async def unserved_names(self, live_within: float) -> list[asyncpg.Record]:
        """(queue, names, tasks): queued names that no daemon heard from lately can run."""
        return await self.pool.fetch(self.q["unserved_names"], live_within)

    async def select_tasks(
        self,
        statuses: Sequence[str],
        *,
        queue: str | None = None,
        name: str | None = None,
        since: datetime | None = None,
        skip_cancel_requested: bool = False,
    ) -> list[int]:
        rows = await self.pool.fetch(
            self.q["select_tasks"], list(statuses), queue, name, since, skip_cancel_requested
        )
        return [r["id"] for r in rows]

    async def retry_many(self, ids: Sequence[int], statuses: Sequence[str]) -> list[int]:
        """Retry (keeping history) those of ``ids`` still in one of ``statuses``."""
        rows = await self.pool.fetch(self.q["retry_many"], list(ids), list(statuses))
        return [r["id"] for r in rows]

    async def cancel_many(self, ids: Sequence[int]) -> list[tuple[int, str]]:
        """Cancel the unfinished tasks of ``ids`` and their unfinished descendants."""
        rows = await self.pool.fetch(self.q["cancel_many"], list(ids))
        return [(r["id"], r["status"]) for r in rows]

    async def prune_count(self, older_than: float) -> int:
        async with self.pool.acquire() as conn:
            cutoff = await conn.fetchval(self.q["prune_cutoff"], older_than)
            return await conn.fetchval(self.q["prune_count"], cutoff)  # type: ignore[no-any-return]

    async def prune(
        self,
        older_than: float,
        *,
        batch: int = 1000,
        progress: Callable[[PruneResult], None] | None = None,
    ) -> PruneResult | None:
        """Delete the task trees that all finished more than ``older_than`` seconds ago.

        Each statement deletes at most ``batch`` tasks (with their events and signals) and
        commits on its own, so no lock is held for long. Returns None, deleting nothing,
        when another process is pruning (one pruner at a time, by advisory lock).
        """
        async with self.pool.acquire() as conn:
            if not await conn.fetchval(self.q["prune_lock"], PRUNE_LOCK):
                return None
            try:
                cutoff = await conn.fetchval(self.q["prune_cutoff"], older_than)
                done = PruneResult()
                cursor = 0
                while True:
                    scan = await conn.fetchrow(self.q["prune_scan"], cursor, cutoff, batch)
                    assert scan is not None
                    roots = list(scan["roots"])
                    while roots:
                        row = await conn.fetchrow(self.q["prune_trees"], roots, cutoff, batch)
                        assert row is not None
                        if not row["tasks"]:
                            break
                        done = PruneResult(
                            done.tasks + row["tasks"],
                            done.events + row["events"],
                            done.signals + row["signals"],
                        )
                        if progress is not None:
                            progress(done)
                    # A window with nothing created before the cutoff: the rest is newer.
                    if scan["scanned"] < batch or not scan["older"]:
                        break
                    cursor = scan["last_id"]
                workers = await conn.fetch(self.q["prune_workers"], cutoff)
                return PruneResult(done.tasks, done.events, done.signals, len(workers))
            finally:
                # Returned to the pool unlocked; if this fails (connection lost), the
                # pool's reset of the connection, or its closing, releases the lock.
                try:
                    await conn.fetchval(self.q["prune_unlock"], PRUNE_LOCK)
                except Exception as exc:
                    if not is_transient(exc):
                        raise


def _pid() -> int:
    import os

    return os.getpid()

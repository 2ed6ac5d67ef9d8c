"""Tasks: enqueue, claim, finish, read; the pool every other part uses."""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import anyio
import asyncpg

from durable.codec import dumps, loads
from durable.models import (
    Claimed,
    NewTask,
    TaskInfo,
)
from durable.store.schema import queries


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


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset of a connection it takes back, after asyncpg has rolled back any
    open transaction: nothing more. The default (RESET ALL, UNLISTEN *, unlocking advisory
    locks) is a round trip on every release, that is on every statement the daemon runs,
    and its statements leave no session state. The connections user code gets
    (``ctx.transaction``) are reset in full before they go back (see ``fenced``)."""


async def reset_session(conn: Any) -> None:
    """Reset a connection's session state in full (what asyncpg's pool does by default)."""
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


WARM_UP: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("claim", ("", [], 0, 1.0, None)),
    ("complete", ([], [], [])),
    ("checkpoint", ([],)),
    ("extend_leases", ([], [], 1.0)),
    ("load_events", (0, 0)),
)
"""The daemon's hot statements, each with arguments that touch no row."""


def _usable(conn: Any) -> bool:
    """Whether a pool connection held since an earlier statement is still open (the pool
    takes back one that the server closed, and its proxy then refuses every call)."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


class KeptConnection:
    """A pool connection kept for one kind of statement, so that those skip the pool's
    acquire and release: on an idle process those cost about as much as the statement's
    own round trip (measured between statements 10 ms apart: a claim takes 1.2 ms through
    the pool and 1.0 ms on a kept connection; an enqueue, 1.5 ms and 1.25 ms). While a
    statement runs on it, ``busy`` says so, and a concurrent one can take the pool's
    path. A statement that fails, or finds the connection closed, gives it back and takes
    another: a connection the server dropped is replaced by the pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: Any = None
        self.busy = False

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        self.busy = True
        try:
            conn = self._conn
            if conn is None or not _usable(conn):  # closed while idle: the server went away
                await self.release()
                conn = self._conn = await self._pool.acquire()
            return await conn.fetch(query, *args)  # type: ignore[no-any-return]
        except BaseException:
            await self.release()
            raise
        finally:
            self.busy = False

    async def fetchval(self, query: str, *args: Any) -> Any:
        rows = await self.fetch(query, *args)
        return rows[0][0] if rows else None

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        rows = await self.fetch(query, *args)
        return rows[0] if rows else None

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # A release that fails, or outlasts its timeout (a statement cancelled on a
            # server that no longer answers), terminates the connection; the pool opens
            # another when one is needed.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._pool.release(conn, timeout=5.0)


class TaskStore:
    """A connection pool and the named queries run on it: enqueueing, claiming,
    finishing and reading tasks."""

    def __init__(self, pool: asyncpg.Pool, *, kept_enqueue: bool = False) -> None:
        self.pool = pool
        self.q = queries()
        self.clock_offset = 0.0
        """Seconds the database's clock is ahead of this process's, as last measured (at
        open, then by every heartbeat of a daemon)."""
        self._enqueue = KeptConnection(pool) if kept_enqueue else None
        """Single enqueues' own connection, one beyond the pool's size, if kept."""

    @classmethod
    async def open(
        cls,
        dsn: str | None,
        *,
        min_size: int = 1,
        max_size: int = 10,
        name: str = "durable",
        warm: bool = False,
        kept_enqueue: bool = False,
        server_settings: Mapping[str, str] | None = None,
    ) -> Self:
        """A pool of ``min_size`` to ``max_size`` connections. ``warm``: each connection
        runs the hot path's statements once, with nothing to do, as it opens, so they are
        parsed and planned and the backend has loaded what they touch before real work.
        ``kept_enqueue``: one more connection, kept for single enqueues (a client's).
        ``server_settings``: session settings for every connection, besides its name."""
        q = queries()

        async def init(conn: asyncpg.Connection) -> None:
            for query, args in WARM_UP:
                await conn.fetch(q[query], *args)

        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size + kept_enqueue,
            reset=keep_session,
            init=init if warm else None,
            server_settings={**(server_settings or {}), "application_name": name},
        )
        store = cls(pool, kept_enqueue=kept_enqueue)
        try:
            await store.measure_clock()
        except BaseException:
            await pool.close()
            raise
        return store

    def now(self) -> datetime:
        """The database's time, read off this process's clock corrected by the last
        measured offset. Every deadline the database compares (a sleep's end, an event's
        timeout, a delayed start, a schedule's tick) is computed on this clock: a process
        whose clock is off by an hour must neither spin nor fire early."""
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset)

    async def measure_clock(self, via: Any = None) -> None:
        """Measure the database clock's offset from this process's, with one round trip."""
        sent = time.time()
        server: datetime = await (via or self.pool).fetchval(self.q["clock"])
        self.observe_clock(server, sent, time.time())

    def observe_clock(self, server: datetime, sent: float, received: float) -> None:
        """Take the offset from a server timestamp read between ``sent`` and ``received``
        (this process's epoch seconds): the server read it halfway, give or take half the
        round trip."""
        self.clock_offset = server.timestamp() - (sent + received) / 2

    async def close(self) -> None:
        if self._enqueue is not None:
            await self._enqueue.release()  # the pool's close waits for every connection
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
        params: tuple[Any, ...] = (
            t.queue,
            t.name,
            t.kind,
            t.args,
            t.kwargs,
            t.priority,
            t.run_at,
            t.max_attempts,
            t.timeout,
            t.concurrency_key,
            t.key_limit,
            t.key_rate_limit,
            t.key_rate_period,
            t.trace_context,
        )
        on: Any = conn
        if on is None:
            kept = self._enqueue
            on = kept if kept is not None and not kept.busy else self.pool
        if idempotency_key is None:
            return await on.fetchval(self.q["insert_task"], *params), True
        row = await on.fetchrow(self.q["insert_task_keyed"], *params, idempotency_key)
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

    def kept_connection(self) -> KeptConnection:
        return KeptConnection(self.pool)

    async def claim(
        self,
        queue: str,
        names: Sequence[str],
        limit: int,
        lease: float,
        worker_id: uuid.UUID,
        via: KeptConnection | None = None,
    ) -> list[Claimed]:
        rows = await (via or self.pool).fetch(
            self.q["claim"], queue, list(names), limit, lease, worker_id
        )
        # Positional: durable.claim returns Claimed's columns in its order (a test pins it).
        return [Claimed(*r) for r in rows]

    async def trace_contexts(self, ids: Sequence[int]) -> dict[int, str]:
        """Task id -> its stored trace context (JSON), for the tasks that have one."""
        rows = await self.pool.fetch(self.q["trace_contexts"], list(ids))
        return {r["id"]: r["trace_context"] for r in rows}

    async def claim_delay(self, queue: str, via: KeptConnection | None = None) -> float | None:
        """Seconds until a rate-limited queue may start another task, if it is at its limit."""
        return await (via or self.pool).fetchval(self.q["claim_delay"], queue)  # type: ignore[no-any-return]

    async def next_due(
        self, queue: str, names: Sequence[str], via: KeptConnection | None = None
    ) -> datetime | None:
        return await (via or self.pool).fetchval(self.q["next_due"], queue, list(names))  # type: ignore[no-any-return]

    async def extend_leases(
        self, ids: Sequence[int], tokens: Sequence[int], lease: float
    ) -> dict[int, bool]:
        """Extend the leases still held; returns {id: whether a cancel was asked for}."""
        rows = await self.pool.fetch(self.q["extend_leases"], list(ids), list(tokens), lease)
        return {r[0]: r[1] for r in rows}

    async def reap_expired(self) -> list[tuple[int, str]]:
        rows = await self.pool.fetch(self.q["reap_expired"])
        return [(r["id"], r["status"]) for r in rows]

    async def complete_many(
        self, items: Sequence[tuple[int, int, str]], via: KeptConnection | None = None
    ) -> dict[int, bool]:
        """Fenced completions (id, token, result JSON); returns {id: cancelled} for the
        writes accepted (a task whose cancel was asked for first ends cancelled)."""
        rows = await (via or self.pool).fetch(
            self.q["complete"],
            [i[0] for i in items],
            [i[1] for i in items],
            [i[2] for i in items],
        )
        return {r[0]: r[1] for r in rows}

    async def retry_later(self, task_id: int, token: int, delay: float, error: str) -> bool:
        return (
            await self.pool.fetchval(self.q["retry_later"], task_id, token, delay, error)
            is not None
        )

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

    async def cancel(self, ids: Sequence[int]) -> list[tuple[int, str, bool]]:
        """Cancel ``ids`` and their unfinished descendants: (id, status, already_finished)
        for each task reached (see durable.cancel)."""
        rows = await self.pool.fetch(self.q["cancel"], list(ids))
        return [(r[0], r[1], r[2]) for r in rows]

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
        """Record that the daemon is alive, and measure the clock's offset again."""
        sent = time.time()
        server = await self.pool.fetchval(self.q["worker_heartbeat"], worker_id)
        if server is not None:
            self.observe_clock(server, sent, time.time())

    async def worker_stopped(self, worker_id: uuid.UUID) -> None:
        await self.pool.execute(self.q["worker_stopped"], worker_id)


def _pid() -> int:
    import os

    return os.getpid()

"""The store's core: the connection pool, its kept connections, the named queries and
the database's clock. Every part of the store (tasks, workflows, operations) runs on it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Self, TypeVar

import anyio
import asyncpg

from durable.store.schema import naming_the_server, queries


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
    ("complete_tasks", ([], [], [])),
    ("checkpoint", ([],)),
    ("extend_leases", ([], [], 1.0)),
    ("resume_events", (0, 0, 0)),
)
"""The daemon's hot statements, each with arguments that touch no row."""


def _usable(conn: Any) -> bool:
    """Whether a pool connection held since an earlier statement is still open (the pool
    takes back one that the server closed, and its proxy then refuses every call)."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


MIN_STATEMENT_DEADLINE = 10.0


def statement_deadline(lease: float) -> float:
    """Seconds a daemon waits for a statement of its own on the hot path (a claim, a look
    at what is due, a poll, a group commit) before it gives the statement and its
    connection up and goes on with a new one: a lease, whose end would let others take
    the tasks anyway, but never less than MIN_STATEMENT_DEADLINE (a large result's
    write can take seconds). Without it, a connection whose path died for good holds
    that loop for ever."""
    return max(lease, MIN_STATEMENT_DEADLINE)


class Pool(asyncpg.Pool):
    """asyncpg's pool, but a connection given up on goes away at once. Released by a
    task being cancelled (a statement's deadline, a stop's bound), asyncpg's pool would
    wait, without a bound, for the server to answer the statement it cancels: on a path
    that died for good (a firewall that forgot the flow, a failover that black-holes it)
    no answer comes, and that task, a heartbeat or a claim, would hang for ever while
    new connections work. The connection is closed instead; the pool opens another."""

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            connection.terminate()
        await super().release(connection, timeout=timeout)


def create_pool(dsn: str | None, **options: Any) -> Pool:
    """asyncpg.create_pool with :class:`Pool`, and asyncpg's defaults for the rest."""
    defaults: dict[str, Any] = {
        "connection_class": asyncpg.Connection, "record_class": asyncpg.Record,
        "max_queries": 50_000, "max_inactive_connection_lifetime": 300.0, "loop": None,
    }
    return Pool(dsn, **{**defaults, **options})


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
        except asyncio.CancelledError:
            # Given up on (a stop's bound, the last writes' deadline): the connection is
            # closed at once. Giving it back would wait for the server to acknowledge the
            # cancel, which on a path that stopped answering holds the stop for the
            # release's timeout.
            self.abandon()
            raise
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

    def abandon(self) -> None:
        """Close the connection without a goodbye; the pool opens another when needed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # A release that fails, or outlasts its timeout (a statement cancelled on a
            # server that no longer answers), terminates the connection; the pool opens
            # another when one is needed.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._pool.release(conn, timeout=5.0)


class Database:
    """The pool every part of the store runs its named queries on, and the database's
    clock as this process reads it."""

    def __init__(self, pool: asyncpg.Pool, *, kept_enqueue: bool = False) -> None:
        self.pool = pool
        self.q = queries()
        self._offset = timedelta(0)
        self._offset_s = 0.0
        self.enqueue = KeptConnection(pool) if kept_enqueue else None
        self.lease = 30.0
        """Seconds a fenced transaction renews its task's lease for (see Database.open)."""
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
        statement_cache_size: int = 100,
        lease: float = 30.0,
    ) -> Self:
        """A pool of ``min_size`` to ``max_size`` connections. ``warm``: each connection
        runs the hot path's statements once, with nothing to do, as it opens, so they are
        parsed and planned and the backend has loaded what they touch before real work.
        ``kept_enqueue``: one more connection, kept for single enqueues (a client's).
        ``server_settings``: session settings for every connection, besides its name.
        ``statement_cache_size``: asyncpg's prepared statements per connection; 0 behind a
        transaction pooler, where a named statement prepared in one transaction is gone
        (or someone else's) in the next. ``lease``: seconds a fenced transaction renews
        its task's lease for as it locks the row (the daemon's DURABLE_LEASE)."""
        q = queries()

        async def init(conn: asyncpg.Connection) -> None:
            for query, args in WARM_UP:
                await conn.fetch(q[query], *args)

        try:
            pool = await create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size + kept_enqueue,
                reset=keep_session,
                init=init if warm else None,
                server_settings={**(server_settings or {}), "application_name": name},
                statement_cache_size=statement_cache_size,
            )
        except OSError as exc:
            raise naming_the_server(exc, dsn) from exc
        store = cls(pool, kept_enqueue=kept_enqueue)
        store.lease = lease
        try:
            await store.measure_clock()
        except BaseException:
            await pool.close()
            raise
        return store

    @property
    def clock_offset(self) -> float:
        """Seconds the database's clock is ahead of this process's, as last measured (at
        open, then by every heartbeat of a daemon)."""
        return self._offset.total_seconds()

    @clock_offset.setter
    def clock_offset(self, seconds: float) -> None:
        # Kept as a timedelta too: now() runs often, and building one costs more than
        # reading the clock.
        self._offset = timedelta(seconds=seconds)
        self._offset_s = seconds

    def now(self) -> datetime:
        """The database's time, read off this process's clock corrected by the last
        measured offset. Every deadline the database compares (a sleep's end, an event's
        timeout, a delayed start, a schedule's tick) is computed on this clock: a process
        whose clock is off by an hour must neither spin nor fire early."""
        return datetime.now(UTC) + self._offset

    def epoch(self) -> float:
        """:meth:`now` in seconds since the epoch (what every step's checkpoint records)."""
        return time.time() + self._offset_s

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
        if self.enqueue is not None:
            await self.enqueue.release()  # the pool's close waits for every connection
        await self.pool.close()

    def terminate(self) -> None:
        self.pool.terminate()

    def kept_connection(self) -> KeptConnection:
        return KeptConnection(self.pool)


class Part:
    """One part of the store: the named queries of one concern, over the shared pool."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.pool = db.pool
        self.q = db.q


T = TypeVar("T")

ROW_BYTES = 256
"""What a row costs a statement besides its texts (numbers, lengths, names), about."""


def split(items: Sequence[T], size: Callable[[T], int], limit: int) -> list[Sequence[T]]:
    """``items`` cut in order into runs of at most about ``limit`` characters of text (at
    least one item each), ``size(item)`` being an item's texts. Characters are counted,
    not UTF-8 bytes: a run is a bound on the work of one statement, far below Postgres's
    limit either way."""
    if not items:
        return []
    parts: list[Sequence[T]] = []
    start, total = 0, 0
    for i, item in enumerate(items):
        n = size(item) + ROW_BYTES
        if total + n > limit and i > start:
            parts.append(items[start:i])
            start, total = i, 0
        total += n
    parts.append(items[start:])
    return parts

"""Tasks: enqueue, claim, finish, read, and the daemons' rows."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from durable.codec import dumps, loads
from durable.models import (
    Claimed,
    NewTask,
    Progress,
    QueueCount,
    TaskInfo,
    TaskSummary,
    WorkerInfo,
)
from durable.store import workflows
from durable.store.database import KeptConnection, Part, split
from durable.validation import InvalidValue

T = TypeVar("T")


def _task_bytes(t: NewTask) -> int:
    return len(t.args) + len(t.kwargs) + len(t.trace_context or "") + len(t.name)


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
        version=r["version"],
        deadline=r["deadline"],
    )


class Tasks(Part):
    """Enqueueing, claiming, finishing and reading tasks."""

    # -- enqueue ---------------------------------------------------------------------

    async def insert_task(
        self,
        t: NewTask,
        *,
        idempotency_key: str | None = None,
        conn: Any = None,
        active: bool = False,
        debounce: tuple[float, str, float | None] | None = None,
    ) -> tuple[int, bool]:
        """Insert one task; returns (id, inserted). An idempotency key returns the old id
        (with ``active``, only while the old task is unfinished)."""
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
            t.version,
            t.deadline,
        )
        on: Any = conn
        if on is None:
            kept = self.db.enqueue
            on = kept if kept is not None and not kept.busy else self.pool
        if debounce is not None:  # (seconds, key, max_delay)
            found = await on.fetchrow(self.q["insert_task_debounced"], *params, *debounce)
            if found is None:
                raise InvalidValue(
                    f"debounce_key {debounce[1]!r} is pending for a task other than {t.name!r}"
                )
            return found["id"], found["inserted"]
        if idempotency_key is None:
            return await on.fetchval(self.q["insert_task"], *params), True
        query = self.q["insert_task_active" if active else "insert_task_keyed"]
        row = await on.fetchrow(query, *params, idempotency_key)
        assert row is not None
        return row["id"], row["inserted"]

    async def insert_task_labelled(
        self,
        t: NewTask,
        tags: Sequence[str] | None,
        attributes: str | None,
        *,
        idempotency_key: str | None = None,
        conn: Any = None,
    ) -> tuple[int, bool]:
        """`insert_task` with tags and attributes (JSON text of an object); validated by
        the caller (durable.validation.labels)."""
        on: Any = conn if conn is not None else self.pool
        row = await on.fetchrow(
            self.q["insert_task_labelled"],
            t.queue, t.name, t.kind, t.args, t.kwargs, t.priority, t.run_at, t.max_attempts,
            t.timeout, t.concurrency_key, t.key_limit, t.key_rate_limit, t.key_rate_period,
            t.trace_context, idempotency_key,
            list(tags) if tags is not None else None, attributes, t.version, t.deadline,
        )  # fmt: skip
        assert row is not None
        return row["id"], row["inserted"]

    async def insert_many(
        self, tasks: Sequence[NewTask], *, conn: asyncpg.Connection | None = None
    ) -> list[int]:
        """Insert ``tasks`` in order; their ids. Past STATEMENT_BYTES of arguments, in
        several statements of one transaction."""

        async def insert(via: Any, part: Sequence[NewTask]) -> list[int]:
            rows = await via.fetch(
                self.q["insert_many"],
                [t.queue for t in part],
                [t.name for t in part],
                [t.kind for t in part],
                [t.args for t in part],
                [t.kwargs for t in part],
                [t.priority for t in part],
                [t.run_at for t in part],
                [t.max_attempts for t in part],
                [t.timeout for t in part],
                [t.concurrency_key for t in part],
                [t.key_limit for t in part],
                [t.key_rate_limit for t in part],
                [t.key_rate_period for t in part],
                [t.trace_context for t in part],
                [t.version for t in part],
                [t.deadline for t in part],
            )
            return [r["id"] for r in rows]

        return await self._in_parts(tasks, _task_bytes, insert, conn)

    async def insert_uniform(
        self,
        template: NewTask,
        args: Sequence[str],
        kwargs: Sequence[str] | None,
        *,
        conn: asyncpg.Connection | None = None,
    ) -> list[int]:
        """Tasks like ``template`` but for their arguments (JSON texts; ``kwargs`` None:
        none has keyword arguments), in order; their ids."""
        t = template

        async def insert(via: Any, part: Sequence[int]) -> list[int]:
            cut = slice(part[0], part[-1] + 1)
            rows = await via.fetch(
                self.q["insert_uniform"], t.queue, t.name, t.kind, list(args[cut]),
                list(kwargs[cut]) if kwargs is not None else None, t.priority, t.run_at,
                t.max_attempts, t.timeout, t.trace_context, t.version, t.deadline,
            )  # fmt: skip
            return [r["id"] for r in rows]

        def size(i: int) -> int:
            return len(args[i]) + (len(kwargs[i]) if kwargs is not None else 0)

        return await self._in_parts(range(len(args)), size, insert, conn)

    async def _in_parts(
        self,
        items: Sequence[T],
        size: Callable[[T], int],
        insert: Callable[[Any, Sequence[T]], Awaitable[list[int]]],
        conn: asyncpg.Connection | None,
    ) -> list[int]:
        """``insert(connection, part)`` for each part of ``items`` of at most about
        STATEMENT_BYTES, in one transaction (Postgres closes the connection on a message
        over 1 GB: a start_many of large arguments lost it); the ids, in order."""
        parts = split(items, size, workflows.STATEMENT_BYTES)
        if len(parts) <= 1:
            return await insert(conn or self.pool, items) if items else []

        async def each(via: Any) -> list[int]:
            ids: list[int] = []
            # Within the caller's transaction, a savepoint: all the parts or none.
            async with via.transaction():
                for part in parts:
                    ids += await insert(via, part)
            return ids

        if conn is not None:
            return await each(conn)
        async with self.pool.acquire() as pooled:
            return await each(pooled)

    # -- claiming and finishing -----------------------------------------------------

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

    async def due_queues(
        self, queues: Sequence[str], names: Sequence[str], within: float
    ) -> list[tuple[str, float]]:
        """(queue, seconds until due) for each of ``queues`` with work due within
        ``within`` seconds; zero or less: due now."""
        rows = await self.pool.fetch(self.q["due_queues"], list(queues), list(names), within)
        return [(r[0], r[1]) for r in rows]

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

    async def complete_tasks(
        self, items: Sequence[tuple[int, int, str]], via: KeptConnection | None = None
    ) -> dict[int, bool]:
        """``complete_many`` for plain tasks only, which have no children: their rows
        alone are locked (see sql/queries.sql, complete_tasks)."""
        rows = await (via or self.pool).fetch(
            self.q["complete_tasks"],
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

    async def fail_deadline(self, task_id: int, token: int, error: str) -> bool:
        """Fail the task whose deadline passed and cancel its unfinished descendants."""
        return await self.pool.fetchval(self.q["fail_deadline"], task_id, token, error) is not None

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
    ) -> list[TaskSummary]:
        rows = await self.pool.fetch(self.q["list_tasks"], status, queue, name, since, limit)
        return [TaskSummary(**dict(r)) for r in rows]

    async def report_progress(
        self, task_id: int, token: int, value: str | None, message: str | None
    ) -> None:
        await self.pool.execute(self.q["report_progress"], task_id, token, value, message)

    async def progress_state(self, task_id: int) -> tuple[str, Progress | None] | None:
        """The task's status and latest progress; None when there is no such task."""
        row = await self.pool.fetchrow(self.q["progress_state"], task_id)
        if row is None:
            return None
        if row["updated_at"] is None:
            return row["status"], None
        return row["status"], Progress(loads(row["value"]), row["message"], row["updated_at"])

    async def progress_of(self, ids: Sequence[int]) -> dict[int, Progress]:
        rows = await self.pool.fetch(self.q["progress_of"], list(ids))
        return {
            r["task_id"]: Progress(loads(r["value"]), r["message"], r["updated_at"]) for r in rows
        }

    async def watch_finish(self, task_id: int) -> tuple[str, Any, Any, int | None] | None:
        """(status, result, error, the run that continued it) of the task, which will
        notify `durable_done` when it finishes."""
        row = await self.pool.fetchrow(self.q["watch_finish"], task_id)
        if row is None:
            return None
        return row["status"], loads(row["result"]), loads(row["error"]), row["continued_as"]

    async def continue_as_new(self, task_id: int, token: int, args: str, kwargs: str) -> int | None:
        """End the run and start the next of its chain: the new id; None when the claim
        was lost; 0 when a cancel came first (the run ended cancelled)."""
        return await self.pool.fetchval(self.q["continue_as_new"], task_id, token, args, kwargs)  # type: ignore[no-any-return]

    async def chain(self, task_id: int) -> tuple[int | None, int | None]:
        """(the run it continues, the run that continued it)."""
        row = await self.pool.fetchrow(self.q["chain"], task_id)
        return (row["continued_from"], row["continued_as"]) if row is not None else (None, None)

    async def cancel(self, ids: Sequence[int]) -> list[tuple[int, str, bool]]:
        """Cancel ``ids`` and their unfinished descendants: (id, status, already_finished)
        for each task reached (see durable.cancel)."""
        rows = await self.pool.fetch(self.q["cancel"], list(ids))
        return [(r[0], r[1], r[2]) for r in rows]

    async def queue_stats(self) -> list[QueueCount]:
        return [QueueCount(**dict(r)) for r in await self.pool.fetch(self.q["queue_stats"])]

    async def list_workers(self, limit: int = 100) -> list[WorkerInfo]:
        """Registered daemons, the most recently started first."""
        return [
            WorkerInfo(
                id=r["id"], host=r["host"], pid=r["pid"], queues=json.loads(r["queues"]),
                names=tuple(r["names"]), started_at=r["started_at"],
                heartbeat_at=r["heartbeat_at"], stopped_at=r["stopped_at"],
                silence=r["silence"].total_seconds(),
            )
            for r in await self.pool.fetch(self.q["list_workers"], limit)
        ]

    # -- workers ------------------------------------------------------------------------

    async def register_worker(
        self, worker_id: uuid.UUID, queues: dict[str, int], names: Sequence[str]
    ) -> None:
        # Tried again after a try that committed but lost its answer with its connection:
        # ids are random, so a row already there is this daemon's own.
        with contextlib.suppress(asyncpg.UniqueViolationError):
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
            self.db.observe_clock(server, sent, time.time())

    async def worker_stopped(self, worker_id: uuid.UUID) -> None:
        await self.pool.execute(self.q["worker_stopped"], worker_id)


def _pid() -> int:
    import os

    return os.getpid()

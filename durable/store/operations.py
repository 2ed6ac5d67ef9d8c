"""Operating the fleet: limits, schedules, restarts, probes, bulk actions, pruning."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from durable import validation
from durable.errors import DurableError
from durable.models import (
    DueSchedule,
    IdleState,
    NewTask,
    PruneResult,
    QueueLimit,
    ScheduleInfo,
    Unserved,
)
from durable.store.database import Database, Part
from durable.store.schema import PRUNE_LOCK, named_queries
from durable.store.tasks import Tasks


class Operations(Part):
    """Operating the fleet: limits, schedules, restarts, probes, bulk actions, pruning."""

    def __init__(self, db: Database, tasks: Tasks) -> None:
        super().__init__(db)
        self.tasks = tasks

    async def queue_limits(self) -> list[QueueLimit]:
        return [
            QueueLimit(
                r["name"], r["concurrency"], r["rate_limit"], r["rate_period"], r["paused"]
            )
            for r in await self.pool.fetch(self.q["queue_limits"])
        ]

    async def set_queue_paused(self, queue: str, paused: bool) -> None:
        """Pause or resume claiming from ``queue`` on every daemon. A pause returns once
        no claim of the queue can take a task any more."""
        validation.text(queue, "a queue name")
        await self.pool.execute(self.q["set_queue_paused"], queue, paused)
        if paused:
            await self.pool.execute(self.q["pause_barrier"], queue)

    async def set_queue_limits(
        self, queue: str, concurrency: int | None, rate_limit: int | None,
        rate_period: float | None, *, set_concurrency: bool = True, set_rate: bool = True,
    ) -> None:
        """Set a queue's fleet-wide limits (None: no limit); one not set (``set_concurrency``
        or ``set_rate`` false) keeps its value. Raises InvalidValue, writing nothing, for a
        value the claim could not work with."""
        validation.queue_limits(queue, concurrency, rate_limit, rate_period)
        await self.pool.execute(
            self.q["set_queue_limits"], queue, concurrency, rate_limit, rate_period,
            set_concurrency, set_rate,
        )  # fmt: skip

    async def upsert_schedule(
        self,
        name: str,
        task_name: str,
        cron: str,
        timezone: str,
        args: str,
        kwargs: str,
        queue: str | None,
        source: str,
        next_run_at: datetime,
        *,
        replace_code: bool = False,
    ) -> bool:
        """Create or update a cron schedule; raises InvalidValue, writing nothing, for a
        name, expression, time zone or queue the scheduler could not work with. False,
        writing nothing, when the row under ``name`` came from the other ``source`` (code
        or cli); ``replace_code`` lets a 'cli' schedule replace one declared in code."""
        validation.schedule(name, task_name, cron, timezone, queue)
        written = await self.pool.fetchval(
            self.q["upsert_schedule"],
            name,
            task_name,
            cron,
            timezone,
            args,
            kwargs,
            queue,
            source,
            next_run_at,
            replace_code and source == "cli",
        )
        return written is not None

    async def forget_code_schedules(self, names: Sequence[str]) -> list[str]:
        """Delete the schedules declared in code under ``names`` (not those added from the
        command line); returns the names deleted."""
        return [r[0] for r in await self.pool.fetch(self.q["forget_code_schedules"], list(names))]

    async def delete_schedule(self, name: str) -> bool:
        return await self.pool.fetchval(self.q["delete_schedule"], name) is not None

    async def list_schedules(self) -> list[ScheduleInfo]:
        return [
            ScheduleInfo(
                name=r["name"], task=r["task_name"], cron=r["cron"], timezone=r["timezone"],
                args=json.loads(r["args"]), queue=r["queue"], source=r["source"],
                next_run_at=r["next_run_at"], last_run_at=r["last_run_at"],
                last_task_id=r["last_task_id"],
            )
            for r in await self.pool.fetch(self.q["list_schedules"])
        ]

    async def due_schedules(self, now: datetime) -> list[DueSchedule]:
        return [DueSchedule(*r) for r in await self.pool.fetch(self.q["due_schedules"], now)]

    async def next_schedule(self, skip: Sequence[str] = ()) -> datetime | None:
        """When the next schedule is due, leaving out the schedules named in ``skip``."""
        return await self.pool.fetchval(self.q["next_schedule"], list(skip))  # type: ignore[no-any-return]

    async def fire_schedule(
        self, name: str, expected: datetime, next_run_at: datetime, tick: datetime, task: NewTask
    ) -> int | None:
        """Move the schedule on and start its task in one transaction; None if another
        daemon fired this tick first."""
        async with self.pool.acquire() as conn, conn.transaction():
            if (
                await conn.fetchval(self.q["advance_schedule"], name, expected, next_run_at, tick)
                is None
            ):
                return None
            task_id, _ = await self.tasks.insert_task(
                task, idempotency_key=f"schedule:{name}:{tick.isoformat()}", conn=conn
            )
            await conn.execute(self.q["schedule_task_started"], name, task_id)
            return task_id

    async def restart(self, task_id: int, mode: str, at: int | None = None) -> int:
        try:
            return await self.pool.fetchval(self.q["restart"], task_id, mode, at)  # type: ignore[no-any-return]
        except (
            asyncpg.NoDataFoundError,
            asyncpg.ObjectNotInPrerequisiteStateError,
            asyncpg.InvalidParameterValueError,
        ) as exc:
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

    async def queue_depth(
        self,
    ) -> tuple[list[tuple[str, int, int, int, float | None]], tuple[int, float | None] | None]:
        """(queue, queued, running, waiting, oldest_ready seconds) for every busy queue,
        and durable.tasks's (dead row versions, seconds since the last vacuum): what a
        scrape reads, on one pool connection."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(self.q["queue_depth"])
            health = await conn.fetchrow(self.q["table_health"])
        depth = [
            (r["queue"], r["queued"], r["running"], r["waiting"], r["oldest_ready"]) for r in rows
        ]
        return depth, None if health is None else (health["dead"], health["vacuum_age"])

    async def paused_queues(self) -> list[str]:
        return [r["name"] for r in await self.pool.fetch(self.q["paused_queues"])]

    async def unserved_names(self, live_within: float) -> list[Unserved]:
        """Per queue, queued names that no daemon heard from lately can run."""
        return [
            Unserved(r["queue"], tuple(r["names"]), r["tasks"])
            for r in await self.pool.fetch(self.q["unserved_names"], live_within)
        ]

    # -- the test kit (durable.testing) -------------------------------------------------

    async def shift_times(self, by: timedelta) -> None:
        """Move every stored time still ahead of now earlier by ``by``, in one transaction
        (the test kit's moved clock; see clock_shift_statements)."""
        async with self.pool.acquire() as conn, conn.transaction():
            # A row this makes ready is still announced (tasks_notify_ready).
            await conn.execute(self.q["times_only"])
            for row in await conn.fetch(self.q["clock_shift_statements"]):
                await conn.execute(row["statement"], by)

    async def next_time(self) -> timedelta | None:
        """How long until the earliest stored time still ahead (what clock_shift_statements
        would move), or None."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            now: datetime = await conn.fetchval(self.q["now"])
            found = [
                await conn.fetchval(row["statement"])
                for row in await conn.fetch(self.q["clock_next_statements"])
            ]
        times = [t for t in found if t is not None]
        return min(times) - now if times else None

    async def idle_state(
        self, queues: Sequence[str], names: Sequence[str], worker: UUID | None
    ) -> IdleState:
        r = await self.pool.fetchrow(self.q["idle_state"], list(queues), list(names), worker)
        assert r is not None
        return IdleState(
            r["running"], r["ready"], r["timers"], tuple(r["unserved"]), tuple(r["elsewhere"])
        )

    async def expire_leases(self, worker: UUID) -> list[int]:
        """Run out the leases of a worker that will never extend them (a killed one)."""
        return [r["id"] for r in await self.pool.fetch(self.q["expire_leases"], worker)]

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
        vacuum: str = "off",
    ) -> PruneResult | None:
        """Delete the task trees that all finished more than ``older_than`` seconds ago.

        Each statement deletes at most ``batch`` tasks (with their events and signals) and
        commits on its own, so no lock is held for long. Returns None, deleting nothing,
        when another process is pruning (one pruner at a time, by advisory lock).
        ``vacuum``: then VACUUM the task, event and signal tables, 'on' always, 'auto'
        when the server's autovacuum is off, 'off' never (see `PruneResult.vacuumed`).
        """
        async with self.pool.acquire() as conn:

            async def locked(name: str, *args: Any) -> list[asyncpg.Record] | None:
                # One pruner at a time, by a lock each statement's own transaction takes:
                # a session lock would outlive its transaction on a server connection that
                # a transaction pooler (PgBouncer) hands to someone else, and leak there.
                async with conn.transaction():
                    if not await conn.fetchval(self.q["prune_try_lock"], PRUNE_LOCK):
                        return None
                    return await conn.fetch(self.q[name], *args)

            cutoff = await conn.fetchval(self.q["prune_cutoff"], older_than)
            done = PruneResult()
            cursor = 0
            first = True
            while True:
                scanned = await locked("prune_scan", cursor, cutoff, batch)
                if scanned is None:
                    if first:
                        return None
                    return done  # another pruner took over between two statements
                first = False
                scan = scanned[0]
                roots = list(scan["roots"])
                while roots:
                    deleted = await locked("prune_trees", roots, cutoff, batch)
                    if deleted is None:
                        return done
                    row = deleted[0]
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
            workers = await locked("prune_workers", cutoff)
            if workers is None:
                return done
            vacuumed = None
            if vacuum != "off":
                check = await conn.fetchrow(self.q["vacuum_check"], vacuum)
                assert check is not None
                if check["wanted"]:
                    vacuumed = bool(check["allowed"])
                    if vacuumed:
                        # Outside any transaction: VACUUM cannot run in one.
                        await conn.execute(named_queries("maintenance.sql")["vacuum_history"])
            return PruneResult(done.tasks, done.events, done.signals, len(workers), vacuumed)

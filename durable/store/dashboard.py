"""What the dashboard and `durable ls` read: the searchable task list, the last hour's
finished tasks, a task's labels. Statements in sql/dashboard.sql."""

from __future__ import annotations

import json
from typing import Any

from durable.models import Finished, TaskFilter, TaskRow
from durable.store.database import Database, Part
from durable.store.schema import named_queries


class Dashboard(Part):
    """Reads for the dashboard; every statement is answered from an index."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.d = named_queries("dashboard.sql")

    async def search_tasks(
        self,
        f: TaskFilter,
        *,
        before: int | None = None,
        limit: int = 50,
        floor: int | None = None,
    ) -> list[TaskRow]:
        """The newest tasks matching ``f`` with an id below ``before`` and not below
        ``floor``, newest first."""
        rows = await self.pool.fetch(
            self.d["search_tasks"],
            list(f.statuses) if f.statuses else None,
            f.queue,
            f.name,
            f.since,
            f.until,
            f.idempotency_key,
            f.task_id,
            list(f.tags) if f.tags else None,
            json.dumps(f.attributes) if f.attributes else None,
            before,
            limit,
            floor,
        )
        return [
            TaskRow(
                id=r["id"], queue=r["queue"], name=r["name"], kind=r["kind"],
                status=r["status"], attempt=r["attempt"], max_attempts=r["max_attempts"],
                parent_id=r["parent_id"], idempotency_key=r["idempotency_key"],
                created_at=r["created_at"], started_at=r["started_at"],
                finished_at=r["finished_at"], run_at=r["run_at"],
                tags=tuple(r["tags"] or ()),
                attributes=json.loads(r["attributes"]) if r["attributes"] else {},
                error_type=r["error_type"],
            )
            for r in rows
        ]

    async def newest_id_below(self, before: int | None) -> int | None:
        """The newest task id below ``before`` (any when None); None: no such task."""
        value: int | None = await self.pool.fetchval(self.d["newest_id_below"], before)
        return value

    async def finished_last_hour(self) -> list[Finished]:
        return [Finished(**dict(r)) for r in await self.pool.fetch(self.d["finished_last_hour"])]

    async def task_labels(self, task_id: int) -> tuple[tuple[str, ...], dict[str, Any]]:
        row = await self.pool.fetchrow(self.d["task_labels"], task_id)
        if row is None:
            return (), {}
        attributes = json.loads(row["attributes"]) if row["attributes"] else {}
        return tuple(row["tags"] or ()), attributes

    async def children(self, task_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.pool.fetch(self.d["children"], task_id)]

    async def task_progress(self, task_id: int) -> tuple[Any, ...] | None:
        """(status, attempt, branch, events on the branch): changes as a task runs."""
        row = await self.pool.fetchrow(self.d["task_progress"], task_id)
        return tuple(row) if row is not None else None

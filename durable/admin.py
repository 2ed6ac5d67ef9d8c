"""Operator actions on a durable database: listing, bulk retry and cancel, limits,
schedules, pruning, the catalog. What `durable ls`, `queues`, `workers`, `schedules`,
`definitions` and `prune` do,
for programs too.

    async with durable.connect() as client:
        admin = Admin(client.store)
        for w in await admin.workers():
            ...
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from durable.catalog import describe
from durable.models import (
    Event,
    History,
    Progress,
    PruneResult,
    QueueCount,
    QueueLimit,
    ScheduleInfo,
    TaskFilter,
    TaskPage,
    TaskRow,
    TaskSummary,
    Unserved,
    WorkerInfo,
)
from durable.store import Store

STRETCH = 100_000
"""Ids a filtered page of the dashboard's task list reads at most."""


def narrowed(f: TaskFilter) -> bool:
    """Whether ``f`` may skip rows of the id order (anything but an exact lookup or no
    filter at all), so that a page of it could read far down the table."""
    if f.task_id is not None or f.idempotency_key is not None:
        return False
    return any(getattr(f, field.name) is not None for field in dataclasses.fields(f))


def stretch_floor(f: TaskFilter, top: int | None, stretch: int) -> int | None:
    """The lowest id a page below ``top`` reads for filter ``f``: None reads on until the
    page fills (the pk or a unique index answers), else ``stretch`` ids at most."""
    if top is None or not narrowed(f):
        return None
    return max(1, top - stretch)


class Admin:
    """Typed operator actions over a `Store`; every method is one or two statements."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def tasks(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[TaskSummary]:
        """The newest tasks matching the filters, newest first, with their progress."""
        found = await self._store.list_tasks(
            status=status, queue=queue, name=name, since=since, limit=limit
        )
        progress = await self._store.progress_of([t.id for t in found]) if found else {}
        if not progress:
            return found
        return [dataclasses.replace(t, progress=progress.get(t.id)) for t in found]

    async def progress(self, task_id: int) -> Progress | None:
        """The latest progress the task reported, if any."""
        state = await self._store.progress_state(task_id)
        return None if state is None else state[1]

    async def histories(
        self,
        names: Sequence[str],
        *,
        statuses: Sequence[str] | None = None,
        since: datetime | None = None,
        limit: int = 1000,
    ) -> list[History]:
        """The newest workflow runs of ``names`` (``statuses``: any when None) with the event
        log of each one's current branch: what ``durable verify`` replays."""
        return await self._store.histories(names, statuses, since, limit)

    async def recorded(self, task_id: int, branch: int) -> list[Event]:
        """One branch of a workflow's event log as replay reads it (digests, values as
        stored): what ``durable show ID --json`` exports for ``durable verify --file``."""
        return await self._store.load_events(task_id, branch)
    async def search_tasks(
        self, f: TaskFilter, *, before: int | None = None, limit: int = 50
    ) -> list[TaskRow]:
        """The newest tasks matching ``f`` (tags, attributes, key, time range...) with an
        id below ``before`` (the last id of the previous page), newest first."""
        return await self._store.dashboard.search_tasks(f, before=before, limit=limit)

    async def search_page(
        self, f: TaskFilter, *, before: int | None = None, size: int = 50, stretch: int = STRETCH
    ) -> TaskPage:
        """A page of the task list that reads at most ``stretch`` ids below ``before``:
        bounded time whatever the filter matches (the dashboard's list). When the page is
        not full, ``searched`` says which ids were read and ``next_before`` where older
        tasks start, skipping ids already pruned."""
        dashboard = self._store.dashboard
        top = before
        if before is None and narrowed(f):
            newest = await dashboard.newest_id_below(None)
            top = None if newest is None else newest + 1
        floor = stretch_floor(f, top, stretch)
        rows = await dashboard.search_tasks(f, before=before, limit=size + 1, floor=floor)
        if len(rows) > size:
            return TaskPage(rows[:size], rows[size - 1].id)
        if floor is None or top is None:
            return TaskPage(rows, None)
        below = await dashboard.newest_id_below(floor) if floor > 1 else None
        return TaskPage(rows, None if below is None else below + 1, (floor, top - 1))

    async def queue_counts(self) -> list[QueueCount]:
        return await self._store.queue_stats()

    async def queue_limits(self) -> list[QueueLimit]:
        return await self._store.queue_limits()

    async def set_queue_limits(
        self, queue: str, concurrency: int | None, rate: tuple[int, float] | None,
        *, set_concurrency: bool = True, set_rate: bool = True,
    ) -> None:
        """Set a queue's fleet-wide limits; None removes one, and a limit not set
        (``set_concurrency`` or ``set_rate`` false) keeps its value."""
        limit, period = rate if rate is not None else (None, None)
        await self._store.set_queue_limits(
            queue, concurrency, limit, period, set_concurrency=set_concurrency, set_rate=set_rate
        )

    async def pause_queue(self, queue: str) -> None:
        """Stop claiming from ``queue`` on every daemon; running tasks finish."""
        await self._store.set_queue_paused(queue, True)

    async def resume_queue(self, queue: str) -> None:
        """Claim from ``queue`` again (its daemons are woken at once)."""
        await self._store.set_queue_paused(queue, False)

    async def unserved(self, live_within: float) -> list[Unserved]:
        """Per queue, queued names that no daemon heard from within ``live_within``
        seconds has the code for."""
        return await self._store.unserved_names(live_within)

    async def definitions(self, live_within: float) -> list[dict[str, Any]]:
        """The catalog (`durable definitions`): per name its kind, queue, options and
        version, the live daemons serving it, its unfinished tasks per version, and what
        is wrong (see ``durable.catalog.describe``)."""
        return describe(
            await self._store.list_definitions(),
            await self._store.served_definitions(live_within),
            await self._store.in_flight_versions(),
        )

    async def live_versions(self, live_within: float) -> set[tuple[str, str | None]]:
        """The (name, version) pairs a daemon heard from within ``live_within`` serves."""
        return await self._store.live_versions(live_within)

    async def workers(self, limit: int = 100) -> list[WorkerInfo]:
        """Registered daemons, the most recently started first."""
        return await self._store.list_workers(limit)

    async def select(
        self,
        statuses: Sequence[str],
        *,
        queue: str | None = None,
        name: str | None = None,
        since: datetime | None = None,
        skip_cancel_requested: bool = False,
    ) -> list[int]:
        """Ids of the tasks matching the filters, for a bulk action."""
        return await self._store.select_tasks(
            statuses, queue=queue, name=name, since=since,
            skip_cancel_requested=skip_cancel_requested,
        )  # fmt: skip

    async def retry_many(self, ids: Sequence[int], statuses: Sequence[str]) -> int:
        """Retry those of ``ids`` still in one of ``statuses``; how many were."""
        return len(await self._store.retry_many(ids, statuses))

    async def cancel_many(self, ids: Sequence[int]) -> tuple[int, int]:
        """Cancel ``ids`` and their unfinished descendants: (of ``ids`` cancelled now,
        descendants outside ``ids`` reached)."""
        hit = await self._store.cancel(ids)
        mine = set(ids)
        done = sum(1 for task_id, _, finished in hit if task_id in mine and not finished)
        return done, sum(1 for task_id, _, _ in hit if task_id not in mine)

    async def prune_count(self, older_than: float) -> int:
        return await self._store.prune_count(older_than)

    async def prune(
        self,
        older_than: float,
        *,
        batch: int = 1000,
        progress: Callable[[PruneResult], None] | None = None,
        vacuum: str = "off",
    ) -> PruneResult | None:
        """See `Store.prune`: None when another process is pruning."""
        return await self._store.prune(
            older_than, batch=batch, progress=progress, vacuum=vacuum
        )

    async def schedules(self) -> list[ScheduleInfo]:
        return await self._store.list_schedules()

    async def add_schedule(
        self,
        name: str,
        task: str,
        cron: str,
        timezone: str,
        args: Sequence[Any],
        queue: str | None,
        first: datetime,
        source: str = "cli",
        *,
        replace_code: bool = False,
    ) -> bool:
        """Add or replace a schedule; False, writing nothing, when ``name`` is a schedule
        declared in code and ``replace_code`` is not given (daemons would declare it back)."""
        return await self._store.upsert_schedule(
            name, task, cron, timezone, json.dumps(list(args)), "{}", queue, source, first,
            replace_code=replace_code,
        )  # fmt: skip

    async def remove_schedule(self, name: str) -> bool:
        return await self._store.delete_schedule(name)

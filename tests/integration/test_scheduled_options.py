"""A task a cron schedule starts is the definition's task: the same row as ``client.start``
and ``ctx.run`` would write (queue, priority, attempts, timeout, per-key limits)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from durable.registry import Definition, Registry
from durable.scheduler import declare_schedules, run_schedules
from durable.store import Store


async def nightly(region: str = "eu") -> str:
    return region


def by_region(*args: Any, **kwargs: Any) -> str:
    return "nightly-eu"


DEFINITION: Definition[Any, Any] = Definition(
    name="so_nightly", fn=nightly, queue="so_q", priority=7, max_attempts=4, timeout=30.0,
    concurrency_key=by_region, key_limit=2, key_rate=(5, 60.0), schedule="* * * * *",
)


async def test_a_scheduled_task_gets_its_definition_s_priority_and_key_limits(dsn: str) -> None:
    reg = Registry()
    reg.add(DEFINITION)
    now = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)
    store = await Store.open(dsn)
    try:
        await declare_schedules(store, reg, now)
        await run_schedules(store, reg, now + timedelta(minutes=1))
    finally:
        await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "select queue, kind, priority, max_attempts, timeout, concurrency_key, key_limit,"
            " key_rate_limit, key_rate_period from durable.tasks where name = 'so_nightly'"
        )
    finally:
        await conn.close()
    assert row is not None
    assert dict(row) == {
        "queue": "so_q", "kind": "task", "priority": 7, "max_attempts": 4, "timeout": 30.0,
        "concurrency_key": "nightly-eu", "key_limit": 2, "key_rate_limit": 5,
        "key_rate_period": 60.0,
    }

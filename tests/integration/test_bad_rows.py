"""Rows a daemon cannot use (written by hand, or by older code) are logged once and left
out, and everything else goes on being served: no crash, no busy loop."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from structlog.testing import capture_logs

import durable
from durable.registry import registry
from durable.scheduler import run_schedules
from durable.store import Store
from tests.support.helpers import execute, fetchval, run_burst

BAD_SCHEDULES = {
    "br_bad_zone": ("* * * * *", "Mars/Olympus_Mons", None),
    "br_bad_cron": ("not a cron", "UTC", None),
    "br_bad_minute": ("61 * * * *", "UTC", None),
}


@durable.task(queue="br_rows")
async def br_tick() -> str:
    return "tick"


@durable.task(queue="br_other")
async def br_served() -> str:
    return "served"


async def _insert_schedule(dsn: str, name: str, cron: str, zone: str, queue: str | None) -> None:
    await execute(
        dsn,
        "insert into durable.schedules (name, task_name, cron, timezone, queue, next_run_at)"
        " values ($1, 'br_tick', $2, $3, $4, now() - interval '1 minute')",
        name, cron, zone, queue,
    )  # fmt: skip


async def test_bad_schedules_are_skipped_and_logged_once(dsn: str) -> None:
    for name, (cron, zone, queue) in BAD_SCHEDULES.items():
        await _insert_schedule(dsn, name, cron, zone, queue)
    await _insert_schedule(dsn, "br_good", "* * * * *", "UTC", None)
    store = await Store.open(dsn)
    try:
        skipped: dict[str, object] = {}
        now = datetime.now(UTC)
        with capture_logs() as logs:
            first = await run_schedules(store, registry, now, skipped)
            second = await run_schedules(store, registry, now, skipped)
        assert set(skipped) == set(BAD_SCHEDULES)
        # The good one fired once; the next wake is its next tick, not a bad row's past
        # due time (which would have the loop spin).
        assert await fetchval(dsn, "select count(*) from durable.tasks where name = 'br_tick'") == 1
        assert first is not None and first > now and second == first
        said = [e["schedule"] for e in logs if e["event"] == "schedule_skipped"]
        assert sorted(said) == sorted(BAD_SCHEDULES)  # once each, over two passes
        # A row that changes is tried again: fixed, it runs.
        await execute(dsn, "update durable.schedules set timezone = 'UTC' where name = 'br_bad_zone'")
        await run_schedules(store, registry, now, skipped)
        assert "br_bad_zone" not in skipped
        assert await fetchval(dsn, "select count(*) from durable.tasks where name = 'br_tick'") == 2
    finally:
        await store.close()


async def test_a_daemon_serves_on_with_bad_schedules_and_a_rate_of_one_a_year(
    dsn: str,
) -> None:
    for name, (cron, zone, queue) in BAD_SCHEDULES.items():
        await _insert_schedule(dsn, name, cron, zone, queue)
    # The longest period the table takes.
    await execute(
        dsn, "insert into durable.queues (name, rate_limit, rate_period) values ($1, 1, $2)",
        "br_rows", 365 * 86400,
    )  # fmt: skip
    async with durable.connect(dsn) as client:
        limited = [await client.start(br_tick) for _ in range(2)]
        served = await client.start(br_served)
        with capture_logs() as logs:
            await run_burst(dsn, queues="br_rows=2,br_other=2")
        assert await served.result(timeout=5) == "served"
        # The rate holds: one of the two started, the other waits its (very long) turn.
        statuses = sorted([(await client.get(h.id)).status for h in limited])
        assert statuses == ["completed", "queued"]
    assert not [e for e in logs if e["log_level"] in ("error", "critical")
                and e["event"] != "schedule_skipped"]


@pytest.mark.parametrize("period", [365 * 86400 + 1, 8.64e12, float("inf")])
async def test_the_queues_table_refuses_a_rate_period_past_a_year(dsn: str, period: float) -> None:
    """The claim's window start, ``now() - period``, must stay a timestamp."""
    with pytest.raises(asyncpg.CheckViolationError, match="queues_period_check"):
        await execute(
            dsn, "insert into durable.queues (name, rate_limit, rate_period) values ($1, 1, $2)",
            "br_rows", period,
        )  # fmt: skip


async def test_a_rate_period_past_any_timestamp_in_a_claim_means_one_per_forever(
    dsn: str,
) -> None:
    """Rows older than the table's check (or a check dropped by hand) still cannot make a
    claim fail: the claim clamps the period."""
    await execute(dsn, "alter table durable.queues drop constraint queues_period_check")
    await execute(
        dsn, "insert into durable.queues (name, rate_limit, rate_period) values ($1, 1, $2)",
        "br_rows", float("inf"),
    )  # fmt: skip
    async with durable.connect(dsn) as client:
        await client.start(br_tick)
        await client.start(br_tick)
        first = await client.store.claim("br_rows", ["br_tick"], 5, 30, uuid.uuid4())
        again = await client.store.claim("br_rows", ["br_tick"], 5, 30, uuid.uuid4())
        assert (len(first), len(again)) == (1, 0)
        delay = await client.store.claim_delay("br_rows")
        assert delay is not None and delay > timedelta(days=365 * 29).total_seconds()

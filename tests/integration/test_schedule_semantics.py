"""Cron schedules on a real Postgres as cron users expect them: the spring DST gap through
the scheduler, and a name a schedule declared in code holds, met by `durable schedules add`
and by the next daemon to start. The scheduler's clock is passed in."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, MutableMapping
from datetime import UTC, datetime, timedelta
from functools import partial
from subprocess import CompletedProcess
from typing import Any

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

from durable.admin import Admin
from durable.daemon import Daemon
from durable.registry import Definition, Registry
from durable.scheduler import declare_schedules, run_schedules
from durable.store import Store
from tests.support.helpers import durable_cli, execute, settings


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


async def job() -> None:
    return None


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[Store]:
    s = await Store.open(dsn)
    try:
        yield s
    finally:
        await s.close()


async def add(store: Store, name: str, cron: str, zone: str, first: datetime) -> None:
    assert await store.upsert_schedule(name, name, cron, zone, "[]", "{}", "ss_q", "cli", first)


async def ticks(dsn: str, name: str) -> list[datetime]:
    """The ticks that started a task of schedule ``name``, read off the idempotency keys."""
    conn = await asyncpg.connect(dsn)
    try:
        keys = await conn.fetch(
            "select idempotency_key from durable.tasks where name = $1 order by id", name
        )
    finally:
        await conn.close()
    return [datetime.fromisoformat(k[0].removeprefix(f"schedule:{name}:")) for k in keys]


async def follow(store: Store, until: datetime) -> None:
    """Run the scheduler at each next run in turn, as a daemon that never misses one."""
    while (nxt := await store.next_schedule()) is not None and nxt <= until:
        await run_schedules(store, Registry(), nxt)


# -- the spring gap ---------------------------------------------------------------------


async def test_the_scheduler_runs_a_time_the_spring_gap_skips_once_when_the_clock_jumps(
    dsn: str, store: Store
) -> None:
    """New York springs forward on 2027-03-14 at 07:00 UTC (02:00 EST -> 03:00 EDT)."""
    zone = "America/New_York"
    await add(store, "ss_minute", "* * * * *", zone, at(2027, 3, 14, 6, 58))
    await follow(store, at(2027, 3, 14, 7, 2))
    # 01:58 EST, 01:59 EST, then 03:00 EDT one real minute later: nothing to make up.
    minutes = await ticks(dsn, "ss_minute")
    assert minutes == [at(2027, 3, 14, 6, 58) + timedelta(minutes=i) for i in range(5)]
    assert await store.delete_schedule("ss_minute")

    await add(store, "ss_0230", "30 2 * * *", zone, at(2027, 3, 13, 7, 30))
    await add(store, "ss_0300", "0 2,3 * * *", zone, at(2027, 3, 13, 7))
    await follow(store, at(2027, 3, 15, 8))
    # 02:30 EST, then 03:00 EDT (the jump), then 02:30 EDT: once a day.
    assert await ticks(dsn, "ss_0230") == [
        at(2027, 3, 13, 7, 30), at(2027, 3, 14, 7), at(2027, 3, 15, 6, 30)
    ]
    # 02:00 that day is made up at 03:00, which is a tick of its own: one run, not two.
    assert await ticks(dsn, "ss_0300") == [
        at(2027, 3, 13, 7), at(2027, 3, 13, 8), at(2027, 3, 14, 7),
        at(2027, 3, 15, 6), at(2027, 3, 15, 7),
    ]  # fmt: skip


async def test_a_daemon_down_across_the_gap_runs_the_jumped_tick_once(
    dsn: str, store: Store
) -> None:
    await add(store, "ss_down", "30 2 * * *", "Europe/Berlin", at(2027, 3, 27, 1, 30))
    # Back at noon on the day Berlin skipped 02:00-03:00 (01:00 UTC): yesterday's tick is
    # one missed, today's jumped one the latest, and only that one runs.
    for _ in range(2):
        await run_schedules(store, Registry(), at(2027, 3, 28, 10))
    assert await ticks(dsn, "ss_down") == [at(2027, 3, 28, 1)]
    assert await store.next_schedule() == at(2027, 3, 29, 0, 30)


# -- a name declared in code ------------------------------------------------------------


async def cli(dsn: str, *args: str) -> CompletedProcess[str]:
    return await anyio.to_thread.run_sync(partial(durable_cli, *args, dsn=dsn))


async def row(dsn: str, name: str) -> tuple[str, str] | None:
    conn = await asyncpg.connect(dsn)
    try:
        r = await conn.fetchrow(
            "select cron, source from durable.schedules where name = $1", name
        )
    finally:
        await conn.close()
    return None if r is None else (r["cron"], r["source"])


def declared(cron: str) -> Registry:
    reg = Registry()
    reg.add(Definition(name="ss_report", fn=job, queue="ss_q", schedule=cron))
    return reg


def declared_without() -> Registry:
    reg = Registry()
    reg.add(Definition(name="ss_report", fn=job, queue="ss_q"))
    return reg


async def start_daemon(dsn: str, reg: Registry) -> list[MutableMapping[str, Any]]:
    """Start a daemon (which records the code's schedules) and stop it; its logs."""
    daemon = Daemon(settings(), reg, dsn, clock=lambda: at(2000, 1, 1))
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            daemon.stop()
    return logs


def one_line(done: CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


async def test_the_command_line_is_refused_a_name_declared_in_code(
    dsn: str, store: Store
) -> None:
    await start_daemon(dsn, declared("0 3 * * *"))
    assert await row(dsn, "ss_report") == ("0 3 * * *", "code")

    done = await cli(dsn, "schedules", "add", "ss_report", "--cron", "*/5 * * * *",
                     "--queue", "ss_q")  # fmt: skip
    assert done.returncode == 1, done.stderr
    said = one_line(done)
    assert "'ss_report'" in said and "declared in code" in said and "--override-code" in said
    assert await row(dsn, "ss_report") == ("0 3 * * *", "code")
    assert not await Admin(store).add_schedule(
        "ss_report", "ss_report", "*/5 * * * *", "UTC", [], "ss_q", at(2026, 1, 1)
    )
    assert await row(dsn, "ss_report") == ("0 3 * * *", "code")

    # A name of its own is still the command line's to add and to change.
    for cron in ("0 4 * * *", "0 5 * * *"):
        done = await cli(dsn, "schedules", "add", "ss_other", "--cron", cron, "--queue", "ss_q")
        assert done.returncode == 0, done.stderr
    assert await row(dsn, "ss_other") == ("0 5 * * *", "cli")


async def test_an_override_of_a_schedule_in_code_lasts_until_it_is_removed(
    dsn: str, store: Store
) -> None:
    reg = declared("0 3 * * *")
    await start_daemon(dsn, reg)
    done = await cli(dsn, "schedules", "add", "ss_report", "--cron", "*/5 * * * *",
                     "--queue", "ss_q", "--override-code")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert await row(dsn, "ss_report") == ("*/5 * * * *", "cli")

    # The next daemon to start keeps it, and says so; its ticks are the override's.
    logs = await start_daemon(dsn, reg)
    assert await row(dsn, "ss_report") == ("*/5 * * * *", "cli")
    said = [e for e in logs if e["event"] == "schedule_overridden"]
    assert [e["schedule"] for e in said] == ["ss_report"], logs
    await execute(dsn, "update durable.schedules set next_run_at = $1", at(2026, 1, 1, 0, 5))
    await follow(store, at(2026, 1, 1, 0, 10))
    assert await ticks(dsn, "ss_report") == [at(2026, 1, 1, 0, 5), at(2026, 1, 1, 0, 10)]
    # Code that drops schedule= leaves it too: it is the command line's.
    await declare_schedules(store, declared_without(), at(2026, 1, 1, 0, 11))
    assert await row(dsn, "ss_report") == ("*/5 * * * *", "cli")

    # Removed, the code's comes back with the next daemon to start.
    done = await cli(dsn, "schedules", "remove", "ss_report")
    assert done.returncode == 0, done.stderr
    assert await row(dsn, "ss_report") is None
    logs = await start_daemon(dsn, reg)
    assert await row(dsn, "ss_report") == ("0 3 * * *", "code")
    assert not [e for e in logs if e["event"] == "schedule_overridden"]
    listed = await cli(dsn, "schedules", "--json")
    assert [json.loads(line)["source"] for line in listed.stdout.splitlines()] == ["code"]


async def test_a_schedule_the_command_line_added_first_is_kept_when_code_declares_one(
    dsn: str, store: Store
) -> None:
    await Admin(store).add_schedule(
        "ss_report", "ss_report", "0 6 * * *", "UTC", ["x"], "ss_q", at(2026, 1, 1, 6)
    )
    with capture_logs() as logs:
        await declare_schedules(store, declared("0 3 * * *"), at(2026, 1, 1))
        await declare_schedules(store, declared("0 3 * * *"), at(2026, 1, 1))
    assert await row(dsn, "ss_report") == ("0 6 * * *", "cli")
    (info,) = await store.list_schedules()
    assert info.args == ["x"] and info.next_run_at == at(2026, 1, 1, 6)
    assert [e["event"] for e in logs].count("schedule_overridden") == 2

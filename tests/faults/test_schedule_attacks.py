"""Attacks on cron schedules: DST transitions, many daemons at one tick, a long outage, code
that changes or drops a schedule while old and new daemons run, bad input at the point of
entry, a command line whose clock is off, odd names. Real Postgres; the scheduler's clock is
passed in (as the daemon's and the test kit's are), and races are forced with row locks."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from durable.cron import CronError, parse
from durable.registry import Definition, Registry
from durable.scheduler import declare_schedules, run_schedules
from durable.store import Store
from durable.validation import InvalidValue
from tests.support.helpers import durable_cli, execute, fetchval, kill, spawn_daemon, wait_for

LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), Path("/nonexistent"))

QUEUE = "sa_skew"
"""The queue of tests/apps/schedule_attacks_app.py, which this module must not import: its
scheduled task would join the registry every in-process daemon of the suite serves, and
fire into their databases each minute."""


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
    await store.upsert_schedule(name, name, cron, zone, "[]", "{}", "sa_q", "cli", first)


async def ticks(dsn: str, name: str) -> list[datetime]:
    """The ticks that started a task of schedule ``name``, read off the idempotency keys."""
    conn = await asyncpg.connect(dsn)
    try:
        keys = await conn.fetch(
            "select idempotency_key from durable.tasks where name = $1 order by id", name
        )
    finally:
        await conn.close()
    prefix = f"schedule:{name}:"
    return [datetime.fromisoformat(k[0].removeprefix(prefix)) for k in keys]


async def follow(store: Store, reg: Registry, until: datetime) -> None:
    """Run the scheduler at each next run in turn, as a daemon that never misses one."""
    while True:
        nxt = await store.next_schedule()
        if nxt is None or nxt > until:
            return
        await run_schedules(store, reg, nxt)


# -- daylight saving time -------------------------------------------------------------


async def test_each_real_hour_ticks_once_across_both_dst_changes(
    dsn: str, store: Store
) -> None:
    """New York falls back on 2026-11-01 (01:00-01:59 twice) and springs forward on
    2027-03-14 (02:00-02:59 never). An hourly schedule ticks every real hour, both passes
    of the repeated hour included; a daily 01:30 runs once; a daily 02:30 runs at 03:00
    on the day it does not exist."""
    zone = "America/New_York"
    await add(store, "sa_hourly", "0 * * * *", zone, at(2026, 11, 1, 4))
    await add(store, "sa_quarter", "*/15 * * * *", zone, at(2026, 11, 1, 5, 45))
    await add(store, "sa_0130", "30 1 * * *", zone, at(2026, 10, 31, 5, 30))
    await follow(store, Registry(), at(2026, 11, 2, 6, 30))
    assert await ticks(dsn, "sa_hourly") == [at(2026, 11, 1, h) for h in range(4, 24)] + [
        at(2026, 11, 2, h) for h in range(0, 7)
    ]
    quarter = await ticks(dsn, "sa_quarter")
    gaps = {b - a for a, b in pairwise(quarter)}
    assert gaps == {timedelta(minutes=15)}, quarter[:12]
    assert at(2026, 11, 1, 6, 15) in quarter  # 01:15 EST, the repeated hour's second pass
    assert await ticks(dsn, "sa_0130") == [
        at(2026, 10, 31, 5, 30), at(2026, 11, 1, 5, 30), at(2026, 11, 2, 6, 30)
    ]

    await execute(dsn, "delete from durable.schedules")
    await add(store, "sa_spring", "0 * * * *", zone, at(2027, 3, 14, 5))
    await add(store, "sa_0230", "30 2 * * *", zone, at(2027, 3, 13, 7, 30))
    await follow(store, Registry(), at(2027, 3, 15, 8))
    hourly = await ticks(dsn, "sa_spring")
    assert hourly == [at(2027, 3, 14, 5) + timedelta(hours=h) for h in range(len(hourly))]
    assert hourly[-1] == at(2027, 3, 15, 8)
    # 02:30 does not exist on 03-14: that day's run is at 03:00 EDT, when the clock jumped.
    assert await ticks(dsn, "sa_0230") == [
        at(2027, 3, 13, 7, 30), at(2027, 3, 14, 7), at(2027, 3, 15, 6, 30)
    ]


def test_a_catch_up_in_the_repeated_hour_picks_the_latest_real_tick() -> None:
    c = parse("*/15 * * * *", "America/New_York")
    # 01:20 EST (second pass): the latest tick is 01:15 EST, not 01:15 EDT an hour before.
    assert c.previous_at_or_before(at(2026, 11, 1, 6, 20)) == at(2026, 11, 1, 6, 15)
    assert c.next_after(at(2026, 11, 1, 5, 50)) == at(2026, 11, 1, 6, 0)
    assert parse("15 1 * * *", "America/New_York").previous_at_or_before(
        at(2026, 11, 1, 6, 20)
    ) == at(2026, 11, 1, 5, 15)


# -- many daemons at one tick ---------------------------------------------------------


async def _waiting_on_locks(dsn: str, n: int) -> bool:
    count = await fetchval(
        dsn,
        "select count(*) from pg_stat_activity where datname = current_database()"
        " and wait_event_type = 'Lock'",
    )
    return bool(count >= n)


async def test_four_daemons_released_together_start_each_tick_once(dsn: str) -> None:
    """Every daemon reads the due row, then all meet the compare-and-set at once (held
    back by a row lock until all four wait on it), on a tick, a long outage's catch-up
    and while another daemon redeclares the schedule."""
    stores = [await Store.open(dsn) for _ in range(4)]
    reg = Registry()
    reg.add(Definition(name="sa_race", fn=job, queue="sa_q", schedule="* * * * *"))
    try:
        await declare_schedules(stores[0], reg, at(2026, 1, 1) + timedelta(seconds=30))
        for now in (at(2026, 1, 1, 0, 1), at(2026, 1, 1, 0, 2), at(2026, 1, 9, 17, 43)):
            gate = await asyncpg.connect(dsn)
            try:
                tx = gate.transaction()
                await tx.start()
                await gate.execute("select 1 from durable.schedules for update")
                async with anyio.create_task_group() as tg:
                    for s in stores:
                        tg.start_soon(run_schedules, s, reg, now + timedelta(seconds=5))
                    # Redeclared by a restarting daemon with the same code: no effect.
                    tg.start_soon(declare_schedules, stores[0], reg, now)
                    await wait_for(lambda: _waiting_on_locks(dsn, 5), timeout=20)
                    await tx.rollback()
            finally:
                await gate.close()
        assert await ticks(dsn, "sa_race") == [
            at(2026, 1, 1, 0, 1), at(2026, 1, 1, 0, 2), at(2026, 1, 9, 17, 43)
        ]
        # After the outage, the next run is the next tick, not one of the missed ones.
        assert await stores[0].next_schedule() == at(2026, 1, 9, 17, 44)
    finally:
        for s in stores:
            await s.close()


async def test_a_daemon_down_for_years_runs_the_latest_tick_once(dsn: str, store: Store) -> None:
    await add(store, "sa_outage", "*/7 * * * *", "Europe/Paris", at(2026, 1, 1))
    now = at(2029, 7, 4, 12, 3)
    await run_schedules(store, Registry(), now)
    await run_schedules(store, Registry(), now)
    # */7 runs at :00, :07 ... :56 and wraps to :00: 14:00 in Paris (summer) was the last.
    assert await ticks(dsn, "sa_outage") == [at(2029, 7, 4, 12, 0)]
    assert await store.next_schedule() == at(2029, 7, 4, 12, 7)


# -- code that changes or drops a schedule ----------------------------------------------


def registry_with(**schedules: str | None) -> Registry:
    reg = Registry()
    for name, cron in schedules.items():
        reg.add(Definition(name=name, fn=job, queue="sa_q", schedule=cron))
    return reg


async def test_a_schedule_taken_out_of_code_stops(dsn: str, store: Store) -> None:
    old = registry_with(sa_report="0 3 * * *", sa_other=None)
    await declare_schedules(store, old, at(2026, 1, 1))
    # A schedule added from the command line for a task that declares none stays.
    await store.upsert_schedule(
        "sa_other", "sa_other", "0 4 * * *", "UTC", "[]", "{}", None, "cli", at(2026, 1, 1, 4)
    )
    new = registry_with(sa_report=None, sa_other=None)
    await declare_schedules(store, new, at(2026, 1, 1, 1))
    await run_schedules(store, new, at(2026, 1, 2))
    assert await ticks(dsn, "sa_report") == []
    assert await ticks(dsn, "sa_other") == [at(2026, 1, 1, 4)]
    names = [s.name for s in await store.list_schedules()]
    assert names == ["sa_other"]


async def test_old_and_new_code_with_a_changed_schedule_never_repeat_a_tick(
    dsn: str, store: Store
) -> None:
    old = registry_with(sa_sync="0 * * * *")
    new = registry_with(sa_sync="30 * * * *")
    await declare_schedules(store, old, at(2026, 5, 1, 12, 10))
    await run_schedules(store, old, at(2026, 5, 1, 13))  # 13:00
    await declare_schedules(store, new, at(2026, 5, 1, 13, 10))  # a new daemon starts
    assert await store.next_schedule() == at(2026, 5, 1, 13, 30)
    await run_schedules(store, old, at(2026, 5, 1, 13, 30))  # the old one fires the row's
    await declare_schedules(store, old, at(2026, 5, 1, 13, 40))  # an old one restarts
    await run_schedules(store, new, at(2026, 5, 1, 14))
    await declare_schedules(store, new, at(2026, 5, 1, 14, 5))
    await declare_schedules(store, new, at(2026, 5, 1, 14, 6))  # unchanged: kept
    await run_schedules(store, old, at(2026, 5, 1, 14, 30))
    assert await ticks(dsn, "sa_sync") == [
        at(2026, 5, 1, 13), at(2026, 5, 1, 13, 30), at(2026, 5, 1, 14), at(2026, 5, 1, 14, 30)
    ]
    # A changed time zone alone moves the next run too.
    await declare_schedules(
        store,
        _one(Definition(name="sa_sync", fn=job, queue="sa_q", schedule="30 * * * *",
                        timezone="Asia/Kolkata")),
        at(2026, 5, 1, 14, 31),
    )  # fmt: skip
    assert await store.next_schedule() == at(2026, 5, 1, 15)  # 20:30 in Kolkata


def _one(d: Definition[Any, Any]) -> Registry:
    reg = Registry()
    reg.add(d)
    return reg


# -- bad input at the point of entry -------------------------------------------------------


@pytest.mark.parametrize(
    "expr, zone, words",
    [
        ("² * * * *", "UTC", "minute"),  # str.isdigit() says yes, int() says no
        ("*/² * * * *", "UTC", "minute step"),
        ("0 0 30 2 *", "UTC", "day of month '30' never falls in month '2'"),
        ("0 0 31 4,6,9,11 *", "UTC", "never falls"),
        ("0 0 L * *", "UTC", "day of month"),
        ("0 0 * * *", None, "time zone"),
    ],
)
def test_bad_schedules_are_refused_at_the_decorator_in_one_line(
    expr: str, zone: Any, words: str
) -> None:
    with pytest.raises(CronError) as caught:

        @durable.task(name=f"sa_bad_{abs(hash(expr))}", schedule=expr, timezone=zone)
        async def bad() -> None: ...

    message = str(caught.value)
    assert words in message and "bad" in message and "\n" not in message, message


def test_dates_every_month_lacks_some_years_are_fine() -> None:
    assert parse("0 0 29 2 *").next_after(at(2096, 3, 1)) == at(2104, 2, 29)  # 2100: none
    assert parse("0 0 30 2 mon").next_after(at(2026, 1, 1)) == at(2026, 2, 2)  # either day
    assert parse("0 0 31 * *").next_after(at(2026, 4, 1)) == at(2026, 5, 31)


async def test_bad_schedules_are_refused_by_the_store_and_the_command_line(
    dsn: str, store: Store
) -> None:
    for expr in ("0 0 30 2 *", "² * * * *"):
        with pytest.raises(InvalidValue, match="cron"):
            await add(store, "sa_never", expr, "UTC", at(2026, 1, 1))
        done = await anyio.to_thread.run_sync(partial(
            durable_cli, "schedules", "add", "sa_never", "--cron", expr, "--queue", "q", dsn=dsn
        ))  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "cron" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert await store.list_schedules() == []


# -- clocks -----------------------------------------------------------------------


@pytest.mark.skipif(
    not LIBFAKETIME.exists() and not os.environ.get("CI"),
    reason="libfaketime is not installed (Debian package faketime)",
)
@pytest.mark.parametrize("skew", ["+1h", "-1h"])
async def test_the_command_line_adds_a_schedule_on_the_database_clock(
    dsn: str, skew: str
) -> None:
    before: datetime = await fetchval(dsn, "select clock_timestamp()")
    done = await anyio.to_thread.run_sync(
        lambda: durable_cli(
            "schedules", "add", "sa_skew", "--cron", "* * * * *", "--queue", "q", dsn=dsn,
            LD_PRELOAD=str(LIBFAKETIME), FAKETIME=skew, FAKETIME_DONT_FAKE_MONOTONIC="1",
        )
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    after: datetime = await fetchval(dsn, "select clock_timestamp()")
    first: datetime = await fetchval(dsn, "select next_run_at from durable.schedules")
    # The next minute by the database (give or take the offset's measure), not this machine's.
    assert before - timedelta(seconds=2) < first <= after + timedelta(seconds=62), (before, first)


@pytest.mark.slow
@pytest.mark.skipif(
    not LIBFAKETIME.exists() and not os.environ.get("CI"),
    reason="libfaketime is not installed (Debian package faketime)",
)
@pytest.mark.parametrize("skew", ["+1h", "-1h"])
async def test_a_daemon_an_hour_off_declares_and_fires_on_the_database_clock(
    dsn: str, tmp_path: Path, skew: str
) -> None:
    proc = spawn_daemon(
        dsn, "tests.apps.schedule_attacks_app", log=tmp_path / "daemon.log",
        DURABLE_QUEUES=QUEUE, LD_PRELOAD=str(LIBFAKETIME), FAKETIME=skew,
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )  # fmt: skip
    try:
        ahead = await wait_for(lambda: fetchval(
            dsn, "select extract(epoch from next_run_at - now()) from durable.schedules"
            " where name = 'sa_every_minute'"), timeout=30)  # fmt: skip
        assert 0 < ahead <= 61, ahead  # the next minute by the database's clock
    finally:
        kill(proc)
        await anyio.to_thread.run_sync(proc.wait)


# -- odd names ----------------------------------------------------------------------


async def test_odd_schedule_names_fire_and_list(dsn: str, store: Store) -> None:
    names = ["sa:odd:2026-01-01T00:00:00+00:00", "sa é \"quoted\" 'x' ;--", "s" * 200]
    for name in names:
        await store.upsert_schedule(
            name, "sa_task", "* * * * *", "UTC", '["a"]', "{}", "sa_q", "cli", at(2026, 1, 1)
        )
    await run_schedules(store, Registry(), at(2026, 1, 1, 0, 0))
    conn = await asyncpg.connect(dsn)
    try:
        keys = sorted(r[0] for r in await conn.fetch(
            "select idempotency_key from durable.tasks where name = 'sa_task'"))  # fmt: skip
    finally:
        await conn.close()
    assert keys == sorted(f"schedule:{n}:2026-01-01T00:00:00+00:00" for n in names)
    with pytest.raises(InvalidValue):
        await store.upsert_schedule(
            "s" * 201, "sa_task", "* * * * *", "UTC", "[]", "{}", None, "cli", at(2026, 1, 1)
        )
    listed = await anyio.to_thread.run_sync(lambda: durable_cli("schedules", "--json", dsn=dsn))
    assert listed.returncode == 0, listed.stderr
    shown = [json.loads(line)["name"] for line in listed.stdout.splitlines() if line.strip()]
    assert sorted(shown) == sorted(names)

"""Fleet-wide flow control: global and per-key concurrency, rate limits, cron schedules."""

from __future__ import annotations

import itertools
import subprocess
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from durable.daemon import Daemon
from durable.registry import Definition, Registry, registry
from durable.store import Store
from tests.apps import flow_app
from tests.support.helpers import (
    durable_cli,
    execute,
    fetchval,
    running_daemon,
    settings,
    spawn_daemon,
    wait_for,
)


@pytest.mark.timeout(120)
async def test_global_limit_holds_across_four_daemon_processes(dsn: str, tmp_path: Path) -> None:
    await execute(
        dsn,
        "create table flow_log (i int, pid int, started timestamptz, ended timestamptz,"
        " running bigint)",
    )
    store = await Store.open(dsn)
    try:
        await store.set_queue_limits("flow_limited", 3, None, None)
    finally:
        await store.close()
    async with durable.connect(dsn) as client:
        await client.start_many(flow_app.flow_limited, [[i] for i in range(300)])
    procs: list[subprocess.Popen[bytes]] = [
        spawn_daemon(
            dsn, "tests.apps.flow_app", log=tmp_path / f"d{n}.log", DURABLE_QUEUES="flow_limited=10"
        )
        for n in range(4)
    ]
    try:
        await wait_for(lambda: fetchval(dsn, "select count(*) = 300 from flow_log"), timeout=90)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("select i, pid, started, ended, running from flow_log")
        done = await conn.fetchval(
            "select count(*) from durable.tasks where queue = 'flow_limited' and status = 'completed'"
        )
    finally:
        await conn.close()
    assert done == 300
    assert max(r["running"] for r in rows) <= 3, "the table showed more than 3 running"
    events = sorted(
        [(r["started"], 1) for r in rows] + [(r["ended"], -1) for r in rows],
        key=lambda e: (e[0], e[1]),
    )
    overlap = max(itertools.accumulate(delta for _, delta in events))
    assert overlap <= 3, f"the task bodies saw {overlap} running at once"
    assert len({r["pid"] for r in rows}) > 1, "one daemon did all the work"


async def test_limit_change_takes_effect_without_restart(dsn: str) -> None:
    store = await Store.open(dsn)
    try:
        await store.set_queue_limits("flow_limited", 1, None, None)
        await execute(
            dsn,
            "create table flow_log (i int, pid int, started timestamptz, ended timestamptz,"
            " running bigint)",
        )
        gate = anyio.Event()
        reg = Registry()

        async def blocked(i: int) -> None:
            await gate.wait()

        reg.add(Definition(name="flow_blocked", fn=blocked, queue="flow_limited"))
        async with durable.connect(dsn) as client:
            await client.start_many("flow_blocked", [[i] for i in range(6)], queue="flow_limited")
            async with running_daemon(dsn, reg=reg, queues="flow_limited=10") as daemon:
                running = "select count(*) from durable.tasks where status = 'running'"
                await wait_for(lambda: fetchval(dsn, f"select ({running}) = 1"))
                worker = daemon.workers["flow_limited"]
                polls = sum(worker.wakeups.values())
                await wait_for(lambda: _async(sum(worker.wakeups.values()) >= polls + 2))
                assert await fetchval(dsn, running) == 1
                await store.set_queue_limits("flow_limited", 3, None, None)
                await wait_for(lambda: fetchval(dsn, f"select ({running}) = 3"))
                gate.set()
                await wait_for(
                    lambda: fetchval(
                        dsn, "select count(*) = 6 from durable.tasks where status = 'completed'"
                    )
                )
    finally:
        await store.close()


async def _async(value: Any) -> Any:
    return value


async def test_per_key_limit_one_task_per_key_and_keys_in_parallel(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handles = await client.start_many(
            flow_app.flow_keyed, [[f"customer-{k}", i] for i in range(10) for k in range(50)]
        )
        async with (
            running_daemon(dsn, queues="flow_keyed=20"),
            running_daemon(dsn, queues="flow_keyed=20"),
        ):
            results = [await h.result(timeout=60) for h in handles]
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in results:
        by_key[r["customer"]].append((r["started"], r["ended"]))
    assert len(by_key) == 50 and all(len(v) == 10 for v in by_key.values())
    for key, spans in by_key.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"two tasks of {key} ran at once"
    # Keys progress in parallel: more than one key was running at some moment.
    events = sorted(
        [(s, 1) for v in by_key.values() for s, _ in v]
        + [(e, -1) for v in by_key.values() for _, e in v]
    )
    assert max(itertools.accumulate(d for _, d in events)) > 1


async def test_saturated_key_does_not_block_other_keys(dsn: str) -> None:
    gate = anyio.Event()
    reg = Registry()

    async def hold(customer: str) -> str:
        if customer == "busy":
            await gate.wait()
        return customer

    reg.add(
        Definition(
            name="flow_hold",
            fn=hold,
            queue="flow_keyed",
            concurrency_key=lambda customer: customer,
            key_limit=1,
        )
    )
    d = reg.get("flow_hold")
    assert d is not None
    async with durable.connect(dsn) as client:
        busy = [await client.start(d, "busy") for _ in range(20)]  # ahead in the queue
        other = await client.start(d, "other")
        async with running_daemon(dsn, reg=reg, queues="flow_keyed=10"):
            assert await other.result(timeout=20) == "other"
            assert (
                await fetchval(dsn, "select count(*) from durable.tasks where status = 'running'")
                == 1
            )
            gate.set()
            for h in busy:
                assert await h.result(timeout=20) == "busy"


@pytest.mark.timeout(60)
async def test_rate_limit_across_two_daemons(dsn: str) -> None:
    store = await Store.open(dsn)
    try:
        await store.set_queue_limits("flow_rated", None, 20, 1.0)
    finally:
        await store.close()
    async with durable.connect(dsn) as client:
        handles = await client.start_many(flow_app.flow_rated, [[i] for i in range(150)])
        async with (
            running_daemon(dsn, queues="flow_rated=50"),
            running_daemon(dsn, queues="flow_rated=50"),
        ):
            for h in handles:
                await h.result(timeout=40)
    conn = await asyncpg.connect(dsn)
    try:
        starts = [
            r[0]
            for r in await conn.fetch(
                "select started_at from durable.tasks where queue = 'flow_rated' order by 1"
            )
        ]
    finally:
        await conn.close()
    assert len(starts) == 150
    window = timedelta(seconds=5)
    last = starts[-1] - window
    windows = [s for s in starts if s <= last]
    assert windows, "the run was shorter than one window"
    for begin in windows:
        n = sum(1 for s in starts if begin <= s < begin + window)
        assert 90 <= n <= 110, f"{n} starts in the 5 s from {begin}"
    # Never more than 20 in any one-second window.
    for begin in starts:
        assert sum(1 for s in starts if begin <= s < begin + timedelta(seconds=1)) <= 20


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_schedule_runs_once_per_tick_with_three_daemons(dsn: str) -> None:
    clock = FakeClock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC))
    store = await Store.open(dsn)
    try:
        await store.upsert_schedule(
            "every-minute",
            "flow_tick",
            "* * * * *",
            "UTC",
            "[]",
            "{}",
            None,
            "cli",
            datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        )
    finally:
        await store.close()
    daemons = [
        Daemon(settings(queues="flow_ticks=5"), registry, dsn, clock=clock) for _ in range(3)
    ]
    ticks = "select count(*) from durable.tasks where name = 'flow_tick'"
    async with anyio.create_task_group() as tg:
        for d in daemons:
            await tg.start(d.run)
        for minute in range(1, 6):
            clock.now += timedelta(minutes=1)
            async with anyio.create_task_group() as burst:
                for d in daemons:
                    burst.start_soon(d.run_schedules)
            assert await fetchval(dsn, ticks) == minute
        # Ten minutes with no daemon looking: the latest missed tick runs once.
        clock.now += timedelta(minutes=10)
        async with anyio.create_task_group() as burst:
            for d in daemons:
                burst.start_soon(d.run_schedules)
        assert await fetchval(dsn, ticks) == 6
        await wait_for(
            lambda: fetchval(
                dsn,
                "select count(*) = 6 from durable.tasks where name = 'flow_tick'"
                " and status = 'completed'",
            )
        )
        for d in daemons:
            d.stop()
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "select next_run_at, last_run_at from durable.schedules where name = 'every-minute'"
        )
        keys = await conn.fetch(
            "select idempotency_key from durable.tasks where name = 'flow_tick'"
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["last_run_at"] == datetime(2026, 1, 1, 0, 15, tzinfo=UTC)
    assert row["next_run_at"] == datetime(2026, 1, 1, 0, 16, tzinfo=UTC)
    assert len({k[0] for k in keys}) == 6


async def test_schedule_declared_in_code_is_recorded(dsn: str) -> None:
    reg = Registry()

    async def report() -> None:
        return None

    reg.add(
        Definition(name="flow_report", fn=report, schedule="0 3 * * *", timezone="Europe/Paris")
    )
    clock = FakeClock(datetime(2026, 6, 1, 12, 0, tzinfo=UTC))
    daemon = Daemon(settings(), reg, dsn, clock=clock)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        daemon.stop()
    done = durable_cli("schedules", "--json", dsn=dsn)
    assert done.returncode == 0, done.stderr
    assert '"name": "flow_report"' in done.stdout
    assert '"next_run_at": "2026-06-02 01:00:00+00:00"' in done.stdout  # 03:00 in Paris, summer


@pytest.mark.parametrize(
    "args, message",
    [
        (["--concurrency", "0"], "--concurrency: expected a whole number"),
        (["--concurrency=-3"], "--concurrency: expected a whole number"),
        (["--concurrency", "many"], "--concurrency: expected a whole number"),
        (["--rate", "5"], "--rate: expected N/PERIOD"),
        (["--rate", "0/1s"], "--rate: expected N/PERIOD"),
        (["--rate", "5/0s"], "--rate: the period"),
        (["--rate", "5/soon"], "--rate: the period"),
    ],
)
def test_bad_limits_are_rejected_and_change_nothing(
    dsn: str, args: list[str], message: str
) -> None:
    ok = durable_cli("queues", "set", "flow_q", "--concurrency", "4", dsn=dsn)
    assert ok.returncode == 0, ok.stderr
    bad = durable_cli("queues", "set", "flow_q", *args, dsn=dsn)
    assert bad.returncode == 2
    assert message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    shown = durable_cli("queues", "--json", dsn=dsn)
    assert '"queue": "flow_q"' in shown.stdout and '"limit": 4' in shown.stdout


def test_malformed_cron_is_rejected(dsn: str) -> None:
    for expr in ("61 * * * *", "* * *", "*/0 * * * *", "* * 32 * *", "* * * * mon-xyz"):
        bad = durable_cli("schedules", "add", "nightly", "--cron", expr, dsn=dsn)
        assert bad.returncode == 2, expr
        assert "cron" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    tz = durable_cli(
        "schedules", "add", "nightly", "--cron", "0 3 * * *", "--timezone", "Mars/Olympus", dsn=dsn
    )
    assert tz.returncode == 2 and "time zone" in tz.stderr
    listed = durable_cli("schedules", "--json", dsn=dsn)
    assert listed.returncode == 0 and listed.stdout.strip() == ""


async def test_database_rejects_bad_limits(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for values in (
            "('q', 0, null, null)",
            "('q', null, 5, null)",
            "('q', null, 0, 1)",
            "('q', null, 5, 0)",
        ):
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(
                    f"insert into durable.queues (name, concurrency, rate_limit, rate_period)"
                    f" values {values}"
                )
    finally:
        await conn.close()


async def test_key_rate_limit_spaces_one_keys_starts(dsn: str) -> None:
    reg = Registry()

    async def ping(customer: str, i: int) -> int:
        return i

    reg.add(
        Definition(
            name="flow_key_rated",
            fn=ping,
            queue="flow_keyed",
            concurrency_key=lambda customer, i: customer,
            key_rate=(3, 1.0),
        )
    )
    d = reg.get("flow_key_rated")
    assert d is not None
    async with durable.connect(dsn) as client:
        slow = [await client.start(d, "acme", i) for i in range(7)]
        other = [await client.start(d, f"other-{i}", i) for i in range(5)]
        async with running_daemon(dsn, reg=reg, queues="flow_keyed=20"):
            for h in slow + other:
                await h.result(timeout=30)
    conn = await asyncpg.connect(dsn)
    try:
        acme = [
            r[0]
            for r in await conn.fetch(
                "select started_at from durable.tasks where concurrency_key = 'acme' order by 1"
            )
        ]
        others = [
            r[0]
            for r in await conn.fetch(
                "select started_at from durable.tasks where concurrency_key like 'other-%'"
            )
        ]
    finally:
        await conn.close()
    for begin in acme:
        assert sum(1 for s in acme if begin <= s < begin + timedelta(seconds=1)) <= 3
    assert acme[-1] - acme[0] >= timedelta(seconds=2)  # 7 starts at 3 per second
    # Other keys were not held back behind the rate-limited one.
    assert max(others) < acme[-1]


async def test_a_slot_freed_under_a_limit_is_announced_and_one_without_is_not(dsn: str) -> None:
    # Claimers of a queue under a fleet-wide limit, and of keyed tasks, wait for a slot to
    # come free: the update trigger announces those queues on `durable_ready`, once each,
    # whatever ends the task, and stays quiet for a queue with no limit.
    heard: list[str] = []
    listen = await asyncpg.connect(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await listen.add_listener("durable_ready", lambda *a: heard.append(a[3]))
        await conn.execute(
            "insert into durable.queues (name, concurrency) values ('lim', 2), ('open', null)"
        )
        await conn.execute(
            """
            insert into durable.tasks (queue, name, status, claim_token, lease_until,
                                       concurrency_key)
            select q, 'n', 'running', 1, now() + interval '1 hour', k
              from (values ('lim', null), ('lim', null), ('open', null), ('free', null),
                           ('keyed', 'k1')) as v(q, k)
            """
        )
        await conn.execute(
            "update durable.tasks set status = case when queue = 'open' then 'failed'"
            " else 'completed' end, claim_token = null, lease_until = null"
        )
        await conn.execute("select pg_notify('durable_ready', 'end-of-test')")

        async def ended() -> bool:
            return "end-of-test" in heard

        await wait_for(ended, timeout=10)
        assert sorted(heard) == ["end-of-test", "keyed", "lim"]
    finally:
        await conn.close()
        await listen.close()

"""Fleet-wide limits under SIGKILL: a queue's concurrency limit, a key's limit shared by two
queues that different daemons serve, and a queue's rate, while daemons die mid-task and
their tasks come back when their leases run out (DURABLE_LEASE=2).

Every task body records its run in the database on the server's clock
(tests/apps/limit_kills_app.py); a killed daemon's runs are closed at the instant the test
saw the process gone. Kills wait on states (a run open in a live daemon), never on sleeps.
Task names and queues start with ``lk_``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import durable
from tests.apps import limit_kills_app as app
from tests.support.helpers import ROOT, daemon_env, durable_cli, execute, kill, wait_for

APP = "tests.apps.limit_kills_app"


class Fleet:
    """Subprocess daemons, each with its own queues; every one killed when the test ends."""

    def __init__(self, dsn: str, logs: Path, probe: asyncpg.Connection) -> None:
        self.dsn = dsn
        self.logs = logs
        self.probe = probe
        self.procs: list[subprocess.Popen[bytes]] = []
        self.serves: dict[int, str] = {}
        """Each daemon's DURABLE_QUEUES, by pid."""
        self.killed: dict[int, datetime] = {}
        """Each killed daemon's pid, and the server's clock once it was seen gone."""

    def spawn(self, queues: str) -> subprocess.Popen[bytes]:
        env = {
            "DURABLE_LEASE": f"{app.LEASE:g}",
            "DURABLE_POLL_INTERVAL": "0.5",
            "DURABLE_SHUTDOWN_GRACE": "0",
            "DURABLE_QUEUES": queues,
        }
        with open(self.logs / f"daemon{len(self.procs)}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "durable", "run", "--app", APP],
                cwd=ROOT, env=daemon_env(self.dsn, **env), stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs.append(proc)
        self.serves[proc.pid] = queues
        return proc

    async def kill_one_mid_task(self, queues: tuple[str, ...]) -> int:
        """SIGKILL a live daemon while a body of one of ``queues`` runs in it; its pid."""
        alive = {p.pid: p for p in self.procs if p.poll() is None}

        async def victim() -> int | None:
            pids = await self.probe.fetch(
                "select distinct pid from lk_runs where ended is null and queue = any($1)",
                list(queues),
            )
            hit = [r["pid"] for r in pids if r["pid"] in alive]
            return hit[0] if hit else None

        pid: int = await wait_for(victim, timeout=30)
        proc = alive[pid]
        kill(proc)
        proc.wait(timeout=30)
        self.killed[pid] = await self.probe.fetchval("select clock_timestamp()")
        return pid

    def close(self) -> None:
        for proc in self.procs:
            kill(proc)
            proc.wait(timeout=30)


@asynccontextmanager
async def fleet_of(dsn: str, logs: Path) -> AsyncIterator[Fleet]:
    await execute(dsn, app.TABLES)
    probe = await asyncpg.connect(dsn)
    fleet = Fleet(dsn, logs, probe)
    try:
        yield fleet
    finally:
        fleet.close()
        await probe.close()


async def most_at_once(fleet: Fleet, queues: tuple[str, ...]) -> int:
    """The most bodies of ``queues`` that ran at one instant. A killed daemon's runs end
    when it was seen gone; a run that never ended anywhere else counts to the end."""
    rows = await fleet.probe.fetch(
        "select pid, started, ended from lk_runs where queue = any($1)", list(queues)
    )
    never = datetime.max.replace(tzinfo=rows[0]["started"].tzinfo) if rows else None
    edges: list[tuple[Any, int]] = []
    for r in rows:
        end = r["ended"] or fleet.killed.get(r["pid"], never)
        edges += [(r["started"], 1), (end, -1)]
    edges.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    live = most = 0
    for _, step in edges:
        live += step
        most = max(most, live)
    return most


async def check_runs(fleet: Fleet, queues: tuple[str, ...], kills: int) -> None:
    """Each kill cut a run short; every task ran once per claim at most, and its attempts
    count its claims (a claim lost with its daemon is retried, as its policy allows)."""
    cut = await fleet.probe.fetchval(
        "select count(*) from lk_runs where ended is null and pid = any($1) and queue = any($2)",
        list(fleet.killed), list(queues),
    )  # fmt: skip
    assert cut >= kills
    stray = await fleet.probe.fetch(
        "select task_id, pid from lk_runs where ended is null and not (pid = any($1))",
        list(fleet.killed),
    )  # fmt: skip
    assert not stray, f"runs that never ended in a live daemon: {[tuple(r) for r in stray]}"
    rows = await fleet.probe.fetch(
        "select t.id, t.status, t.attempt,"
        " (select count(*) from lk_claims c where c.task_id = t.id) as claims,"
        " (select count(*) from lk_runs r where r.task_id = t.id) as runs,"
        " (select count(*) from lk_runs r where r.task_id = t.id and r.ended is not null"
        "    and not (r.pid = any($2))) as finished"
        " from durable.tasks t where t.queue = any($1)",
        list(queues), list(fleet.killed),
    )  # fmt: skip
    for r in rows:
        assert r["status"] == "completed", tuple(r)
        assert r["attempt"] == r["claims"] >= r["runs"] >= 1, tuple(r)
        assert r["finished"] >= 1, tuple(r)
    # The killed daemons' tasks were taken over by others once their leases ran out.
    taken = await fleet.probe.fetchval(
        "select count(distinct r.task_id) from lk_runs r where r.ended is null"
        " and r.pid = any($1) and exists (select 1 from lk_runs o where o.task_id = r.task_id"
        "   and o.started >= r.started + make_interval(secs => $2) and o.ended is not null)",
        list(fleet.killed), app.LEASE * 0.9,
    )  # fmt: skip
    assert taken >= kills


# -- a queue's concurrency limit ------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_queue_limit_holds_while_three_daemons_are_killed_mid_task(
    dsn: str, tmp_path: Path
) -> None:
    limit, tasks, kills = 2, 18, 3
    async with fleet_of(dsn, tmp_path) as fleet, durable.connect(dsn) as client:
        done = durable_cli("queues", "set", app.LIMITED, "--concurrency", str(limit), dsn=dsn)
        assert done.returncode == 0, done.stderr
        for _ in range(3):
            fleet.spawn(f"{app.LIMITED}=4")
        handles = [await client.start(app.lk_limited, i, 0.4) for i in range(tasks)]
        for _ in range(kills):
            await fleet.kill_one_mid_task((app.LIMITED,))
            fleet.spawn(f"{app.LIMITED}=4")
        for i, h in enumerate(handles):
            assert await h.result(timeout=60) == i
        most = await most_at_once(fleet, (app.LIMITED,))
        assert most <= limit, f"{most} bodies ran at once under a limit of {limit}"
        assert most == limit  # saturated: the check would see an overshoot
        await check_runs(fleet, (app.LIMITED,), kills)


# -- a key's limit across two queues --------------------------------------------------------


@pytest.mark.timeout(90)
async def test_key_limit_holds_across_two_queues_while_their_daemons_are_killed(
    dsn: str, tmp_path: Path
) -> None:
    per_queue, kills = 8, 3
    queues = (app.KEY_A, app.KEY_B)
    async with fleet_of(dsn, tmp_path) as fleet, durable.connect(dsn) as client:
        fleet.spawn(f"{app.KEY_A}=4")
        fleet.spawn(f"{app.KEY_B}=4")
        handles = []
        for i in range(per_queue):
            handles.append(await client.start(app.lk_key_a, "acme", i, 0.4))
            handles.append(await client.start(app.lk_key_b, "acme", i, 0.4))
        for _ in range(kills):
            pid = await fleet.kill_one_mid_task(queues)
            fleet.spawn(fleet.serves[pid])  # its replacement serves the same queue
        for h in handles:
            await h.result(timeout=60)
        most = await most_at_once(fleet, queues)
        assert most <= 2, f"{most} bodies of key acme ran at once under key_limit=2"
        assert most == 2  # saturated: the check would see an overshoot
        await check_runs(fleet, queues, kills)


# -- a queue's rate ------------------------------------------------------------------------


def windows_over(stamps: list[datetime], limit: int, period: float) -> list[datetime]:
    """The stamps that open a window of ``period`` seconds holding more than ``limit``."""
    span = timedelta(seconds=period)
    return [s for s in stamps if sum(1 for t in stamps if s <= t < s + span) > limit]


@pytest.mark.timeout(90)
async def test_queue_rate_counts_the_claims_after_lease_expiry(dsn: str, tmp_path: Path) -> None:
    """"At most N starts in any window": a task taken over after its daemon died is
    started again, and its re-claim counts against the rate like any start."""
    limit, period, tasks, kills = 3, 2.0, 12, 2
    async with fleet_of(dsn, tmp_path) as fleet, durable.connect(dsn) as client:
        done = durable_cli("queues", "set", app.RATED, "--rate", f"{limit}/{period:g}s", dsn=dsn)
        assert done.returncode == 0, done.stderr
        for _ in range(3):
            fleet.spawn(f"{app.RATED}=4")
        handles = [await client.start(app.lk_rated, i, 0.8) for i in range(tasks)]
        for _ in range(kills):
            await fleet.kill_one_mid_task((app.RATED,))
            fleet.spawn(f"{app.RATED}=4")
        for i, h in enumerate(handles):
            assert await h.result(timeout=60) == i
        claims = [r["at"] for r in await fleet.probe.fetch(
            "select at from lk_claims where queue = $1 order by at", app.RATED
        )]  # fmt: skip
        logged = [r["at"] for r in await fleet.probe.fetch(
            "select at from lk_rate where bucket = 'q:' || $1 order by at", app.RATED
        )]  # fmt: skip
        assert len(claims) >= tasks + kills
        assert logged == claims, "every claim, re-claims included, is a start in the rate log"
        over = windows_over(claims, limit, period)
        assert not over, f"more than {limit} starts within {period:g}s from {over}"
        assert windows_over(claims, limit - 1, period)  # saturated windows
        await check_runs(fleet, (app.RATED,), kills)


# -- `durable queues set` with one option ---------------------------------------------------


@pytest.mark.timeout(60)
async def test_setting_one_limit_keeps_the_other(dsn: str) -> None:
    """`queues set Q --rate` once lifted Q's concurrency limit (an option left out was
    written as none): the fleet ran unbounded from then on."""

    async def limits() -> tuple[Any, ...]:
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow(
                "select concurrency, rate_limit, rate_period from durable.queues"
                " where name = $1", app.LIMITED,
            )  # fmt: skip
        finally:
            await conn.close()
        assert row is not None
        return tuple(row)

    def cli(*args: str) -> str:
        done = durable_cli("queues", "set", app.LIMITED, *args, dsn=dsn)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    cli("--concurrency", "2")
    assert cli("--rate", "3/2s") == f"queue {app.LIMITED}: concurrency 2, rate 3/2s"
    assert await limits() == (2, 3, 2.0)
    cli("--concurrency", "4")
    assert await limits() == (4, 3, 2.0)
    assert cli("--rate", "none") == f"queue {app.LIMITED}: concurrency 4, rate none"
    assert await limits() == (4, None, None)
    cli("--concurrency", "none", "--rate", "1/1s")
    assert await limits() == (None, 1, 1.0)
    bare = durable_cli("queues", "set", app.LIMITED, dsn=dsn)
    assert bare.returncode == 2 and "--concurrency" in bare.stderr
    assert await limits() == (None, 1, 1.0)

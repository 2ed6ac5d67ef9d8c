"""A rolling deploy of a versioned workflow across two daemon processes: the runs started
on version 1 finish on the daemons that still have version 1 (one of them killed with
SIGKILL mid-step), the runs started meanwhile take version 2 on the new daemons, and
no run ever replays on code of another version."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import anyio
import asyncpg
import pytest

import durable
from tests.support.helpers import (
    durable_cli,
    exited,
    fetchval,
    holder_pid,
    kill,
    reaped,
    spawn_daemon,
    statuses_in,
    wait_for,
)

APP = "tests.apps.versioned_flow"
ENV = {"DURABLE_LEASE": "2", "DURABLE_POLL_INTERVAL": "0.5", "DURABLE_QUEUES": "roll=8"}


def daemon(dsn: str, version: str, log: Path) -> subprocess.Popen[bytes]:
    return spawn_daemon(dsn, APP, log=log, VERSIONED_FLOW=version, **ENV)


async def catalog_version(dsn: str, version: str, pid: int) -> None:
    """Wait until the daemon ``pid`` serves ``version`` and the catalog resolves the name
    to it."""

    async def published() -> bool:
        return bool(await fetchval(
            dsn,
            "select exists (select 1 from durable.definitions d"
            " join durable.worker_definitions wd on wd.name = d.name"
            " join durable.workers w on w.id = wd.worker_id"
            " where d.name = 'rolling_flow' and d.version = $1 and wd.version = $1"
            " and w.pid = $2 and w.stopped_at is null)",
            version, pid,
        ))  # fmt: skip

    await wait_for(published, timeout=30)


async def rows(dsn: str, ids: list[int]) -> dict[int, asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch(
            "select t.id, t.version, t.status, t.attempt, w.pid from durable.tasks t"
            " left join durable.workers w on w.id = t.worker_id where t.id = any($1)",
            ids,
        )
    finally:
        await conn.close()
    return {r["id"]: r for r in found}


@pytest.mark.timeout(180)
async def test_a_rolling_restart_keeps_old_runs_on_old_code_and_new_runs_on_new(
    dsn: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    first = daemon(dsn, "1", tmp_path / "first.log")
    second = daemon(dsn, "1", tmp_path / "second.log")
    procs = [first, second]
    with reaped(procs):
        await catalog_version(dsn, "1", first.pid)
        await catalog_version(dsn, "1", second.pid)
        async with durable.connect(dsn) as client:  # this process has none of the code
            held = await client.start("rolling_flow", 0, str(gate))
            old = [await client.start("rolling_flow", i) for i in range(1, 5)]
            stranded = await client.start("rolling_flow", 5)  # its event comes too late
            await statuses_in(dsn, [h.id for h in [*old, stranded]], "waiting")
            await statuses_in(dsn, [held.id], "running")
            holder = await holder_pid(dsn, held.id)
            victim, survivor = (first, second) if holder == first.pid else (second, first)

            # Roll the first daemon: killed mid-step, replaced by one with version 2.
            kill(victim, signal.SIGKILL)
            assert await exited(victim) == -signal.SIGKILL
            third = daemon(dsn, "2", tmp_path / "third.log")
            procs.append(third)
            await catalog_version(dsn, "2", third.pid)
            new = [await client.start("rolling_flow", i) for i in range(10, 14)]
            await statuses_in(dsn, [h.id for h in new], "waiting")

            gate.unlink()
            for h in [held, *old, *new]:
                assert await client.send_event(h.id, "go")
            for h in [held, *old]:
                assert await h.result(timeout=60) == {"tag": "v1", "pid": survivor.pid}
            for h in new:
                assert await h.result(timeout=60) == {"tag": "v2", "pid": third.pid}
            found = await rows(dsn, [h.id for h in [held, *old, *new]])
            assert {found[h.id]["version"] for h in [held, *old]} == {"1"}
            assert {found[h.id]["version"] for h in new} == {"2"}
            # The killed daemon's run went to the other version-1 daemon once its lease
            # expired, never to the version-2 one.
            assert found[held.id]["attempt"] == 2 and found[held.id]["pid"] == survivor.pid

            # Roll the second daemon, gracefully: every run now starts on version 2.
            survivor.send_signal(signal.SIGTERM)
            assert await exited(survivor) == 0
            fourth = daemon(dsn, "2", tmp_path / "fourth.log")
            procs.append(fourth)
            await catalog_version(dsn, "2", fourth.pid)
            last = [await client.start("rolling_flow", i) for i in range(20, 24)]
            for h in last:
                assert await client.send_event(h.id, "go")
            done = [await h.result(timeout=60) for h in last]
            assert {d["tag"] for d in done} == {"v2"}
            assert {d["pid"] for d in done} <= {third.pid, fourth.pid}

            # A version-1 run woken now has no daemon with its code: it waits, and says so.
            assert await client.send_event(stranded.id, "go")
            await statuses_in(dsn, [stranded.id], "queued")

            async def victim_lost() -> bool:  # silent for longer than its lease
                return bool(await fetchval(
                    dsn, "select now() - heartbeat_at > interval '2 s' from durable.workers"
                    " where pid = $1", victim.pid,
                ))  # fmt: skip

            await wait_for(victim_lost)
            listed = await anyio.to_thread.run_sync(lambda: durable_cli(
                "ls", "--name", "rolling_flow", "--json", dsn=dsn, DURABLE_LEASE="2"))  # fmt: skip
            shown = {r["id"]: r for r in map(json.loads, listed.stdout.splitlines())}
            assert shown[stranded.id]["waiting_for"] == "a daemon with version 1"
            assert shown[stranded.id]["version"] == "1"
            assert (await rows(dsn, [stranded.id]))[stranded.id]["status"] == "queued"

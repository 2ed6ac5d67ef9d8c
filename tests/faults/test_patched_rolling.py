"""A workflow changed behind `ctx.patched`, rolled out across two daemon processes: one
killed with SIGKILL while it runs a step, replaced by a daemon with the new code, then the
other stopped and replaced. Runs recorded on the old code complete on the new code along
the old path, runs started after the roll take the new path, a run that moved between
versions mid-roll follows whichever path its history holds, and no run ever fails to
replay. `durable verify` then passes every recorded history against the new code."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import anyio
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

OLD, NEW = "tests.apps.ship_v1", "tests.apps.ship_v2_patched"
ENV = {"DURABLE_LEASE": "2", "DURABLE_POLL_INTERVAL": "0.5", "DURABLE_QUEUES": "ship=8"}


async def serving(dsn: str, pid: int) -> None:
    """Wait until the daemon ``pid`` has published `ship` in the catalog."""

    async def published() -> bool:
        return bool(await fetchval(
            dsn, "select exists (select 1 from durable.worker_definitions wd"
            " join durable.workers w on w.id = wd.worker_id"
            " where wd.name = 'ship' and w.pid = $1 and w.stopped_at is null)", pid,
        ))  # fmt: skip

    await wait_for(published, timeout=30)


async def log_of(dsn: str, task_id: int) -> list[str]:
    found = await fetchval(
        dsn, "select array_agg(kind || ':' || name order by seq) from durable.events"
        " where task_id = $1", task_id,
    )  # fmt: skip
    return list(found or [])


@pytest.mark.timeout(180)
async def test_a_patched_change_rolls_out_over_a_killed_and_a_stopped_daemon(
    dsn: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.touch()

    def daemon(app: str, log: str) -> subprocess.Popen[bytes]:
        return spawn_daemon(dsn, app, log=tmp_path / log, SHIP_LABEL_GATE=str(gate), **ENV)

    first, second = daemon(OLD, "first.log"), daemon(OLD, "second.log")
    procs = [first, second]
    with reaped(procs):
        await serving(dsn, first.pid)
        await serving(dsn, second.pid)
        async with durable.connect(dsn) as client:  # this process has none of the code
            old = [await client.start("ship", f"o-{i}") for i in range(4)]
            held = await client.start("ship", "held")  # its first step runs until the kill
            await statuses_in(dsn, [h.id for h in old], "waiting")
            await statuses_in(dsn, [held.id], "running")
            holder = await holder_pid(dsn, held.id)
            victim, survivor = (first, second) if holder == first.pid else (second, first)

            # Roll the daemon running `held`: killed mid-step, replaced by the new code.
            kill(victim, signal.SIGKILL)
            assert await exited(victim) == -signal.SIGKILL
            third = daemon(NEW, "third.log")
            procs.append(third)
            await serving(dsn, third.pid)
            gate.unlink()
            # Mid-roll: old and new code both serve `ship`; these may run on either.
            mixed = [await client.start("ship", f"m-{i}") for i in range(4)]
            for h in old[:2]:
                assert await client.send_event(h.id, "picked")
            await statuses_in(dsn, [h.id for h in mixed], "waiting")
            await statuses_in(dsn, [held.id], "waiting")

            # Roll the other daemon, gracefully.
            survivor.send_signal(signal.SIGTERM)
            assert await exited(survivor) == 0
            fourth = daemon(NEW, "fourth.log")
            procs.append(fourth)
            await serving(dsn, fourth.pid)
            new = [await client.start("ship", f"n-{i}") for i in range(4)]
            await statuses_in(dsn, [h.id for h in new], "waiting")

            for h in [*old[2:], held, *mixed, *new]:
                assert await client.send_event(h.id, "picked")
            results = {h.id: await h.result(timeout=60) for h in [*old, held, *mixed, *new]}

        logs = {i: await log_of(dsn, i) for i in results}
        # Recorded on the old code: the old path, on whichever daemon resumed them.
        for h in old:
            assert results[h.id] == {"label": f"L-o-{old.index(h)}", "insured": False}
            assert logs[h.id] == ["step:label", "event:picked", "step:notify"]
        # Started once every daemon had the new code: the new path, marker first.
        for h in new:
            assert results[h.id]["insured"] is True
            assert logs[h.id] == [
                "step:label", "patch:insure", "step:insure", "event:picked", "step:notify"
            ]
        # Killed before its first step's checkpoint, or started mid-roll: the path its
        # history took, kept through every later replay.
        for h in [held, *mixed]:
            marked = "patch:insure" in logs[h.id]
            assert results[h.id]["insured"] is marked, (h.id, logs[h.id])
        assert await fetchval(dsn, "select attempt from durable.tasks where id = $1", held.id) >= 2
        assert await fetchval(
            dsn, "select count(*) from durable.tasks where status <> 'completed'"
        ) == 0

        verified = await anyio.to_thread.run_sync(lambda: durable_cli(
            "verify", "--app", NEW, "--name", "ship", "--json", dsn=dsn))  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr
        verdicts = [json.loads(line) for line in verified.stdout.splitlines()]
        assert len(verdicts) == len(results) and all(v["ok"] for v in verdicts), verdicts
        # The old code cannot replay what the new code recorded: verify says so.
        refused = await anyio.to_thread.run_sync(lambda: durable_cli(
            "verify", "--app", OLD, "--name", "ship", "--json", dsn=dsn))  # fmt: skip
        assert refused.returncode == 1
        failed = {json.loads(line)["task_id"] for line in refused.stdout.splitlines()
                  if not json.loads(line)["ok"]}  # fmt: skip
        assert {h.id for h in new} <= failed and not failed & {h.id for h in old}

"""A workflow survives its daemons being killed with SIGKILL again and again."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import datetime
from functools import partial
from pathlib import Path

import asyncpg

import durable
from tests.apps.workflow_app import (
    FAULT_QUEUE,
    FAULT_TABLES,
    STEPS,
    TRANSACTIONAL,
    wf_fault_twenty_steps,
)
from tests.support.helpers import ROOT, daemon_env, execute, kill, wait_for

APP = "tests.apps.workflow_app"
KILLS = 6


def _daemon(dsn: str, log: Path) -> subprocess.Popen[bytes]:
    """``durable run`` in a subprocess with short leases, its output in ``log``."""
    env = daemon_env(
        dsn,
        DURABLE_LEASE="2",
        DURABLE_POLL_INTERVAL="0.5",
        DURABLE_QUEUES=f"{FAULT_QUEUE}=4",
        DURABLE_SHUTDOWN_GRACE="0",
    )
    # Our own Popen rather than helpers.spawn_daemon, which leaves its log file open.
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "durable", "run", "--app", APP],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_twenty_steps_survive_repeated_sigkill(dsn: str, tmp_path: Path) -> None:
    await execute(dsn, FAULT_TABLES)
    spawned = 0

    def spawn() -> subprocess.Popen[bytes]:
        nonlocal spawned
        spawned += 1
        return _daemon(dsn, tmp_path / f"daemon{spawned}.log")

    procs = [spawn(), spawn()]
    rng = random.Random()
    kills = 0
    committed_at_kill: list[tuple[datetime, set[int]]] = []
    conn = await asyncpg.connect(dsn)
    try:
        async with durable.connect(dsn) as client:
            handle = await client.start(wf_fault_twenty_steps, dsn)

            async def holder_after(target: int) -> int | None:
                """The pid of the live daemon running the workflow once it has >= target
                checkpoints."""
                row = await conn.fetchrow(
                    "select (select count(*) from durable.events e where e.task_id = t.id)"
                    "   as n, w.pid"
                    " from durable.tasks t left join durable.workers w on w.id = t.worker_id"
                    " where t.id = $1 and t.status = 'running'",
                    handle.id,
                )
                if row is None or row["n"] < target or row["pid"] is None:
                    return None
                alive = {p.pid for p in procs if p.poll() is None}
                return row["pid"] if row["pid"] in alive else None

            seen = 0
            while kills < KILLS:
                # A random point: after one or two more checkpoints, somewhere inside a step.
                target = seen + rng.randint(1, 2)
                pid = await wait_for(partial(holder_after, target), timeout=60)
                victim = next(p for p in procs if p.pid == pid)
                kill(victim)
                victim.wait()
                kills += 1
                # The daemon is dead: what is committed now was committed before the kill.
                row = await conn.fetchrow(
                    "select clock_timestamp() as at, coalesce(array_agg(seq), '{}') as seqs"
                    " from durable.events where task_id = $1",
                    handle.id,
                )
                assert row is not None
                committed_at_kill.append((row["at"], set(row["seqs"])))
                seen = len(row["seqs"])
                assert seen < STEPS, "the workflow outran the kills"
                procs.remove(victim)
                procs.append(spawn())

            result = await handle.result(timeout=90)
            info = await client.get(handle.id)
    finally:
        for p in procs:
            kill(p)
            p.wait()

    try:
        assert info.status == "completed"
        assert len(result) == STEPS
        assert kills >= 5
        # Every kill of the daemon holding the workflow cost it an attempt (lease expiry).
        assert info.attempt >= kills + 1

        events = await conn.fetch(
            "select seq, kind, status, attempt from durable.events"
            " where task_id = $1 order by seq",
            handle.id,
        )
        assert [e["seq"] for e in events] == list(range(STEPS))
        assert all(e["status"] == "completed" for e in events)
        assert [e["kind"] for e in events] == [
            "transaction" if i in TRANSACTIONAL else "step" for i in range(STEPS)
        ]

        effects = await conn.fetch(
            "select seq, attempt, run_id::text, checkpoint_existed, at from wf_side_effects"
        )
        plain = [i for i in range(STEPS) if i not in TRANSACTIONAL]
        runs: dict[int, list[str]] = {i: [] for i in plain}
        for e in effects:
            runs[e["seq"]].append(e["run_id"])
            # No step ran again once its checkpoint had committed.
            assert not e["checkpoint_existed"], f"step {e['seq']} ran after its checkpoint"
        # Each step ran at least once, and the recorded result is one of its runs.
        for i in plain:
            assert runs[i], f"step {i} never ran"
            assert result[i] in runs[i]
        # A step whose checkpoint had committed when a daemon was killed never ran again.
        for killed_at, committed in committed_at_kill:
            for e in effects:
                if e["seq"] in committed:
                    assert e["at"] < killed_at, f"step {e['seq']} ran again after a kill"
        # A step runs twice only when a kill interrupted it: one extra run per kill at most.
        assert len(effects) <= len(plain) + kills
        # Steps whose checkpoint committed before a kill ran exactly once unless an earlier
        # kill interrupted them before their checkpoint.
        extra = {i: len(r) - 1 for i, r in runs.items() if len(r) > 1}
        assert sum(extra.values()) <= kills

        business = await conn.fetch(
            "select seq, count(*) as n from wf_business where task_id = $1 group by seq",
            handle.id,
        )
        assert {b["seq"]: b["n"] for b in business} == dict.fromkeys(TRANSACTIONAL, 1)
        assert {result[i] for i in TRANSACTIONAL} == set(TRANSACTIONAL)
    finally:
        await conn.close()

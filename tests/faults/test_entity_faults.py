"""A daemon killed in the middle of a warm resume: what it kept in memory dies with it,
and another daemon resumes the workflow cold from its log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import durable
from tests.apps.entity_app import ENTITY_QUEUE, ENTITY_TABLES, wf_entity_fault
from tests.support.helpers import ROOT, daemon_env, execute, fetchval, kill, wait_for, wait_status

APP = "tests.apps.entity_app"


def _daemon(dsn: str, log: Path) -> subprocess.Popen[bytes]:
    env = daemon_env(
        dsn, DURABLE_LEASE="2", DURABLE_POLL_INTERVAL="0.5",
        DURABLE_QUEUES=f"{ENTITY_QUEUE}=4", DURABLE_SHUTDOWN_GRACE="0",
    )  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "durable", "run", "--app", APP],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def test_a_daemon_killed_mid_warm_resume_leaves_a_cold_resume_elsewhere(
    dsn: str, tmp_path: Path
) -> None:
    await execute(dsn, ENTITY_TABLES + "insert into entity_hang values (1);")
    a = _daemon(dsn, tmp_path / "a.log")
    b: subprocess.Popen[bytes] | None = None
    try:
        async with durable.connect(dsn) as client:
            handle = await client.start(wf_entity_fault, 3)
            await wait_status(dsn, handle.id, "waiting")
            assert await client.send_event(handle.id, "e", 0)

            async def steps(i: int) -> int:
                return int(await fetchval(dsn, "select count(*) from entity_steps where i = $1", i))

            await wait_for(lambda: steps(0))
            await wait_status(dsn, handle.id, "waiting")
            assert await client.send_event(handle.id, "e", 10)
            await wait_for(lambda: steps(1))  # a resumed it and hangs in step s1
            # Resumed in place: the function started once in a, for two steps.
            assert await fetchval(dsn, "select count(*) from entity_starts") == 1
            kill(a)
            a.wait(10)
            b = _daemon(dsn, tmp_path / "b.log")
            # b reclaims the expired lease, replays s0 and runs s1 again.
            await wait_for(lambda: _twice(dsn), timeout=30)
            await wait_status(dsn, handle.id, "waiting", timeout=30)
            assert await client.send_event(handle.id, "e", 20)
            assert await handle.result(timeout=30) == [1, 11, 21]
        assert await fetchval(dsn, "select count(distinct pid) from entity_starts") == 2
        assert await fetchval(dsn, "select count(*) from entity_steps where i = 0") == 1
        assert await fetchval(
            dsn, "select count(distinct pid) from entity_steps where i = 1"
        ) == 2  # at least once: a's run of s1 died uncommitted, b ran it again
    finally:
        kill(a)
        if b is not None:
            kill(b)
            b.wait(10)


async def _twice(dsn: str) -> bool:
    return bool(await fetchval(dsn, "select count(*) >= 2 from entity_steps where i = 1"))

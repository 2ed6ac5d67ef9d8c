"""Subprocess daemons killed and stopped while a task is in the middle of its body.

The task (tests.apps.queue_tasks.q_block) records each start in ``q_runs`` and then
blocks until the test opens its gate in ``q_gates``: the test always knows where the
body is, and decides when it may finish.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import asyncpg
import pytest

import durable
from durable.store import Store
from tests.apps.queue_tasks import create_tables, open_gate
from tests.support.helpers import exited, fetchval, kill, reaped, spawn_daemon, wait_for

APP = "tests.apps.queue_tasks"


async def runs(dsn: str, key: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "select pid, started_at from q_runs where key = $1 order by id", key
        )
    finally:
        await conn.close()


async def wait_runs(dsn: str, key: str, n: int, timeout: float = 20) -> list[asyncpg.Record]:
    """Wait until the body of task ``key`` has started ``n`` times."""

    async def enough() -> list[asyncpg.Record] | None:
        found = await runs(dsn, key)
        return found if len(found) >= n else None

    result: list[asyncpg.Record] = await wait_for(enough, timeout=timeout)
    return result


async def task_row(dsn: str, task_id: int) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("select * from durable.tasks where id = $1", task_id)
    finally:
        await conn.close()
    assert row is not None
    return row


def logged(path: Path, event: str) -> list[dict[str, object]]:
    """The JSON log lines of ``event`` a subprocess daemon wrote to ``path``."""
    found = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


async def wait_logged(path: Path, event: str, timeout: float = 20) -> None:
    async def seen() -> bool:
        return bool(logged(path, event))

    await wait_for(seen, timeout=timeout)


@pytest.mark.timeout(90)
async def test_sigkill_mid_task_is_finished_by_another_daemon_and_the_zombie_is_fenced(
    dsn: str, tmp_path: Path
) -> None:
    await create_tables(dsn)
    env = {"DURABLE_LEASE": "2", "DURABLE_POLL_INTERVAL": "0.5"}
    async with durable.connect(dsn) as client:
        handle = await client.start("q_block", "kill-9")
        first = spawn_daemon(dsn, APP, log=tmp_path / "first.log", **env)
        with reaped([first]):
            [run] = await wait_runs(dsn, "kill-9", 1)
            assert run["pid"] == first.pid
            held = await task_row(dsn, handle.id)
            assert held["status"] == "running" and held["attempt"] == 1
            zombie_token: int = held["claim_token"]
            kill(first, signal.SIGKILL)
            assert await exited(first) == -signal.SIGKILL
            dead = await task_row(dsn, handle.id)
            # Nobody released it: the dead daemon's lease is all that is left.
            assert dead["status"] == "running" and dead["claim_token"] == zombie_token

            second = spawn_daemon(dsn, APP, log=tmp_path / "second.log", **env)
            with reaped([second]):
                _, rerun = await wait_runs(dsn, "kill-9", 2)
                assert rerun["pid"] == second.pid
                # Taken over only once the lease had run out.
                assert rerun["started_at"] >= dead["lease_until"]
                now = await task_row(dsn, handle.id)
                assert now["status"] == "running" and now["attempt"] == 2
                assert now["claim_token"] != zombie_token
                assert now["worker_id"] != dead["worker_id"]
                assert json.loads(now["error"])["type"] == "durable.LeaseExpired"

                # The killed attempt comes back as a zombie: every write it tries is refused.
                store = await Store.open(dsn, min_size=1, max_size=2)
                try:
                    error = json.dumps({"type": "Zombie", "message": "late", "traceback": None})
                    tid = handle.id
                    assert await store.complete_many([(tid, zombie_token, '"zombie"')]) == {}
                    assert await store.fail(tid, zombie_token, error) is False
                    assert await store.retry_later(tid, zombie_token, 0, error) is False
                    assert await store.mark_cancelled(tid, zombie_token) is False
                    assert await store.release([(tid, zombie_token)]) == set()
                    assert await store.extend_leases([tid], [zombie_token], 60) == {}
                    unchanged = await task_row(dsn, tid)
                    for column in ("status", "attempt", "claim_token", "lease_until", "result"):
                        assert unchanged[column] == now[column], column

                    await open_gate(dsn, "kill-9")
                    winner = f"finished by {second.pid}"
                    assert await handle.result(timeout=20) == winner

                    # And after the second daemon's result is in, still refused.
                    assert await store.complete_many([(tid, zombie_token, '"zombie"')]) == {}
                    assert await store.fail(tid, zombie_token, error) is False
                finally:
                    await store.close()
                info = await client.get(handle.id)
                assert info.status == "completed" and info.result == winner
                assert info.attempt == 2 and info.error is None
    assert len(await runs(dsn, "kill-9")) == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_lets_the_running_task_finish_within_the_grace(
    dsn: str, tmp_path: Path, signum: signal.Signals
) -> None:
    await create_tables(dsn)
    log = tmp_path / "daemon.log"
    async with durable.connect(dsn) as client:
        handle = await client.start("q_block", "graceful")
        proc = spawn_daemon(dsn, APP, log=log, DURABLE_SHUTDOWN_GRACE="30", DURABLE_LEASE="2")
        with reaped([proc]):
            await wait_runs(dsn, "graceful", 1)
            proc.send_signal(signum)
            await wait_logged(log, "daemon_draining")
            # Claiming has stopped: work that arrives now waits for another daemon.
            late = await client.start("q_cli_add", 1, 2)
            assert proc.poll() is None  # still waiting for the task, within the grace
            await open_gate(dsn, "graceful")
            assert await exited(proc) == 0
        assert await handle.result(timeout=10) == f"finished by {proc.pid}"
        info = await client.get(handle.id)
        assert info.status == "completed" and info.attempt == 1
        assert (await client.get(late.id)).status == "queued"
    assert not logged(log, "tasks_released")
    assert logged(log, "daemon_stopped")
    assert await fetchval(dsn, "select count(*) from durable.workers where stopped_at is null") == 0


@pytest.mark.timeout(60)
async def test_a_task_that_outlives_the_grace_is_released_and_run_by_another_daemon(
    dsn: str, tmp_path: Path
) -> None:
    await create_tables(dsn)
    log = tmp_path / "first.log"
    # A lease far longer than the test waits: only the release can hand the task over.
    env = {"DURABLE_SHUTDOWN_GRACE": "1", "DURABLE_LEASE": "60"}
    async with durable.connect(dsn) as client:
        handle = await client.start("q_block", "outlives")
        first = spawn_daemon(dsn, APP, log=log, **env)
        with reaped([first]):
            await wait_runs(dsn, "outlives", 1)
            first.send_signal(signal.SIGTERM)
            assert await exited(first) == 0
        released = await task_row(dsn, handle.id)
        assert released["status"] == "queued"
        assert released["attempt"] == 1  # shutting down spends no attempt
        assert released["claim_token"] is None and released["lease_until"] is None
        assert released["worker_id"] is None and released["error"] is None
        [record] = logged(log, "tasks_released")
        assert record["ids"] == [handle.id]

        await open_gate(dsn, "outlives")
        second = spawn_daemon(dsn, APP, log=tmp_path / "second.log", **env)
        with reaped([second]):
            assert await handle.result(timeout=20) == f"finished by {second.pid}"
        info = await client.get(handle.id)
        assert info.status == "completed" and info.attempt == 1
    assert [r["pid"] for r in await runs(dsn, "outlives")] == [first.pid, second.pid]


@pytest.mark.timeout(60)
async def test_a_second_sigterm_skips_the_grace(dsn: str, tmp_path: Path) -> None:
    await create_tables(dsn)
    log = tmp_path / "daemon.log"
    async with durable.connect(dsn) as client:
        handle = await client.start("q_block", "impatient")
        proc = spawn_daemon(dsn, APP, log=log, DURABLE_SHUTDOWN_GRACE="600", DURABLE_LEASE="60")
        with reaped([proc]):
            await wait_runs(dsn, "impatient", 1)
            proc.send_signal(signal.SIGTERM)
            await wait_logged(log, "daemon_draining")
            proc.send_signal(signal.SIGTERM)
            # Far sooner than the 600 s grace (the test's own timeout is 60 s).
            assert await exited(proc, timeout=20) == 0
        row = await task_row(dsn, handle.id)
        assert row["status"] == "queued" and row["attempt"] == 1
        assert row["claim_token"] is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_during_the_last_writes_does_not_kill_the_daemon(
    dsn: str, tmp_path: Path, signum: signal.Signals
) -> None:
    """A second signal while the daemon makes its last writes (here its own row's, held
    by the test) is a second stop: the daemon still ends them and exits 0, where the
    default action would kill it (SIGTERM) or print a KeyboardInterrupt (SIGINT)."""
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(dsn, APP, log=log)
    with reaped([proc]):
        await wait_logged(log, "daemon_ready")
        holder = await asyncpg.connect(dsn)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("select 1 from durable.workers where pid = $1 for update", proc.pid)
            proc.send_signal(signum)

            async def writing_its_row() -> bool:
                return bool(await fetchval(
                    dsn, "select exists (select 1 from pg_stat_activity where wait_event_type"
                    " = 'Lock' and query like 'update durable.workers set stopped_at%')",
                ))  # fmt: skip

            await wait_for(writing_its_row)
            proc.send_signal(signum)

            async def heard_twice() -> bool:
                return len(logged(log, "signal_received")) == 2

            await wait_for(heard_twice)
            assert proc.poll() is None
            await tx.rollback()
        finally:
            await holder.close()
        assert await exited(proc) == 0
    assert logged(log, "daemon_stopped")
    assert b"Traceback" not in log.read_bytes()


@pytest.mark.timeout(60)
async def test_a_sigterm_while_the_daemon_starts_stops_it(dsn: str, tmp_path: Path) -> None:
    """SIGTERM while `durable run` is still starting (here held at its registration by a
    lock the test takes): once the registration goes through, the daemon exits 0 rather
    than serving on with its stop forgotten (its queue loops did not exist yet to hear it)."""
    log = tmp_path / "daemon.log"
    holder = await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("lock table durable.workers in exclusive mode")
        proc = spawn_daemon(dsn, APP, log=log)
        with reaped([proc]):

            async def registering() -> bool:
                return bool(await fetchval(
                    dsn, "select exists (select 1 from pg_stat_activity where wait_event_type"
                    " = 'Lock' and query ilike '%insert into durable.workers%')",
                ))  # fmt: skip

            await wait_for(registering)
            proc.send_signal(signal.SIGTERM)

            async def heard() -> bool:
                return bool(logged(log, "signal_received"))

            await wait_for(heard)
            await tx.rollback()
            assert await exited(proc) == 0
    finally:
        await holder.close()
    assert logged(log, "daemon_stopped") and not logged(log, "daemon_ready")

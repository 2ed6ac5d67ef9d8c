"""Daemons SIGKILLed, and their connections terminated, at the worst moments of a
transactional step, a step's checkpoint, a step's backoff, a completion, and under a
fleet-wide queue limit. Every kill point is a state the test observes in the database: a
session blocked on a *gate* (an advisory lock the test holds, see
tests/apps/crash_races_app.py), never a sleep."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import durable
from durable.store import Store
from tests.apps import crash_races_app as app
from tests.support.helpers import ROOT, daemon_env, execute, kill, wait_for, wait_status

APP = "tests.apps.crash_races_app"


class Fleet:
    """Subprocess daemons, every one killed when the test ends."""

    def __init__(self, dsn: str, logs: Path, **env: str) -> None:
        self.dsn = dsn
        self.logs = logs
        self.env = {
            "DURABLE_LEASE": "2",
            "DURABLE_POLL_INTERVAL": "0.5",
            "DURABLE_SHUTDOWN_GRACE": "0",
            "DURABLE_QUEUES": f"{app.QUEUE}=4,{app.LIMITED}=4",
            **env,
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        log = self.logs / f"daemon{len(self.procs)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "durable", "run", "--app", APP],
                cwd=ROOT, env=daemon_env(self.dsn, **self.env), stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def sigkill(self, proc: subprocess.Popen[bytes]) -> None:
        kill(proc)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs:
            kill(proc)
            proc.wait(timeout=30)


@asynccontextmanager
async def setup(dsn: str, tmp_path: Path, **env: str) -> AsyncIterator[tuple[Fleet, Gates]]:
    await execute(dsn, app.CRASH_TABLES)
    fleet = Fleet(dsn, tmp_path, **env)
    gates = await Gates.open(dsn)
    try:
        yield fleet, gates
    finally:
        fleet.close()
        await gates.close()


class Gates:
    """The test's session: holds gates, watches who waits at one, terminates sessions."""

    def __init__(self, conn: asyncpg.Connection, probe: asyncpg.Connection) -> None:
        self.conn = conn
        self.probe = probe

    @classmethod
    async def open(cls, dsn: str) -> Gates:
        return cls(await asyncpg.connect(dsn), await asyncpg.connect(dsn))

    async def hold(self, key: int) -> None:
        await self.conn.execute("select pg_advisory_lock($1::bigint)", key)

    async def release(self, key: int) -> None:
        assert await self.conn.fetchval("select pg_advisory_unlock($1::bigint)", key)

    async def waiter(self, key: int, timeout: float = 30) -> int:
        """The backend pid of the session waiting at gate ``key`` (once one is)."""

        async def check() -> int | None:
            pid: int | None = await self.probe.fetchval(
                "select pid from pg_locks where locktype = 'advisory' and not granted"
                " and objid = $1 and database = (select oid from pg_database"
                "  where datname = current_database()) limit 1",
                key,
            )
            return pid

        return int(await wait_for(check, timeout=timeout))

    async def query_of(self, pid: int) -> str:
        return str(await self.probe.fetchval(
            "select query from pg_stat_activity where pid = $1", pid
        ))  # fmt: skip

    async def terminate(self, pid: int) -> None:
        assert await self.probe.fetchval("select pg_terminate_backend($1)", pid)
        await self.gone(pid)

    async def gone(self, pid: int) -> None:
        async def check() -> bool:
            return not await self.probe.fetchval(
                "select exists (select 1 from pg_stat_activity where pid = $1)", pid
            )

        await wait_for(check, timeout=30)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.probe.fetch(query, *args))

    async def val(self, query: str, *args: Any) -> Any:
        return await self.probe.fetchval(query, *args)

    async def close(self) -> None:
        await self.conn.close()
        await self.probe.close()


async def effects(gates: Gates, task_id: int) -> dict[str, int]:
    rows = await gates.fetch(
        "select name, count(*) as n from cr_effects where task_id = $1 group by name", task_id
    )
    return {r["name"]: r["n"] for r in rows}


async def events(gates: Gates, task_id: int) -> list[tuple[int, str, str, str]]:
    rows = await gates.fetch(
        "select seq, kind, name, status from durable.events where task_id = $1 order by seq",
        task_id,
    )
    return [(r["seq"], r["kind"], r["name"], r["status"]) for r in rows]


# -- ctx.transaction -------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("retried", [False, True], ids=["plain", "retry"])
async def test_kill_after_the_transaction_committed_before_the_next_step(
    dsn: str, tmp_path: Path, retried: bool
) -> None:
    async with setup(dsn, tmp_path) as (fleet, gates), durable.connect(dsn) as client:
        await gates.hold(app.NEXT_STEP)
        first = fleet.spawn()
        run = await client.start(app.cr_transaction, retried)
        await gates.waiter(app.NEXT_STEP)  # the transaction committed; `after` is running
        assert await events(gates, run.id) == [(0, "transaction", "biz", "completed")]
        fleet.sigkill(first)
        await gates.release(app.NEXT_STEP)
        fleet.spawn()
        assert await run.result(timeout=60) == ["biz", "after"]
        assert await gates.val("select count(*) from cr_business") == 1
        assert await effects(gates, run.id) == {"after": 2}  # not checkpointed: ran again


@pytest.mark.timeout(120)
@pytest.mark.parametrize("retried", [False, True], ids=["plain", "retry"])
@pytest.mark.parametrize("where", ["in_function", "in_commit"])
async def test_transaction_connection_terminated(
    dsn: str, tmp_path: Path, retried: bool, where: str
) -> None:
    """The transaction's connection dies while the user's function runs, or while its
    COMMIT waits in a deferred trigger: it rolled back; the step runs again and its writes
    commit once."""
    gate = app.IN_TRANSACTION if where == "in_function" else app.AT_COMMIT
    async with setup(dsn, tmp_path, DURABLE_LEASE="5") as (fleet, gates), durable.connect(
        dsn
    ) as client:
        await gates.hold(gate)
        fleet.spawn()
        run = await client.start(app.cr_transaction, retried)
        pid = await gates.waiter(gate)
        if where == "in_commit":
            assert (await gates.query_of(pid)).strip().lower().startswith("commit")
        await gates.terminate(pid)
        await gates.release(gate)
        assert await run.result(timeout=60) == ["biz", "after"]
        assert await gates.val("select count(*) from cr_business") == 1
        log = await events(gates, run.id)
        assert log[-2:] == [
            (len(log) - 2, "transaction", "biz", "completed"),
            (len(log) - 1, "step", "after", "completed"),
        ]
        if retried:  # the failed try is recorded, the next try committed
            assert [e[3] for e in log] == ["failed", "completed", "completed"]
        else:  # nothing recorded for the rolled-back run; the next attempt ran it
            assert len(log) == 2
            info = await client.get(run.id)
            assert info.attempt >= 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("retried", [False, True], ids=["plain", "retry"])
@pytest.mark.parametrize("then", ["commit", "terminate"])
async def test_daemon_killed_while_the_transaction_commits(
    dsn: str, tmp_path: Path, retried: bool, then: str
) -> None:
    """SIGKILL while the COMMIT waits; then the orphaned COMMIT either goes through (the
    daemon is dead: nobody hears of it) or is terminated. Either way one business row."""
    async with setup(dsn, tmp_path) as (fleet, gates), durable.connect(dsn) as client:
        await gates.hold(app.AT_COMMIT)
        first = fleet.spawn()
        run = await client.start(app.cr_transaction, retried)
        pid = await gates.waiter(app.AT_COMMIT)
        fleet.sigkill(first)
        if then == "terminate":
            await gates.terminate(pid)
            await gates.release(app.AT_COMMIT)
        else:
            await gates.release(app.AT_COMMIT)
            await gates.gone(pid)  # committed, then found its client gone
            assert await events(gates, run.id) == [(0, "transaction", "biz", "completed")]
        fleet.spawn()
        assert await run.result(timeout=60) == ["biz", "after"]
        assert await gates.val("select count(*) from cr_business") == 1
        log = await events(gates, run.id)
        assert log[-2:] == [
            (len(log) - 2, "transaction", "biz", "completed"),
            (len(log) - 1, "step", "after", "completed"),
        ]


# -- steps and their checkpoints --------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("then", ["commit", "terminate"])
async def test_daemon_killed_while_a_step_checkpoint_commits(
    dsn: str, tmp_path: Path, then: str
) -> None:
    """The step ran; SIGKILL while its checkpoint's insert waits. If the orphaned insert
    then commits, the step must not run again; if it is terminated, it may (documented)."""
    async with setup(dsn, tmp_path) as (fleet, gates), durable.connect(dsn) as client:
        await gates.hold(app.AT_CHECKPOINT)
        first = fleet.spawn()
        run = await client.start(app.cr_steps)
        pid = await gates.waiter(app.AT_CHECKPOINT)
        assert await effects(gates, run.id) == {"one": 1}
        fleet.sigkill(first)
        if then == "terminate":
            await gates.terminate(pid)
            await gates.release(app.AT_CHECKPOINT)
            assert await events(gates, run.id) == []
        else:
            await gates.release(app.AT_CHECKPOINT)
            await gates.gone(pid)
            assert await events(gates, run.id) == [(0, "step", "gated_one", "completed")]
        fleet.spawn()
        assert await run.result(timeout=60) == ["one", "two"]
        assert await effects(gates, run.id) == {
            "one": 1 if then == "commit" else 2,
            "two": 1,
        }


@pytest.mark.timeout(120)
async def test_kill_right_after_a_step_checkpoint_committed(dsn: str, tmp_path: Path) -> None:
    async with setup(dsn, tmp_path) as (fleet, gates), durable.connect(dsn) as client:
        await gates.hold(app.NEXT_STEP)
        first = fleet.spawn()
        run = await client.start(app.cr_steps)
        await gates.waiter(app.NEXT_STEP)
        assert await events(gates, run.id) == [(0, "step", "gated_one", "completed")]
        fleet.sigkill(first)
        await gates.release(app.NEXT_STEP)
        fleet.spawn()
        assert await run.result(timeout=60) == ["one", "two"]
        assert await effects(gates, run.id) == {"one": 1, "two": 2}


# -- a step's backoff ---------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["failure_committing", "sleep_committing", "suspended"])
async def test_kill_during_a_suspending_backoff(dsn: str, tmp_path: Path, when: str) -> None:
    """Try 1 fails and its backoff (6 s) suspends the workflow. SIGKILL while the backoff's
    sleep is being written (it then commits after the daemon died), or once suspended:
    the next daemon waits the backoff out and runs try 2; try 1 never runs again."""
    async with setup(dsn, tmp_path) as (fleet, gates), durable.connect(dsn) as client:
        gate = app.AT_FAILED_CHECKPOINT if when == "failure_committing" else app.AT_CHECKPOINT
        if when != "suspended":
            await gates.hold(gate)
        first = fleet.spawn()
        run = await client.start(app.cr_backoff)
        if when != "suspended":
            pid = await gates.waiter(gate)
            fleet.sigkill(first)
            await gates.release(gate)
            await gates.gone(pid)
        else:
            await wait_status(dsn, run.id, "waiting", timeout=30)
            fleet.sigkill(first)
        assert await events(gates, run.id) == [
            (0, "step", "gated_flaky", "failed"),
            (1, "sleep", "gated_flaky (backoff)", "completed"),
        ][: 1 if when == "failure_committing" else 2]
        fleet.spawn()
        assert await run.result(timeout=60) == 2
        assert await effects(gates, run.id) == {"flaky": 2}
        wake = await gates.val(
            "select wake_at from durable.events where task_id = $1 and seq = 1", run.id
        )
        log = await events(gates, run.id)
        assert log == [
            (0, "step", "gated_flaky", "failed"),
            (1, "sleep", "gated_flaky (backoff)", "completed"),
            (2, "step", "gated_flaky", "completed"),
        ]
        second_try = await gates.val(
            "select min(at) from cr_effects where task_id = $1 and name = 'flaky'"
            " and at > (select min(at) from cr_effects where task_id = $1)",
            run.id,
        )
        assert second_try >= wake  # the backoff was waited out


# -- completions -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("then", ["commit", "terminate"])
async def test_daemon_killed_while_a_completion_commits(
    dsn: str, tmp_path: Path, then: str
) -> None:
    async with setup(dsn, tmp_path) as (fleet, gates), durable.connect(dsn) as client:
        await gates.hold(app.AT_COMPLETION)
        first = fleet.spawn()
        handle = await client.start(app.cr_gated_task, 7)
        pid = await gates.waiter(app.AT_COMPLETION)
        fleet.sigkill(first)
        if then == "terminate":
            await gates.terminate(pid)
            await gates.release(app.AT_COMPLETION)
            assert await gates.val(
                "select status from durable.tasks where id = $1", handle.id
            ) == "running"
        else:
            await gates.release(app.AT_COMPLETION)
            await gates.gone(pid)
            assert await gates.val(
                "select status from durable.tasks where id = $1", handle.id
            ) == "completed"
        fleet.spawn()
        assert await handle.result(timeout=60) == "done-7"
        # Let a reaper pass over it (the lease has long expired), then count.
        await gates.fetch("select 1")
        assert await effects(gates, 7) == {"task": 1 if then == "commit" else 2}
        assert await gates.val(
            "select count(*) from cr_completions where task_id = $1", handle.id
        ) == 1


# -- a fleet-wide queue limit ---------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_queue_limit_holds_across_kills_and_reaping(dsn: str, tmp_path: Path) -> None:
    limit, tasks, kills = 2, 16, 3
    async with setup(dsn, tmp_path) as (fleet, gates), durable.connect(dsn) as client:
        store = await Store.open(dsn)
        try:
            await store.set_queue_limits(app.LIMITED, limit, None, None)
        finally:
            await store.close()
        fleet.spawn()
        fleet.spawn()
        handles = [await client.start(app.cr_limited, i, 0.4) for i in range(tasks)]
        for _ in range(kills):
            # A daemon with a task live right now (its row's connection open).
            async def victim() -> int | None:
                alive = {p.pid for p in fleet.procs if p.poll() is None}
                pids = await gates.fetch(
                    "select distinct l.pid from cr_live l join pg_stat_activity a"
                    " on a.pid = l.backend"
                )
                hit = [r["pid"] for r in pids if r["pid"] in alive]
                return hit[0] if hit else None

            pid = await wait_for(victim, timeout=60)
            fleet.sigkill(next(p for p in fleet.procs if p.pid == pid))
            fleet.spawn()
        for i, h in enumerate(handles):
            assert await h.result(timeout=120) == i
        seen = await gates.val("select max(seen) from cr_seen")
        assert seen is not None and seen <= limit, f"{seen} tasks ran at once (limit {limit})"
        killed = await gates.val(
            "select count(*) from cr_live l where not exists"
            " (select 1 from pg_stat_activity a where a.pid = l.backend)"
        )
        assert killed >= kills  # each kill interrupted at least one running task



# -- a lease that lapses under a COMMIT the task row's lock holds up ---------------------------


@pytest.mark.timeout(180)
async def test_a_long_commit_keeps_its_lease_and_the_workflow_runs_once(
    dsn: str, tmp_path: Path
) -> None:
    """A transactional step's COMMIT waits (a deferred trigger, or any lock a business
    table's commit can wait on) longer than the lease. The fence holds the task row
    locked until the commit ends, and heartbeats pass locked rows by: the lease ran out
    under a live daemon, a reaper requeued the task the moment the commit let the row go,
    and a second attempt ran beside the first (a queue limit of 1 exceeded, the next step
    run twice without any crash). A renewal queued behind the commit takes the row first."""
    trials = 4
    async with setup(dsn, tmp_path) as (fleet, gates), durable.connect(dsn) as client:
        store = await Store.open(dsn)
        try:
            await store.set_queue_limits(app.QUEUE, 1, None, None)
        finally:
            await store.close()
        fleet.spawn()
        fleet.spawn()
        most = 0
        for _ in range(trials):
            await gates.hold(app.AT_COMMIT)
            await gates.hold(app.NEXT_STEP)
            run = await client.start(app.cr_transaction, False)
            await gates.waiter(app.AT_COMMIT)

            async def lapsed(task_id: int = run.id) -> bool:
                return bool(await gates.val(
                    "select lease_until < now() from durable.tasks where id = $1", task_id
                ))  # fmt: skip

            await wait_for(lapsed, timeout=30)
            await gates.release(app.AT_COMMIT)

            async def waiters() -> int:
                n: int = await gates.val(
                    "select count(*) from pg_locks where locktype = 'advisory'"
                    " and not granted and objid = $1",
                    app.NEXT_STEP,
                )
                return n

            # Watch the next step until the owner's heartbeat has surely come (a lease).
            await wait_for(waiters, timeout=30)
            deadline = await gates.val("select clock_timestamp() + interval '3 seconds'")
            while await gates.val("select clock_timestamp() < $1", deadline):
                most = max(most, await waiters())
            await gates.release(app.NEXT_STEP)
            assert await run.result(timeout=60) == ["biz", "after"]
        assert await gates.val("select count(*) from cr_business") == trials
        runs = await gates.fetch(
            "select task_id, count(*) as n from cr_effects where name = 'after'"
            " group by task_id"
        )
        assert most <= 1, f"{most} attempts of queue-limited workflows ran the next step at once"
        assert all(r["n"] == 1 for r in runs), [tuple(r) for r in runs]

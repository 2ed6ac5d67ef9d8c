"""How a daemon finds work when the listener lets it down: a LISTEN connection killed and
kept away from its server, scheduled tasks due while the daemon idles, a flood of
notifications for queues it does not serve, and pauses that race claims held ahead.

Task names here start with ``la_``; their queues too.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import durable
from durable import worker as worker_module
from durable.admin import Admin
from durable.daemon import Daemon
from durable.store import Store
from durable.worker import QueueWorker
from tests.support.helpers import execute, fetchval, running_daemon, wait_for, wait_status

RAN: Counter[str] = Counter()
GATE = asyncio.Event()
BLOCKING = asyncio.Event()


@durable.task(name="la_noop", queue="la_q")
async def la_noop(key: str) -> str:
    RAN[key] += 1
    return key


@durable.task(name="la_block", queue="la_p", priority=10)
async def la_block() -> str:
    BLOCKING.set()
    await GATE.wait()
    return "unblocked"


@durable.task(name="la_follow", queue="la_p")
async def la_follow(key: str) -> str:
    RAN[key] += 1
    return key


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def lateness(dsn: str, task_id: int, since: str) -> float:
    """Seconds between the task's ``since`` column and its start, on the database's clock."""
    return float(await fetchval(
        dsn, f"select extract(epoch from started_at - {since}) from durable.tasks where id = $1",
        task_id,
    ))  # fmt: skip


async def _true(value: bool) -> bool:
    return value


@pytest.mark.timeout(60)
async def test_a_listener_kept_from_its_server_leaves_tasks_to_the_poll(dsn: str) -> None:
    async with (
        durable.connect(dsn) as client,
        running_daemon(dsn, queues="la_q=4", poll_interval="1", http="127.0.0.1:0") as daemon,
    ):
        listener = daemon.listener
        assert listener is not None and daemon.http is not None
        port = daemon.http.port
        assert (await asyncio.to_thread(readyz, port))[0] == 200
        # Its server is unreachable from now on (the pool's is fine): the connection is cut
        # and every reconnect is refused.
        listener.dsn = "postgresql://postgres@127.0.0.1:1/postgres"
        await execute(dsn, "select pg_terminate_backend($1)", listener.backend_pid)
        await wait_for(lambda: _true(not listener.connected and listener.last_error is not None))
        status, body = await asyncio.to_thread(readyz, port)
        assert status == 503 and body["listener"] is False and "listener_error" in body
        # Tasks enqueued meanwhile start within the poll interval (1 s), one after another.
        for i in range(4):
            handle = await client.start(la_noop, f"down-{i}")
            assert await handle.result(timeout=10) == f"down-{i}"
            assert await lateness(dsn, handle.id, "created_at") < 1.0 + 0.5
        assert daemon.workers["la_q"].wakeups["poll"] >= 1
        # Back: ready again, and served by notification.
        listener.dsn = dsn
        await wait_for(lambda: _true(listener.connected), timeout=20)
        assert (await asyncio.to_thread(readyz, port))[0] == 200
        handle = await client.start(la_noop, "back")
        assert await handle.result(timeout=10) == "back"


@pytest.mark.timeout(60)
async def test_scheduled_tasks_start_at_their_times_not_at_the_next_poll(dsn: str) -> None:
    async with (
        durable.connect(dsn) as client,
        # A poll far longer than the test: every start below is the wake-up computation's.
        running_daemon(dsn, queues="la_q=4", poll_interval="60") as daemon,
    ):
        worker = daemon.workers["la_q"]
        await worker.claimed_once.wait()
        now = datetime.now(UTC)
        far = await client.start(la_noop, "far", delay=86_400)
        past = await client.start(la_noop, "past", run_at=now - timedelta(hours=1))
        # Out of order, so that each one enqueued moves the next due time earlier or not.
        delays = [1.6, 0.4, 1.2, 0.8, 2.0]
        handles = [await client.start(la_noop, f"at-{d}", delay=d) for d in delays]
        assert await past.result(timeout=10) == "past"
        for d, h in zip(delays, handles, strict=True):
            assert await h.result(timeout=10) == f"at-{d}"
            late = await lateness(dsn, h.id, "run_at")
            assert 0 <= late < 0.5, (d, late)
        assert (await client.get(far.id)).status == "queued"
        # Woken by each notification and each due time, never spinning.
        assert sum(worker.wakeups.values()) < 40, worker.wakeups


@pytest.mark.timeout(60)
async def test_a_due_time_moved_by_a_database_clock_step_is_neither_missed_nor_spun_on(
    dsn: str,
) -> None:
    # The database's clock steps back an hour relative to this process's, as the daemon
    # last measured it (what a clock step between two heartbeats looks like).
    async with (
        durable.connect(dsn) as client,
        running_daemon(dsn, queues="la_q=4", poll_interval="2", lease="30") as daemon,
    ):
        worker = daemon.workers["la_q"]
        store: Store = daemon.store  # type: ignore[assignment]  # set once started
        await worker.claimed_once.wait()
        store.db.clock_offset = store.clock_offset + 3600  # we think it is an hour later
        handle = await client.start(la_noop, "stepped", delay=0.5)
        assert await handle.result(timeout=10) == "stepped"
        # Not started before it was due; no later than a poll after; and the loop did not
        # spin while its idea of "now" was wrong.
        late = await lateness(dsn, handle.id, "run_at")
        assert 0 <= late < 2.0 + 0.5
        assert sum(worker.wakeups.values()) < 40, worker.wakeups


@pytest.mark.timeout(60)
async def test_a_flood_of_notifications_for_other_queues_costs_the_loop_nothing(
    dsn: str,
) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, queues="la_q=4") as daemon:
        worker = daemon.workers["la_q"]
        await worker.claimed_once.wait()
        before = dict(worker.wakeups)
        claimed = worker.claimed
        # 20,000 distinct payloads in one statement: each is delivered.
        await execute(dsn, "select pg_notify('durable_ready', 'la_other_' || i)"
                           " from generate_series(1, 20000) i")
        # A notification of its own queue sent after them arrives after them all.
        handle = await client.start(la_noop, "after-flood")
        assert await handle.result(timeout=20) == "after-flood"
        assert worker.wakeups["notify"] - before["notify"] <= 2
        assert worker.claimed == claimed + 1


async def _enqueue_blocked(client: durable.Client) -> list[int]:
    """A blocker and three tasks behind it, enqueued before the daemon starts: its first
    claim takes the blocker into the one slot and the three ahead of it."""
    GATE.clear()
    BLOCKING.clear()
    await client.start(la_block)
    return [(await client.start(la_follow, f"p-{i}")).id for i in range(3)]


async def _held_ahead(daemon: Daemon) -> QueueWorker:
    worker = daemon.workers["la_p"]
    await BLOCKING.wait()
    await wait_for(lambda: _true(len(worker.waiting) == 3))
    return worker


@pytest.fixture
def long_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks claimed ahead are held until something else hands them back."""
    monkeypatch.setattr(worker_module, "HOLD_LIMIT", 60.0)


@pytest.mark.timeout(60)
async def test_a_pause_hands_held_tasks_back_unstarted_and_a_resume_runs_each_once(
    dsn: str, long_hold: None
) -> None:
    RAN.clear()
    async with durable.connect(dsn) as client:
        follows = await _enqueue_blocked(client)
        async with running_daemon(dsn, queues="la_p=1", claim_ahead="3") as daemon:
            worker = await _held_ahead(daemon)
            await Admin(client.store).pause_queue("la_p")
            await wait_for(lambda: _true(worker.given_back == 3), timeout=10)
            for task_id in follows:
                info = await client.get(task_id)
                assert (info.status, info.attempt, info.lease_until) == ("queued", 1, None)
            # The slot frees while paused: nothing starts in it.
            GATE.set()
            await wait_for(lambda: _true(worker.in_flight == 0))
            polls = sum(worker.wakeups.values())
            await wait_for(lambda: _true(sum(worker.wakeups.values()) > polls + 1), timeout=10)
            assert sum(RAN.values()) == 0
            await Admin(client.store).resume_queue("la_p")
            for task_id in follows:
                await wait_status(dsn, task_id, "completed")
            assert Counter({f"p-{i}": 1 for i in range(3)}) == RAN


@pytest.mark.timeout(60)
async def test_a_pause_resumed_at_once_loses_no_held_task(dsn: str) -> None:
    RAN.clear()
    async with durable.connect(dsn) as client:
        follows = await _enqueue_blocked(client)
        async with running_daemon(dsn, queues="la_p=1", claim_ahead="3") as daemon:
            await _held_ahead(daemon)
            await Admin(client.store).pause_queue("la_p")
            await Admin(client.store).resume_queue("la_p")
            GATE.set()
            for task_id in follows:
                await wait_status(dsn, task_id, "completed")
            assert Counter({f"p-{i}": 1 for i in range(3)}) == RAN
            for task_id in follows:
                assert (await client.get(task_id)).attempt == 1


@pytest.mark.timeout(60)
async def test_a_held_task_whose_lease_is_lost_is_never_started_by_its_holder(
    dsn: str, long_hold: None
) -> None:
    RAN.clear()
    async with durable.connect(dsn) as client:
        follows = await _enqueue_blocked(client)
        async with running_daemon(dsn, queues="la_p=1", claim_ahead="3") as daemon:
            worker = await _held_ahead(daemon)
            # Another daemon's reaper took the first one over (its claim is no longer ours).
            stolen = follows[0]
            await execute(dsn, "update durable.tasks set claim_token = claim_token + 1"
                               " where id = $1", stolen)
            assert daemon._attempts is not None
            daemon._attempts.beat_soon()
            await wait_for(lambda: _true(
                daemon.attempts[stolen].reason == "lease_lost" if stolen in daemon.attempts
                else True))
            GATE.set()
            for task_id in follows[1:]:
                await wait_status(dsn, task_id, "completed")
            await wait_for(lambda: _true(worker.in_flight == 0 and not worker.waiting))
            assert RAN[f"p-{0}"] == 0
            assert (await client.get(stolen)).status == "running"  # still the thief's


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_flood_of_single_statement_enqueues_is_served_in_batches(dsn: str) -> None:
    # 5,000 tasks, each its own statement and transaction (psql in autocommit): as many
    # notifications. The daemon keeps up, claims in batches, and is done soon after the
    # last one.
    count = 5_000
    script = "".join(
        f"select durable.start('la_noop', '[\"flood-{i}\"]', queue => 'la_q', "
        f"allow_unknown => true);\n" for i in range(count)
    )
    RAN.clear()
    async with running_daemon(dsn, queues="la_q=32") as daemon:
        worker = daemon.workers["la_q"]
        await worker.claimed_once.wait()
        proc = await asyncio.create_subprocess_exec(
            "psql", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", dsn,
            stdin=asyncio.subprocess.PIPE,
        )
        await proc.communicate(script.encode())
        assert proc.returncode == 0
        done_at = await fetchval(dsn, "select clock_timestamp()")
        await wait_for(lambda: _true(sum(RAN.values()) == count), timeout=120)
        last = await fetchval(dsn, "select max(finished_at) from durable.tasks")
        assert (last - done_at).total_seconds() < 5.0
        assert sum(RAN.values()) == count and max(RAN.values()) == 1
        # Woken at most once per notification, and never by the poll meanwhile.
        assert worker.wakeups["notify"] <= count

"""What a daemon costs with little or no work, and with many queues.

Statements are counted as the daemon's own pool sends them (asyncpg's query logger on
each of its connections, by name in queries.sql), over a counted number of the daemon's
polls or housekeeping passes, never over a span of time. Task names here start with
``ic_``; the queues are ``ic_q0`` to ``ic_q499``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from durable.daemon import KEPT_CONNECTIONS, WARM_CONNECTIONS, Daemon
from durable.store import database
from durable.store.schema import queries
from durable.worker import QueueWorker
from tests.support.helpers import ROOT, execute, running_daemon, wait_for

MANY = 500
QUEUES = [f"ic_q{i}" for i in range(MANY)]
CLAIMING = {"claim", "next_due", "claim_delay"}
"""What a queue loop sends when it looks for work of its own."""


@durable.task(name="ic_noop", queue="ic_q0")
async def ic_noop(x: str) -> str:
    return x


class Statements:
    """Every statement the daemon's pool sends, by its name in queries.sql (else its
    first characters), in the order sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self._names = {text: name for name, text in queries().items()}

    def log(self, record: Any) -> None:
        if record.conn_params.server_settings.get("application_name") != "durable":
            return
        name = self._names.get(record.query, record.query[:60])
        if record.args and record.args[0] == "" and name == "claim":
            name = "warm_up"  # a new connection's claim of nothing (Database.open)
        self.sent.append(name)

    def since(self, mark: int) -> Counter[str]:
        return Counter(self.sent[mark:])

    async def wait(self, name: str, count: int, mark: int) -> None:
        async def seen() -> bool:
            return self.since(mark)[name] >= count

        await wait_for(seen, timeout=30, interval=0.01)


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> Statements:
    """Counts what every pool opened from now on sends (the daemon's, by its name)."""
    counted = Statements()
    real = database.create_pool

    class Counting(asyncpg.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.add_query_logger(counted.log)

    def create_pool(*args: Any, **kwargs: Any) -> Any:
        return real(*args, connection_class=Counting, **kwargs)

    monkeypatch.setattr(database, "create_pool", create_pool)
    return counted


async def polls(daemon: Daemon, count: int, *, drive: bool = False) -> None:
    """Wait for ``count`` more polls of the daemon (asking for each when ``drive``)."""
    with anyio.fail_after(30):
        for _ in range(count):
            done = daemon.poller.poll_done
            if drive:
                daemon.poller.poll_soon()
            await done.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("queues", [1, 50])
async def test_an_idle_daemon_sends_one_statement_per_poll_whatever_its_queues(
    dsn: str, statements: Statements, queues: int
) -> None:
    # A short poll interval and many cycles: each queue loop polling on its own timer
    # sent a claim and a next_due per queue per interval.
    cycles = 20
    serving = QUEUES[:queues]
    async with running_daemon(
        dsn, queues=",".join(serving), poll_interval="0.05", lease="600"
    ) as daemon:
        await daemon.ready.wait()
        # Every loop looks once (a notification each), then idles.
        mark = len(statements.sent)
        await execute(dsn, "select pg_notify('durable_ready', q) from unnest($1::text[]) q",
                      serving)
        await statements.wait("next_due", queues, mark)
        await polls(daemon, 2)
        mark = len(statements.sent)
        await polls(daemon, cycles)
        sent = statements.since(mark)
    claiming = {name: n for name, n in sent.items() if name in CLAIMING}
    assert claiming == {}, sent
    # One poll statement per cycle (the window may cut one in flight at either end).
    assert cycles - 1 <= sent["due_queues"] <= cycles + 1, sent
    # The housekeeping loops run at the poll interval too, one statement each while
    # nothing is due; nothing else runs (the heartbeat's interval is lease/3 = 200 s).
    assert set(sent) <= {"due_queues", "timer_wait", "next_schedule"}, sent
    assert sum(sent.values()) <= 4 * cycles, sent


@pytest.mark.timeout(120)
async def test_a_poll_finds_lost_work_in_every_queue_and_wakes_only_those(
    dsn: str, statements: Statements
) -> None:
    # 500 queues, a poll interval longer than the test, and no notifications: the
    # listener's server is unreachable. One poll asked for finds the work of the first
    # queue and of the last, and only their loops claim.
    async with (
        durable.connect(dsn) as client,
        running_daemon(dsn, queues=",".join(QUEUES), poll_interval="60") as daemon,
    ):
        await daemon.ready.wait()
        listener = daemon.listener
        assert listener is not None
        listener.dsn = "postgresql://postgres@127.0.0.1:1/postgres"
        await execute(dsn, "select pg_terminate_backend($1)", listener.backend_pid)
        await wait_for(_true_when(lambda: not listener.connected))
        first, last = daemon.workers[QUEUES[0]], daemon.workers[QUEUES[-1]]
        before = {q: dict(w.wakeups) for q, w in daemon.workers.items()}
        handles = [await client.start(ic_noop, "a", queue=QUEUES[0]),
                   await client.start(ic_noop, "b", queue=QUEUES[-1])]
        mark = len(statements.sent)
        await polls(daemon, 1, drive=True)
        assert [await h.result(timeout=20) for h in handles] == ["a", "b"]
        await wait_for(_true_when(lambda: first.in_flight == 0 and last.in_flight == 0))
        sent = statements.since(mark)
        after = {q: dict(w.wakeups) for q, w in daemon.workers.items()}
    assert {q for q in after if after[q] != before[q]} == {QUEUES[0], QUEUES[-1]}
    for q in (QUEUES[0], QUEUES[-1]):
        assert after[q]["poll"] - before[q]["poll"] == 1
        assert after[q]["notify"] == before[q]["notify"]
    # Two loops looked: a claim each (and the look for more), not five hundred.
    assert sent["claim"] <= 4 and sent["next_due"] <= 4, sent


@pytest.mark.timeout(120)
async def test_a_listener_reconnect_costs_one_poll_not_a_claim_per_queue(
    dsn: str, statements: Statements
) -> None:
    # Notifications sent while the listener was away are lost: every queue is looked at
    # again, in one statement; each queue loop claiming once was 500 claims per reconnect.
    async with running_daemon(dsn, queues=",".join(QUEUES), poll_interval="60") as daemon:
        await daemon.ready.wait()
        listener = daemon.listener
        assert listener is not None
        polled = daemon.poller.poll_done
        mark = len(statements.sent)
        await execute(dsn, "select pg_terminate_backend($1)", listener.backend_pid)
        with anyio.fail_after(30):
            await polled.wait()
        assert listener.reconnects == 1
        sent = statements.since(mark)
        assert all(sum(w.wakeups.values()) == 0 for w in daemon.workers.values())
    assert sent["due_queues"] == 1 and not CLAIMING & set(sent), sent


@pytest.mark.timeout(120)
async def test_idle_queue_loops_give_their_kept_connections_back(
    dsn: str, statements: Statements
) -> None:
    # The first queue loops keep a connection for their claims; held while idle, a daemon
    # of many queues held eight more connections than a daemon of one, and a fleet of
    # them ran the server out (max_connections). Kept while busy, given back once quiet.
    serving = QUEUES[:KEPT_CONNECTIONS + 2]
    async with running_daemon(dsn, queues=",".join(serving), poll_interval="0.05") as daemon:
        await daemon.ready.wait()
        kept = [w for w in daemon.workers.values() if w._conn is not None]
        assert len(kept) == KEPT_CONNECTIONS
        mark = len(statements.sent)
        await execute(dsn, "select pg_notify('durable_ready', q) from unnest($1::text[]) q",
                      serving)
        # Each loop claimed, on its kept connection, and looked for its next due task.
        await statements.wait("next_due", len(serving), mark)
        # Quiet for a poll interval: every kept connection is back in the pool.
        await wait_for(_true_when(lambda: all(w._conn._conn is None for w in kept)))  # type: ignore[union-attr]
        store = daemon.store
        assert store is not None
        # And the pool keeps open only what a daemon of one queue keeps.
        assert store.pool.get_min_size() == WARM_CONNECTIONS + 1


def _true_when(check: Callable[[], bool]) -> Callable[[], Any]:
    async def probe() -> bool:
        return check()

    return probe


@pytest.mark.timeout(120)
async def test_a_daemon_of_500_queues_starts_with_one_poll_and_serves_the_last_as_the_first(
    dsn: str, statements: Statements
) -> None:
    async with (
        durable.connect(dsn) as client,
        running_daemon(dsn, queues=",".join(QUEUES), poll_interval="60") as daemon,
    ):
        await daemon.ready.wait()
        started = statements.since(0)
        # Ready with no claim: the first poll found nothing, in one statement.
        assert started["due_queues"] == 1 and not CLAIMING & set(started), started
        # A task in the last queue is claimed on its notification as one in the first.
        for queue in (QUEUES[-1], QUEUES[0]):
            worker: QueueWorker = daemon.workers[queue]
            handle = await client.start(ic_noop, queue, queue=queue)
            assert await handle.result(timeout=20) == queue
            assert worker.wakeups["notify"] >= 1 and worker.claimed == 1
        # Nothing else woke up meanwhile.
        others = [w for q, w in daemon.workers.items() if q not in (QUEUES[0], QUEUES[-1])]
        assert all(sum(w.wakeups.values()) == 0 and w.claimed == 0 for w in others)
        assert statements.since(0)["claim"] <= 6


@pytest.mark.timeout(120)
async def test_idle_housekeeping_sends_one_statement_per_pass(
    dsn: str, statements: Statements
) -> None:
    # Timers and deadlines: one look at what is next while nothing is due (the wake-up
    # and the expiry passes ran every time). Cron schedules: the same.
    passes = 10
    async with running_daemon(dsn, queues=QUEUES[0], poll_interval="0.05", lease="600"):
        await statements.wait("timer_wait", 2, 0)
        mark = len(statements.sent)
        await statements.wait("timer_wait", passes, mark)
        await statements.wait("next_schedule", passes, mark)
        sent = statements.since(mark)
    assert not {"wake_timers", "expire_deadlines", "due_schedules"} & set(sent), sent


@pytest.mark.timeout(180)
async def test_the_idle_cost_script_reports_each_figure(server_dsn: str) -> None:
    # bin/idle-cost, which measured the figures in docs/performance.md, at a size that
    # takes seconds.
    done = await anyio.to_thread.run_sync(partial(
        subprocess.run,
        [sys.executable, str(ROOT / "bin" / "idle-cost"), "--database-url", server_dsn,
         "--queues", "3", "--seconds", "1", "--settle", "0", "--promptness", "1",
         "--env", "DURABLE_POLL_INTERVAL=0.2"],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    ))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["queues"] == 3 and len(report["ready_s"]) == 1
    assert report["statements_per_s"] > 0 and report["connections"] >= 2
    assert {"q0_notified_ms", "q2_notified_ms"} <= set(report)


@pytest.mark.timeout(120)
async def test_waiting_for_an_idle_daemon_of_500_queues_costs_one_statement_a_check(
    dsn: str, statements: Statements
) -> None:
    async with durable.serve(dsn, queues=QUEUES, env={}, poll_interval="60") as service:
        await service.ready()
        mark = len(statements.sent)
        await service.idle()
        sent = statements.since(mark)
    # Idle at the first check: one statement for the 500 queues, not one per queue.
    assert sent["due_queues"] == 1 and not CLAIMING & set(sent), sent

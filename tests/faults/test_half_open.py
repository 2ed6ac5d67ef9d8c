"""A network path that stops answering without closing (a half-open socket): the daemon
notices within its lease, stops its attempts, and comes back once when the path does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest
from anyio.abc import TaskGroup, TaskStatus

import durable
from durable.daemon import FINAL_WRITES, Daemon
from durable.listener import Listener
from durable.registry import Definition, Registry, registry
from durable.store import Store
from durable.store.database import Database
from durable.tools.soak.faults import Proxy
from durable.worker import CLAIM_STOP_TIMEOUT
from tests.support.helpers import execute, fetchval, running_daemon, settings, wait_for

QUEUE = "half-open"
_forever = asyncio.Event()  # never set: the task runs until it is stopped


@durable.task(queue=QUEUE, max_attempts=1)
async def ho_block() -> None:
    await _forever.wait()


@pytest.fixture
async def proxy(dsn: str) -> AsyncIterator[tuple[Proxy, str]]:
    """A TCP proxy to the test's server, and ``dsn`` through it."""
    parts = urlsplit(dsn)
    p = Proxy(parts.port or 5432)
    await p.start()
    user = parts.netloc.rpartition("@")[0]
    via = urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{p.port}"))
    try:
        yield p, via
    finally:
        await p.close()


@pytest.mark.timeout(60)
async def test_a_listener_whose_pings_stop_reconnects_once_the_path_is_back(
    dsn: str, proxy: tuple[Proxy, str]
) -> None:
    p, via = proxy
    heard: list[str] = []
    listener = Listener(
        via, on_ready=heard.append, on_control=lambda _: None, on_reconnect=lambda: None,
        keepalive=0.1, ping_timeout=0.2,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        p.stall()

        async def disconnected() -> bool:
            return not listener.connected

        await wait_for(disconnected, timeout=10)  # the ping went unanswered
        p.resume()

        async def back() -> bool:
            return listener.connected and listener.reconnects >= 1

        await wait_for(back, timeout=20)
        # The new connection stays up: notifications keep arriving through it, over
        # several keepalive rounds, with no further reconnect.
        for i in range(5):
            await execute(dsn, "select pg_notify('durable_ready', $1)", f"q{i}")

            async def heard_it(payload: str = f"q{i}") -> bool:
                return payload in heard

            await wait_for(heard_it, timeout=10)
        assert listener.reconnects == 1, f"{listener.reconnects} reconnects: a reconnect storm"
        tg.cancel_scope.cancel()


@pytest.mark.timeout(60)
async def test_a_daemon_cut_off_by_a_stalled_path_stops_its_attempts_within_its_lease(
    dsn: str, proxy: tuple[Proxy, str]
) -> None:
    p, via = proxy
    async with durable.connect(dsn) as client:
        handle = await client.start(ho_block)
        async with running_daemon(via, queues=QUEUE, lease="1", shutdown_grace="0") as daemon:

            async def running() -> list[object]:
                return list(daemon.attempts.values())

            [attempt] = await wait_for(running, timeout=20)
            p.stall()
            try:
                # Nothing errors while the path is stalled; the heartbeat's own deadline
                # is what notices. The attempt must stop while the stall goes on.
                async def stopped() -> bool:
                    return attempt.job is not None and attempt.job.done()

                await wait_for(stopped, timeout=10)
                assert attempt.reason == "lease_lost"
            finally:
                p.resume()
        # Its lease expired and its one attempt is spent: reaped, not left running.
        info = await client.get(handle.id)
        assert info.status in ("running", "failed")


@pytest.mark.timeout(60)
async def test_a_daemon_stopped_while_its_path_is_stalled_exits_within_its_bounds(
    dsn: str, proxy: tuple[Proxy, str]
) -> None:
    """SIGTERM while the network path hangs: the grace period, then at most FINAL_WRITES
    for the last writes (the hand-back of the running task finds no answer), then exit."""
    p, via = proxy
    async with durable.connect(dsn) as client:
        handle = await client.start(ho_block)
        daemon = Daemon(settings(queues=QUEUE, lease="30", shutdown_grace="1"), registry, via)
        async with anyio.create_task_group() as tg:
            ended = await serve(tg, daemon)

            async def running() -> list[object]:
                return list(daemon.attempts.values())

            [attempt] = await wait_for(running, timeout=20)
            p.stall()
            try:
                with anyio.fail_after(1 + FINAL_WRITES + CLAIM_STOP_TIMEOUT + 10):
                    daemon.stop()
                    await ended.wait()
            finally:
                p.resume()
        assert attempt.reason == "shutdown"
        # The hand-back never reached the server: the task stays running until its lease
        # expires and another daemon takes it.
        assert (await client.get(handle.id)).status == "running"


@pytest.mark.timeout(60)
async def test_a_look_at_what_is_due_in_flight_on_a_stalled_path_does_not_hold_the_shutdown(
    dsn: str, proxy: tuple[Proxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The moment that held the stop above until the path came back (on a loaded machine):
    the path stalls as the queue loop, the task just claimed, sends its look at what is
    due next. A stop bounded a claim in flight, not that look."""
    p, via = proxy
    async with durable.connect(dsn) as client:
        handle = await client.start(ho_block)
        daemon = Daemon(settings(queues=QUEUE, lease="30", shutdown_grace="1"), registry, via)
        async with anyio.create_task_group() as tg:
            ended = await serve(tg, daemon)
            store = daemon.store
            assert store is not None
            look = store.next_due
            looking = anyio.Event()

            async def stalled(*args: Any) -> Any:
                p.stall()  # the look goes out onto a path that no longer answers
                looking.set()
                return await look(*args)

            # In place before the loop's first claim, which waits for the daemon's poll.
            monkeypatch.setattr(store, "next_due", stalled)
            await looking.wait()
            [attempt] = daemon.attempts.values()
            try:
                with anyio.fail_after(1 + FINAL_WRITES + CLAIM_STOP_TIMEOUT + 10):
                    daemon.stop()
                    await ended.wait()
            finally:
                p.resume()
        assert attempt.reason == "shutdown"
        assert (await client.get(handle.id)).status == "running"


@pytest.mark.timeout(60)
async def test_a_claim_in_flight_on_a_stalled_path_does_not_hold_the_shutdown(
    dsn: str, proxy: tuple[Proxy, str]
) -> None:
    p, via = proxy
    daemon = Daemon(settings(queues=QUEUE, poll_interval="0.1", shutdown_grace="1"), registry,
                    via)
    async with anyio.create_task_group() as tg:
        ended = await serve(tg, daemon)
        worker = daemon.workers[QUEUE]
        await worker.claimed_once.wait()
        p.stall()
        try:
            # Woken as by a notification (an idle loop claims only when woken), the loop
            # claims, and the claim hangs; so does the daemon's poll.
            worker.notify()

            async def claiming() -> bool:
                return worker._statement is not None

            await wait_for(claiming, timeout=20)
            with anyio.fail_after(1 + FINAL_WRITES + CLAIM_STOP_TIMEOUT + 10):
                daemon.stop()
                await ended.wait()
        finally:
            p.resume()


async def serve(tg: TaskGroup, daemon: Daemon) -> anyio.Event:
    """Start ``daemon`` in ``tg``; the event is set once its run() has returned."""
    ended = anyio.Event()

    async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await daemon.run(task_status=task_status)
        finally:
            ended.set()

    await tg.start(run)
    return ended


@pytest.mark.timeout(60)
async def test_a_listener_frozen_while_its_connection_is_terminated_reconnects(dsn: str) -> None:
    """A daemon frozen (SIGSTOP, a long GC pause, a suspended VM) while the server ends its
    LISTEN connection wakes up to a keepalive ping racing the server's goodbye. Blocking
    this event loop is that freeze: the ping must fail over, not take the daemon down."""
    import threading
    import time

    heard: list[str] = []
    listener = Listener(
        dsn, on_ready=heard.append, on_control=lambda _: None, on_reconnect=lambda: None,
        keepalive=0.05, ping_timeout=1.0,
    )

    def terminate(pid: int, done: threading.Event) -> None:
        asyncio.run(execute(dsn, "select pg_terminate_backend($1)", pid))
        done.set()

    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        for round_ in range(5):
            pid = listener.backend_pid
            assert pid is not None
            done = threading.Event()
            thread = threading.Thread(target=terminate, args=(pid, done))
            frozen = time.monotonic()
            thread.start()
            # The freeze: this loop runs nothing until the server has ended the connection
            # and the keepalive is overdue.
            done.wait(10)
            time.sleep(max(0.0, 0.1 - (time.monotonic() - frozen)))  # noqa: ASYNC251
            thread.join()

            async def back(old: int = pid) -> bool:
                return listener.connected and listener.backend_pid not in (None, old)

            await wait_for(back, timeout=20)
            await execute(dsn, "select pg_notify('durable_ready', $1)", f"r{round_}")

            async def heard_it(payload: str = f"r{round_}") -> bool:
                return payload in heard

            await wait_for(heard_it, timeout=10)
        tg.cancel_scope.cancel()


@pytest.mark.timeout(60)
async def test_a_listener_stopped_on_a_stalled_path_closes_without_waiting(
    dsn: str, proxy: tuple[Proxy, str]
) -> None:
    """Cancelled (the daemon's stop) while its path hangs, the listener leaves at once: a
    graceful close would wait its 2 s timeout for an answer, after the stop's last
    writes and past their bound."""
    p, via = proxy
    listener = Listener(via, on_ready=lambda _: None, on_control=lambda _: None,
                        on_reconnect=lambda: None)  # fmt: skip
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(listener.run)
            p.stall()
            stopped = anyio.current_time()
            tg.cancel_scope.cancel()
        # The task group's exit waited for the listener to leave.
        assert anyio.current_time() - stopped < 1.5  # under the close's 2 s
    finally:
        p.resume()
    assert not listener.connected


@pytest.mark.timeout(60)
async def test_a_kept_connection_given_up_on_a_stalled_path_is_closed_at_once(
    dsn: str, proxy: tuple[Proxy, str]
) -> None:
    """A statement on a kept connection cut short (a stop's bound on a claim, the last
    writes' deadline on a group commit) while the path hangs: the connection is closed
    then and there, not given back to the pool, whose release would wait up to 5 s for
    the server to acknowledge the cancel. The pool serves again once the path is back."""
    p, via = proxy
    store = await Store.open(via, min_size=1, max_size=2)
    try:
        kept = store.kept_connection()
        assert await kept.fetchval("select 1") == 1
        p.stall()
        try:
            with anyio.fail_after(3):  # under the release's 5 s
                with anyio.move_on_after(0.2):
                    await kept.fetchval("select 2")
                    pytest.fail("answered on a stalled path")
        finally:
            p.resume()
        assert kept._conn is None
        assert await kept.fetchval("select 3") == 3
    finally:
        store.terminate()



@durable.task(queue=QUEUE)
async def ho_add(a: int, b: int) -> int:
    return a + b


PAUSE_LOCK = "select {}(hashtextextended('durable.pause:' || $1, 0))"
"""A claim of the queue holds this advisory lock shared (migration 0019): held
exclusively here, it keeps the daemon's claim waiting in the server."""


async def waiting_in_server(dsn: str, query: str, wait_type: str) -> bool:
    """Whether a statement of this database, whose text holds ``query``, waits for a lock
    of ``wait_type`` ('advisory', 'relation'). Asked on a connection of its own: inside a
    transaction, pg_stat_activity stays as that transaction first saw it."""
    return bool(await fetchval(
        dsn,
        "select exists (select from pg_stat_activity a join pg_locks l on l.pid = a.pid"
        " where a.datname = current_database() and a.pid <> pg_backend_pid()"
        " and not l.granted and l.locktype = $2 and a.query like '%' || $1 || '%')",
        query, wait_type,
    ))


@pytest.mark.timeout(90)
async def test_a_daemon_whose_connections_die_for_good_serves_on_new_ones(
    dsn: str, proxy: tuple[Proxy, str]
) -> None:
    """Every connection the daemon holds goes silent for ever while new ones pass (a
    firewall that forgot its flows): its writes, heartbeats and catalog beats give those
    connections up and go on with new ones."""
    p, via = proxy
    async with (
        durable.connect(dsn) as client,
        running_daemon(via, queues=QUEUE, lease="2") as daemon,
    ):
        first = await client.start(ho_add, 1, 1)
        assert await first.result(timeout=20) == 2
        severed_at = await fetchval(dsn, "select now()")
        assert p.sever() > 0
        handles = [await client.start(ho_add, i, 1) for i in range(5)]
        for i, h in enumerate(handles):
            assert await h.result(timeout=30) == i + 1

        async def beating() -> bool:
            beat = await fetchval(
                dsn, "select heartbeat_at from durable.workers where id = $1", daemon.id
            )
            return bool(beat > severed_at)

        # The daemon's own beat (a pool connection's statement given up on) is back.
        await wait_for(beating, timeout=30)
        assert daemon.listener is not None and daemon.listener.connected
        assert daemon.healthy


@pytest.fixture
async def test_conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.timeout(90)
async def test_a_claim_whose_answer_never_comes_is_given_up_and_made_again(
    dsn: str, proxy: tuple[Proxy, str], test_conn: asyncpg.Connection
) -> None:
    p, via = proxy
    async with (
        durable.connect(dsn) as client,
        running_daemon(via, queues=QUEUE, lease="2"),
    ):
        warm = await client.start(ho_add, 0, 0)
        assert await warm.result(timeout=20) == 0
        await test_conn.execute(PAUSE_LOCK.format("pg_advisory_lock"), QUEUE)
        handle = await client.start(ho_add, 2, 3)  # notified: the claim goes out

        async def claim_waits() -> bool:
            return await waiting_in_server(dsn, "durable.claim", "advisory")

        await wait_for(claim_waits, timeout=20)
        assert p.sever() > 0
        # The claim goes on in the server and may take the task; its answer is lost. The
        # daemon gives the claim up and claims again on a new connection, once the
        # reaper has freed what the lost claim took.
        await test_conn.execute(PAUSE_LOCK.format("pg_advisory_unlock"), QUEUE)
        assert await handle.result(timeout=60) == 5


@pytest.mark.timeout(90)
async def test_a_poll_whose_answer_never_comes_is_given_up_and_made_again(
    dsn: str, proxy: tuple[Proxy, str], test_conn: asyncpg.Connection
) -> None:
    """Work that no notification announces is found by the poll alone: a poll lost on a
    dead connection must not end the polling."""
    p, via = proxy
    async with (
        durable.connect(dsn) as client,
        running_daemon(via, queues=QUEUE, lease="2", poll_interval="0.5"),
    ):
        warm = await client.start(ho_add, 0, 0)
        assert await warm.result(timeout=20) == 0
        lock = test_conn.transaction()
        await lock.start()
        await test_conn.execute("lock table durable.tasks in access exclusive mode")

        async def poll_waits() -> bool:
            return await waiting_in_server(dsn, "due_queues", "relation")

        await wait_for(poll_waits, timeout=20)
        assert p.sever() > 0
        await lock.rollback()
        # Started with the notification triggers off: only a poll can find it.
        async with test_conn.transaction():
            await test_conn.execute("set local session_replication_role = replica")
            handle = await client.start(ho_add, 4, 4, conn=test_conn)
        assert await handle.result(timeout=60) == 8


@pytest.mark.timeout(60)
async def test_a_pool_connection_given_up_on_a_dead_path_frees_its_place_at_once(
    proxy: tuple[Proxy, str],
) -> None:
    """A statement abandoned on a connection whose path died (a loop's deadline) must not
    leave the connection's release waiting for an answer that never comes: the pool's
    place is free for a new connection at once. Otherwise every dead connection a daemon
    meets keeps a place for ever, until the pool has none left."""
    p, via = proxy
    db = await Database.open(via, min_size=1, max_size=1)
    try:
        assert await db.pool.fetchval("select 1") == 1
        p.sever()
        with anyio.move_on_after(0.5) as given_up:
            await db.pool.fetchval("select 2")
        assert given_up.cancelled_caught
        with anyio.fail_after(10):
            assert await db.pool.fetchval("select 3") == 3
    finally:
        db.terminate()


@durable.workflow(queue=QUEUE)
async def ho_nap(ctx: durable.Context) -> str:
    await ctx.sleep(1)
    return "woke"


@pytest.mark.timeout(90)
async def test_a_timer_look_whose_answer_never_comes_is_given_up_and_made_again(
    dsn: str, proxy: tuple[Proxy, str], test_conn: asyncpg.Connection
) -> None:
    """A sleeping workflow is woken by the timer loop alone: a look at the timers lost on a
    dead connection must not end the waking."""
    p, via = proxy
    async with (
        durable.connect(dsn) as client,
        running_daemon(via, queues=QUEUE, lease="2"),
    ):
        handle = await client.start(ho_nap)

        async def asleep() -> bool:
            return (await client.get(handle.id)).status == "waiting"

        await wait_for(asleep)
        lock = test_conn.transaction()
        await lock.start()
        await test_conn.execute("lock table durable.tasks in access exclusive mode")

        async def look_waits() -> bool:
            return await waiting_in_server(dsn, "min(wake_at)", "relation")

        await wait_for(look_waits, timeout=20)
        assert p.sever() > 0
        await lock.rollback()
        assert await handle.result(timeout=60) == "woke"


async def ho_tick() -> None:
    pass


@pytest.mark.timeout(90)
async def test_a_schedule_look_whose_answer_never_comes_is_given_up_and_made_again(
    dsn: str, proxy: tuple[Proxy, str], test_conn: asyncpg.Connection
) -> None:
    """Schedules are started by the schedule loop alone: a look at them lost on a dead
    connection must not end the ticking. The scheduler runs on a clock the test moves."""
    p, via = proxy
    reg = Registry()
    reg.add(Definition(name="ho_tick", fn=ho_tick, queue=QUEUE, schedule="0 * * * *"))
    now = [datetime(2030, 1, 1, 0, 30, tzinfo=UTC)]
    daemon = Daemon(settings(queues=QUEUE, lease="2"), reg, via, clock=lambda: now[0])
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        lock = test_conn.transaction()
        await lock.start()
        await test_conn.execute("lock table durable.schedules in access exclusive mode")

        async def look_waits() -> bool:
            return await waiting_in_server(dsn, "from durable.schedules", "relation")

        await wait_for(look_waits, timeout=20)
        assert p.sever() > 0
        now[0] = datetime(2030, 1, 1, 1, 0, 30, tzinfo=UTC)  # the 01:00 tick has come
        await lock.rollback()

        async def ticked() -> bool:
            return bool(await fetchval(
                dsn, "select count(*) from durable.tasks where name = 'ho_tick'"
            ))

        await wait_for(ticked, timeout=60)
        daemon.stop()

"""A serving daemon's database sessions terminated (pg_terminate_backend) again and again,
each time while one of its statements is in flight: a claim, a checkpoint flush, a
completion, a heartbeat, and the statements of its startup. The daemon must ride every
one out (log, retry, serve on), never exit; each task must complete exactly once, and no
step may run again once its checkpoint has committed.

Every kill point is a state the test sees in the database: a daemon session waiting on a
lock the test's *gate* session holds, running the statement named; never a sleep."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from durable.registry import Definition, Registry
from durable.retry import RetryPolicy
from durable.store import Store, grant, queries, quote_ident
from tests.support.helpers import execute, fetchval, running_daemon, wait_for, wait_status
from tests.support.roles import as_app, literal

QUEUE = "kills"
FAST = RetryPolicy(base=0.05, factor=1.0, max_delay=0.05, jitter=0.0)
KILL = (
    "select count(pg_terminate_backend(pid)) from pg_stat_activity"
    " where application_name = 'durable' and pid <> pg_backend_pid()"
)

GATES = {
    # A claim of a queue with a limit takes the queue's advisory lock first.
    "claim": ("claim", "select pg_advisory_xact_lock(hashtextextended('durable.queue:' || $1, 0))"),
    # A checkpoint flush reads its workflows' rows FOR SHARE; a completion updates its rows
    # (plain tasks alone: complete_tasks).
    "checkpoint": ("checkpoint", "select id from durable.tasks where status = 'running'"
                   " and name = 'kill_flow' for update"),
    "complete": ("complete_tasks", "select id from durable.tasks where status = 'running'"
                 " and name = 'kill_task' for update"),
    # The heartbeat's last statement updates the daemon's row of durable.workers.
    "heartbeat": ("worker_heartbeat", "select id from durable.workers where id = $1 for update"),
}


class Killer:
    """The test's sessions (not named 'durable', so they survive their own kills): the gate
    holds a lock that one kind of the daemon's statements waits for; the probe watches for
    a daemon session waiting there, then terminates every session of the daemon's."""

    def __init__(self, gate: asyncpg.Connection, probe: asyncpg.Connection) -> None:
        self.gate = gate
        self.probe = probe
        self.hits: Counter[str] = Counter()

    @classmethod
    @asynccontextmanager
    async def open(cls, dsn: str) -> AsyncIterator[Killer]:
        settings = {"application_name": "durable-test-killer"}
        gate = await asyncpg.connect(dsn, server_settings=settings)
        probe = await asyncpg.connect(dsn, server_settings=settings)
        try:
            yield cls(gate, probe)
        finally:
            await gate.close()
            await probe.close()

    async def waiting(self, statement: str, timeout: float) -> bool:
        """Whether a daemon session comes to wait on a lock while running ``statement``."""

        async def check() -> bool:
            return bool(await self.probe.fetchval(
                "select exists (select from pg_stat_activity where application_name = 'durable'"
                " and wait_event_type = 'Lock' and left(query, 100) = left($1, 100))",
                queries()[statement],
            ))  # fmt: skip

        try:
            await wait_for(check, timeout=timeout, interval=0.005)
        except TimeoutError:
            return False
        return True

    async def kill_at(self, moment: str, *args: Any, timeout: float = 5.0) -> bool:
        """Terminate the daemon's sessions while one of them runs the ``moment`` statement
        (False: none came to it within ``timeout``)."""
        statement, lock = GATES[moment]
        with anyio.move_on_after(timeout):
            while True:
                async with self.gate.transaction():
                    # Rows of running tasks, locked: none running yet, look again.
                    if await self.gate.fetch(lock, *args) and await self.waiting(
                        statement, timeout
                    ):
                        assert await self.probe.fetchval(KILL) > 0
                        self.hits[moment] += 1
                        return True
                await anyio.sleep(0.005)
        return False

    async def kill_now(self) -> int:
        return int(await self.probe.fetchval(KILL))


class Workload:
    """Tasks and three-step workflows (a step, a transaction, a step). A step checks, as it
    starts, that its checkpoint has not committed already: a step run again after that is
    what the design rules out."""

    def __init__(self, probe: asyncpg.Pool) -> None:
        self.probe = probe
        self.runs: Counter[tuple[int, str]] = Counter()
        self.rerun_after_checkpoint: list[tuple[int, str]] = []
        self.registry = Registry()
        self.registry.add(Definition(name="kill_task", fn=self.task, queue=QUEUE,
                                     max_attempts=50, retry=FAST))
        self.registry.add(Definition(name="kill_flow", fn=self.flow, kind="workflow",
                                     queue=QUEUE, max_attempts=50, retry=FAST))

    async def task(self, n: int) -> int:
        await asyncio.sleep(0.01)  # a task's work: its completion is not its claim's neighbour
        return n * 2

    async def flow(self, ctx: durable.Context, n: int) -> int:
        a = await ctx.step("first", self._step, ctx.task_id, "first", n)
        await ctx.transaction("book", self._book, ctx.task_id)
        b = await ctx.step("second", self._step, ctx.task_id, "second", a)
        return int(b)

    async def _step(self, task_id: int, name: str, value: int) -> int:
        self.runs[(task_id, name)] += 1
        if await self.probe.fetchval(
            "select exists (select from durable.events where task_id = $1 and name = $2"
            " and status = 'completed')", task_id, name,
        ):  # fmt: skip
            self.rerun_after_checkpoint.append((task_id, name))
        await asyncio.sleep(0.01)
        return value + 1

    async def _book(self, conn: Any, task_id: int) -> None:
        await conn.execute("insert into kill_bookings (workflow_id) values ($1)", task_id)


@asynccontextmanager
async def workload(dsn: str) -> AsyncIterator[Workload]:
    await execute(dsn, "create table kill_bookings (workflow_id bigint not null)")
    # A limit makes every claim take the queue's lock: the gate for claims.
    await execute(dsn, "insert into durable.queues (name, concurrency) values ($1, 1000)", QUEUE)
    probe = await asyncpg.create_pool(
        dsn, min_size=1, max_size=4, server_settings={"application_name": "durable-test-probe"}
    )
    try:
        yield Workload(probe)
    finally:
        await probe.close()


async def completed(dsn: str) -> int:
    return int(await fetchval(dsn, "select count(*) from durable.tasks where status = 'completed'"))


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_daemon_rides_out_its_sessions_killed_mid_statement_and_runs_each_task_once(
    dsn: str,
) -> None:
    async with workload(dsn) as work, Killer.open(dsn) as killer, durable.connect(dsn) as client:
        async with running_daemon(dsn, reg=work.registry, queues=f"{QUEUE}=8") as daemon:
            started: list[int] = []
            for round_ in range(3):
                for moment in GATES:
                    before = await completed(dsn)
                    tasks = await client.start_many("kill_task", [[i] for i in range(12)])
                    flows = [await client.start("kill_flow", round_ * 100 + i) for i in range(4)]
                    started += [h.id for h in tasks] + [h.id for h in flows]
                    args = {"claim": (QUEUE,), "heartbeat": (daemon.id,)}.get(moment, ())
                    await killer.kill_at(moment, *args)
                    # Serving goes on: work completes after the kill.
                    await wait_for(lambda b=before: _more(dsn, b), timeout=30)  # type: ignore[misc]
                    assert not daemon.stopping
            # Killed at random moments too, as many times, with nothing gated.
            for _ in range(8):
                before = await completed(dsn)
                tasks = await client.start_many("kill_task", [[i] for i in range(12)])
                started += [h.id for h in tasks]
                started.append((await client.start("kill_flow", 7)).id)
                await killer.kill_now()
                await wait_for(lambda b=before: _more(dsn, b), timeout=30)  # type: ignore[misc]

            async def all_done() -> bool:
                return bool(await fetchval(
                    dsn, "select bool_and(status = 'completed') from durable.tasks"
                    " where id = any($1)", started,
                ))  # fmt: skip

            await wait_for(all_done, timeout=120)
            assert not daemon.stopping
        # Every kind of statement was caught in flight at least once.
        assert set(killer.hits) == set(GATES), killer.hits
        flows = await fetchval(
            dsn, "select array_agg(id) from durable.tasks where name = 'kill_flow'"
        )
        bookings = await fetchval(
            dsn, "select count(*) filter (where n <> 1) from (select count(*) as n"
            " from kill_bookings group by workflow_id) as b"
        )  # fmt: skip
        assert bookings == 0  # each workflow's transaction committed exactly once
        assert await fetchval(dsn, "select count(distinct workflow_id) from kill_bookings") == len(flows)
        assert work.rerun_after_checkpoint == []
        results = await fetchval(
            dsn, "select count(*) from durable.tasks where name = 'kill_task'"
            " and result::text::int <> (args->>0)::int * 2"
        )  # fmt: skip
        assert results == 0


async def _more(dsn: str, before: int) -> bool:
    return await completed(dsn) > before


STARTUP = {
    "register_worker": "lock table durable.workers in exclusive mode",
    "register_definitions": "lock table durable.worker_definitions in exclusive mode",
    "publish_definitions": "lock table durable.definitions in exclusive mode",
    "upsert_schedule": "lock table durable.schedules in exclusive mode",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("statement", list(STARTUP))
async def test_sessions_killed_during_the_startup_after_the_pool_opened_do_not_end_it(
    dsn: str, statement: str
) -> None:
    """Past the pool's connects, the server is there: a session lost while the daemon
    registers and publishes is a blip to retry, not a reason to exit."""
    reg = Registry()

    async def echo(x: int) -> int:
        return x

    reg.add(Definition(name="kill_echo", fn=echo, queue=QUEUE))
    reg.add(Definition(name="kill_cron", fn=echo, queue=QUEUE, schedule="0 0 1 1 *"))
    async with Killer.open(dsn) as killer, durable.connect(dsn) as client:
        async with anyio.create_task_group() as tg:
            ready = anyio.Event()
            daemon_error: list[BaseException] = []

            async def serve() -> None:
                try:
                    async with running_daemon(dsn, reg=reg, queues=QUEUE):
                        ready.set()
                        handle = await client.start("kill_echo", 21)
                        assert await handle.result(timeout=20) == 21
                except BaseException as exc:  # reported below, as itself
                    daemon_error.append(exc)
                    ready.set()

            async with killer.gate.transaction():
                await killer.gate.execute(STARTUP[statement])
                tg.start_soon(serve)
                assert await killer.waiting(statement, timeout=20)
                assert await killer.kill_now() > 0
            await ready.wait()
        assert daemon_error == []


@pytest.mark.timeout(30)
async def test_registering_again_after_a_lost_answer_is_not_an_error(dsn: str) -> None:
    """A registration that committed but lost its answer with its connection is tried
    again at startup: the row found is the daemon's own."""
    store = await Store.open(dsn)
    try:
        worker = uuid.uuid4()
        await store.register_worker(worker, {QUEUE: 1}, ["kill_echo"])
        await store.register_worker(worker, {QUEUE: 1}, ["kill_echo"])
        assert await fetchval(dsn, "select count(*) from durable.workers where id = $1", worker) == 1
    finally:
        await store.close()


PASSWORD = "kills-pw"


@pytest.mark.timeout(60)
async def test_a_stop_with_its_sessions_killed_and_logins_refused_ends_without_an_error(
    dsn: str,
) -> None:
    """The last writes of a stop (handing running tasks back, marking the daemon stopped)
    find every session gone and a new one refused (a role's login taken away): they are
    given up, the leases settle it, and the daemon ends as a stop ends, without an error."""
    role = f"durable_kills_{secrets.token_hex(4)}"
    ident = quote_ident(role)
    await execute(dsn, f"create role {ident} login password {literal(PASSWORD)}")
    await grant(dsn, role)
    url = as_app(dsn, PASSWORD).replace("durable_app:", f"{role}:", 1)
    reg = Registry()
    never = anyio.Event()

    async def block() -> None:
        await never.wait()

    blocking: Definition[[], None] = Definition(name="kill_block", fn=block, queue=QUEUE)
    reg.add(blocking)
    try:
        async with durable.connect(dsn) as client:
            handle = await client.start(blocking)
            async with running_daemon(url, reg=reg, queues=QUEUE, shutdown_grace="0"):
                await wait_status(dsn, handle.id, "running")
                await execute(dsn, f"alter role {ident} nologin")
                await execute(
                    dsn, "select pg_terminate_backend(pid) from pg_stat_activity"
                    " where usename = $1", role,
                )  # fmt: skip
            # Not handed back: it runs again once its lease expires.
            assert (await client.get(handle.id)).status == "running"
    finally:
        await execute(dsn, f"alter role {ident} login")
        await execute(dsn, f"drop owned by {ident}")
        await execute(dsn, f"drop role if exists {ident}")

"""`durable queues pause` as a barrier: once the pause has returned, no claim of the queue
takes a task.

A claim reads whether its queue is paused in its first statements and takes its tasks in a
later one. To stop a claim in between, a test-only BEFORE UPDATE trigger (`pause_gate`)
makes the claim's update of one chosen task wait for an advisory lock the test holds; the
test waits until the server reports the claim waiting (pg_stat_activity), pauses, and
watches whether the pause returns while the claim still has its task to take.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import pytest

import durable
from durable.admin import Admin
from durable.store import queries
from tests.support.helpers import blocked_or_done, wait_for

Q = queries()
WORKER = uuid.UUID(int=19)
GATE_KEY = 2019_0001  # the advisory lock pause_gate waits on

GATE_SQL = f"""
create table pause_gate (id bigint primary key);
create function pause_gate() returns trigger language plpgsql as $$
begin
    if new.status = 'running' and exists (select 1 from public.pause_gate g where g.id = new.id) then
        perform pg_advisory_xact_lock({GATE_KEY});
    end if;
    return new;
end;
$$;
-- Qualified: it runs inside durable's functions, whose search_path holds only the catalog.
create trigger pause_gate before update on durable.tasks
    for each row execute function pause_gate();
"""

LIMITS = {
    "plain": None,
    "concurrency": "insert into durable.queues (name, concurrency) values ('pb_q', 100)",
    "rate": "insert into durable.queues (name, rate_limit, rate_period) values ('pb_q', 100, 60)",
    "keyed": None,
}


@pytest.fixture
async def conns(dsn: str) -> AsyncIterator[list[asyncpg.Connection]]:
    """Two connections: [0] the test's own (setup, probes, gate), [1] the claimer."""
    opened = [await asyncpg.connect(dsn) for _ in range(2)]
    try:
        yield opened
    finally:
        for c in opened:
            await c.close()


async def start(conn: asyncpg.Connection, queue: str, key: str | None = None) -> int:
    task_id: int = await conn.fetchval(
        "select durable.start('pb_job', queue => $1, concurrency_key => $2)", queue, key
    )
    return task_id


async def claim(conn: asyncpg.Connection, queue: str, n: int) -> list[int]:
    """queries.sql `claim` as the daemon sends it: the ids it took."""
    rows = await conn.fetch(Q["claim"], queue, ["pb_job"], n, 60.0, WORKER)
    return [r["id"] for r in rows]


async def waits_for_advisory_lock(
    probe: asyncpg.Connection, pending: asyncio.Future[None], *, but: int
) -> bool:
    """Wait until a session other than ``but`` (and the probe) waits for an advisory lock
    (True), or ``pending`` has finished (False)."""

    async def check() -> str | None:
        if pending.done():
            return "done"
        n = await probe.fetchval(
            "select count(*) from pg_locks where locktype = 'advisory' and not granted"
            " and pid not in ($1, pg_backend_pid())",
            but,
        )
        return "waiting" if n else None

    outcome: str = await wait_for(check, timeout=20, interval=0.005)
    return outcome == "waiting"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("limit", list(LIMITS))
async def test_a_pause_returns_only_once_the_claims_that_read_it_unpaused_are_done(
    dsn: str, conns: list[asyncpg.Connection], limit: str
) -> None:
    test, claimer = conns
    await test.execute(GATE_SQL)
    if (sql := LIMITS[limit]) is not None:
        await test.execute(sql)
    u = await start(test, "pb_q", key="k" if limit == "keyed" else None)
    await test.execute("insert into pause_gate values ($1)", u)
    await test.execute("select pg_advisory_lock($1)", GATE_KEY)
    async with durable.connect(dsn) as client:
        pending = asyncio.ensure_future(claim(claimer, "pb_q", 5))
        pausing: asyncio.Future[None] | None = None
        try:
            # The claim read the queue unpaused and waits at its update of u.
            assert await blocked_or_done(test, claimer.get_server_pid(), pending)
            pausing = asyncio.ensure_future(Admin(client.store).pause_queue("pb_q"))
            # Either the pause waits for the claim, or it has returned already.
            await waits_for_advisory_lock(test, pausing, but=claimer.get_server_pid())
            returned_early = pausing.done()
        finally:
            await test.execute("select pg_advisory_unlock($1)", GATE_KEY)
        taken = await asyncio.wait_for(pending, 20)
        assert pausing is not None
        await asyncio.wait_for(pausing, 20)
        assert not (returned_early and taken), (
            f"`durable queues pause` returned while a claim of the queue ({limit}) was in"
            f" flight, and that claim then took tasks {taken}"
        )
        assert taken == [u]  # in flight before the pause: it takes its task
        # Paused and returned: nothing more is claimed.
        await start(test, "pb_q", key="k2" if limit == "keyed" else None)
        assert await claim(claimer, "pb_q", 5) == []


@pytest.mark.timeout(60)
async def test_a_resume_waits_for_no_claim_and_claims_take_tasks_again(
    dsn: str, conns: list[asyncpg.Connection]
) -> None:
    test, claimer = conns
    await test.execute(GATE_SQL)
    u = await start(test, "pb_q")
    await test.execute("insert into pause_gate values ($1)", u)
    async with durable.connect(dsn) as client:
        ops = Admin(client.store)
        await ops.pause_queue("pb_q")
        assert await claim(claimer, "pb_q", 5) == []
        await ops.resume_queue("pb_q")
        # A claim in flight (it waits at its update of u) does not hold a resume up.
        await test.execute("select pg_advisory_lock($1)", GATE_KEY)
        pending = asyncio.ensure_future(claim(claimer, "pb_q", 5))
        try:
            assert await blocked_or_done(test, claimer.get_server_pid(), pending)
            await asyncio.wait_for(ops.resume_queue("pb_q"), 20)
            assert not pending.done()
        finally:
            await test.execute("select pg_advisory_unlock($1)", GATE_KEY)
        assert await asyncio.wait_for(pending, 20) == [u]


@dataclass
class Load:
    """Claimers looping on one queue while it is paused."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    claims: list[int] = field(default_factory=list)  # claims done, per claimer
    # Claims that took tasks: the server's clock once the claim had its rows, and the ids.
    took: list[tuple[datetime, list[int]]] = field(default_factory=list)


async def claimer_loop(conn: asyncpg.Connection, load: Load, me: int) -> None:
    while not load.stop.is_set():
        rows = await conn.fetch(
            "select c.id, clock_timestamp() as at"
            " from durable.claim($1, $2::text[], $3, $4, $5) c",
            "pb_q", ["pb_job"], 2, 60.0, WORKER,
        )  # fmt: skip
        load.claims[me] += 1
        if rows:
            load.took.append((max(r["at"] for r in rows), [r["id"] for r in rows]))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("limit", ["plain", "concurrency"])
async def test_a_pause_under_many_claimers_returns_and_holds(dsn: str, limit: str) -> None:
    """Claims in flight all along: the pause returns all the same (it does not wait for
    them to stop coming), and no claim has taken a task after it returned."""
    claimers = 6
    opened = [await asyncpg.connect(dsn) for _ in range(claimers + 1)]
    test, loops = opened[0], opened[1:]
    try:
        if limit == "concurrency":
            await test.execute(
                "insert into durable.queues (name, concurrency) values ('pb_q', 1000000)"
            )
        await test.execute(
            "insert into durable.tasks (queue, name) select 'pb_q', 'pb_job'"
            " from generate_series(1, 20000)"
        )
        load = Load(claims=[0] * claimers)
        running = [
            asyncio.ensure_future(claimer_loop(c, load, i)) for i, c in enumerate(loops)
        ]
        try:

            async def each_claimed(n: int) -> bool:
                if any(t.done() for t in running):  # a claimer failed: say how
                    await asyncio.gather(*running)
                return min(load.claims) >= n

            await wait_for(lambda: each_claimed(5), timeout=60)
            async with durable.connect(dsn) as client:
                await asyncio.wait_for(Admin(client.store).pause_queue("pb_q"), 30)
            returned: datetime = await test.fetchval("select clock_timestamp()")
            done = list(load.claims)
            await wait_for(lambda: each_claimed(max(done) + 5), timeout=60)
        finally:
            load.stop.set()
            await asyncio.wait_for(asyncio.gather(*running), 30)
        late = [ids for at, ids in load.took if at > returned]
        assert late == [], f"claims took tasks {late} after the pause had returned"
        queued = await test.fetchval("select count(*) from durable.tasks where status = 'queued'")
        assert queued > 0  # the pause, not an empty queue, stopped them
    finally:
        for c in opened:
            await c.close()

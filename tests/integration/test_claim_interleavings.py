"""The claim, cancel and complete paths under interleavings built step by step (issue 20).

Each test drives its own connections through explicit transactions and holds a lock of its
own so that one statement stops at a chosen point; it waits until the server reports that
session waiting on a lock (pg_stat_activity), does the conflicting work, then lets it go.
Where a correct claim would not wait at that point, the test goes on as soon as the
statement returns instead: it checks the outcome, never the route.

`durable.claim` takes, in order: a first statement that reads the queue's limits and whether
keyed tasks wait in it (which picks the keyed or the plain path); the queue's advisory lock
(`durable.queue:` || q) when the queue has a limit or keyed tasks; then, on the keyed path,
one statement whose snapshot ranks the queued tasks, locks the chosen rows FOR UPDATE SKIP
LOCKED and updates them. To stop that statement between its snapshot and its row locks, a
test-only BEFORE UPDATE trigger (`race_gate`) makes the claim's update of one chosen task
take an advisory lock the test holds: the rows after it are locked only once it goes on.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

import durable
from durable.store import queries
from tests.support.helpers import blocked_or_done

Q = queries()
WORKER = uuid.UUID(int=20)
GATE_KEY = 2020_0001  # the advisory lock race_gate waits on

GATE_SQL = f"""
create table race_gate (id bigint primary key);
create function race_gate() returns trigger language plpgsql as $$
begin
    if new.status = 'running' and exists (select 1 from public.race_gate g where g.id = new.id) then
        perform pg_advisory_xact_lock({GATE_KEY});
    end if;
    return new;
end;
$$;
-- Qualified: it runs inside durable's functions, whose search_path holds only the catalog.
create trigger race_gate before update on durable.tasks
    for each row execute function race_gate();
"""


@pytest.fixture
async def conns(dsn: str) -> AsyncIterator[list[asyncpg.Connection]]:
    """Four connections: [0] the test's own (setup, probes, gate), [1..3] the actors."""
    opened = [await asyncpg.connect(dsn) for _ in range(4)]
    try:
        yield opened
    finally:
        for c in opened:
            await c.close()


async def start(
    conn: asyncpg.Connection,
    queue: str,
    *,
    key: str | None = None,
    key_limit: int | None = None,
    priority: int = 0,
) -> int:
    task_id: int = await conn.fetchval(
        "select durable.start('race', queue => $1, priority => $2, concurrency_key => $3,"
        " key_limit => $4)",
        queue,
        priority,
        key,
        key_limit,
    )
    return task_id


async def claim(conn: asyncpg.Connection, queue: str, n: int) -> dict[int, int]:
    """queries.sql `claim` as the daemon sends it: task id -> claim token."""
    rows = await conn.fetch(Q["claim"], queue, ["race"], n, 60.0, WORKER)
    return {r["id"]: r["claim_token"] for r in rows}


async def key_running(conn: asyncpg.Connection, key: str) -> int:
    n: int = await conn.fetchval(
        "select count(*) from durable.tasks where status = 'running' and concurrency_key = $1",
        key,
    )
    return n


async def test_keyed_claim_never_takes_a_task_a_plain_claim_committed_meanwhile(
    conns: list[asyncpg.Connection],
) -> None:
    test, plain, keyed, _ = conns
    await test.execute(GATE_SQL)
    u = await start(test, "q")
    # The plain claimer takes U while no keyed task waits in q: no queue lock.
    await plain.execute("begin")
    by_plain = await claim(plain, "q", 1)
    assert list(by_plain) == [u]
    # A keyed task arrives; the keyed claim's snapshot sees U still queued (the plain
    # claim has not committed) and stops at the gate on V, before it locks U.
    v = await start(test, "q", key="k", key_limit=1, priority=5)
    await test.execute("insert into race_gate values ($1)", v)
    await test.execute("select pg_advisory_lock($1)", GATE_KEY)
    await keyed.execute("begin")
    pending = asyncio.ensure_future(claim(keyed, "q", 2))
    try:
        await blocked_or_done(test, keyed.get_server_pid(), pending)
        await plain.execute("commit")
    finally:
        await test.execute("select pg_advisory_unlock($1)", GATE_KEY)
    by_keyed = await pending
    await keyed.execute("commit")

    token = await test.fetchval("select claim_token from durable.tasks where id = $1", u)
    assert u not in by_keyed, (
        f"task {u} claimed twice: by the plain claim (token {by_plain[u]}) and again by the"
        f" keyed claim (token {by_keyed[u]}) after the first committed"
    )
    assert token == by_plain[u]


async def test_keyed_claim_never_revives_a_task_cancelled_meanwhile(
    conns: list[asyncpg.Connection],
) -> None:
    test, keyed, canceller, _ = conns
    await test.execute(GATE_SQL)
    u = await start(test, "q")
    v = await start(test, "q", key="k", key_limit=1, priority=5)
    await test.execute("insert into race_gate values ($1)", v)
    await test.execute("select pg_advisory_lock($1)", GATE_KEY)
    await keyed.execute("begin")
    pending = asyncio.ensure_future(claim(keyed, "q", 2))
    try:
        await blocked_or_done(test, keyed.get_server_pid(), pending)
        # queries.sql `cancel`, as client.cancel sends it. A claim that locked U before the
        # gate makes it wait; then U is the claim's, and the cancel asks it to stop.
        cancelling = asyncio.ensure_future(canceller.fetch(Q["cancel"], [u]))
        await blocked_or_done(test, canceller.get_server_pid(), cancelling)
    finally:
        await test.execute("select pg_advisory_unlock($1)", GATE_KEY)
    by_keyed = await pending
    await keyed.execute("commit")
    cancelled = {r["id"]: r["status"] for r in await cancelling}

    row = await test.fetchrow(
        "select status, finished_at, claim_token from durable.tasks where id = $1", u
    )
    assert row is not None
    assert cancelled == {u: "cancelled"} or (u in by_keyed and cancelled == {u: "running"})
    if cancelled[u] == "cancelled":
        assert u not in by_keyed and row["status"] == "cancelled", (
            f"task {u}, cancelled while the keyed claim waited, is {row['status']} again"
            f" (claimed: {u in by_keyed}, finished_at {row['finished_at']},"
            f" token {row['claim_token']})"
        )
    else:
        assert row["status"] == "running" and row["finished_at"] is None


async def test_key_limit_holds_for_one_key_claimed_in_two_queues_at_once(
    conns: list[asyncpg.Connection],
) -> None:
    test, first, second, _ = conns
    a = await start(test, "q1", key="k", key_limit=1)
    b = await start(test, "q2", key="k", key_limit=1)
    await first.execute("begin")
    assert list(await claim(first, "q1", 1)) == [a]
    # The second queue's claimer serialises on its own queue's lock, not q1's; a correct
    # claim either waits for the first to commit or leaves B queued.
    await second.execute("begin")
    pending = asyncio.ensure_future(claim(second, "q2", 1))
    await blocked_or_done(test, second.get_server_pid(), pending)
    await first.execute("commit")
    by_second = await pending
    await second.execute("commit")

    running = await key_running(test, "k")
    assert running <= 1, (
        f"key 'k' (key_limit 1) runs {running} tasks: {a} in q1 and {b} in q2"
        f" (second claim took {sorted(by_second)})"
    )


async def test_plain_claim_honours_the_limit_of_a_keyed_task_committed_meanwhile(
    conns: list[asyncpg.Connection],
) -> None:
    test, claimer, outbox, _ = conns
    # q has a fleet-wide limit, so its claimers take the queue lock after their first
    # statement; the test holds it to stop a claim there.
    await test.execute("insert into durable.queues (name, concurrency) values ('q', 5)")
    a = await start(test, "q", key="k", key_limit=1)
    assert list(await claim(claimer, "q", 1)) == [a]
    # An outbox transaction enqueues a task of the same key (due at its own start, before
    # the claim's), and commits only once the claim has passed its first statement, which
    # saw no keyed task waiting in q and so picked the plain path.
    await outbox.execute("begin")
    b = await start(outbox, "q", key="k", key_limit=1)
    await test.execute("select pg_advisory_lock(hashtextextended('durable.queue:' || 'q', 0))")
    pending = asyncio.ensure_future(claim(claimer, "q", 5))
    try:
        await blocked_or_done(test, claimer.get_server_pid(), pending)
        await outbox.execute("commit")
    finally:
        await test.execute(
            "select pg_advisory_unlock(hashtextextended('durable.queue:' || 'q', 0))"
        )
    taken = await pending

    running = await key_running(test, "k")
    assert running <= 1, (
        f"key 'k' (key_limit 1) runs {running} tasks: {a}, and {b} taken by a claim that"
        f" chose the plain path before {b} was committed (claimed {sorted(taken)})"
    )


@pytest.mark.parametrize("outcome", ["complete", "fail"])
@pytest.mark.parametrize("when", ["after", "while_held"])
async def test_cancel_acknowledged_before_the_outcome_wins(
    conns: list[asyncpg.Connection], dsn: str, outcome: str, when: str
) -> None:
    """A cancel that returned the task's id and committed before the statement that ends
    the attempt commits: the task ends cancelled, whatever that statement reports.
    `after`: the outcome is written once the cancel has returned (the daemon had not yet
    heard of it). `while_held`: the outcome statement runs while the cancel's transaction
    still holds the row, waits for it, and goes on once the cancel commits."""
    test, canceller, finisher, _ = conns
    x = await start(test, "q")
    token = (await claim(finisher, "q", 1))[x]

    async def finish() -> None:
        if outcome == "complete":
            await finisher.fetch(Q["complete"], [x], [token], ['"done"'])
        else:
            error = '{"type": "Boom", "message": "boom", "traceback": null}'
            await finisher.fetch(Q["fail"], x, token, error)

    if when == "after":
        async with durable.connect(dsn) as client:
            await client.cancel(x)
        # Acknowledged: the cancel has returned, and committed.
        assert await test.fetchval("select cancel_requested from durable.tasks where id = $1", x)
        await finish()
    else:
        await canceller.execute("begin")
        assert [r["id"] for r in await canceller.fetch(Q["cancel"], [x])] == [x]
        pending = asyncio.ensure_future(finish())
        await blocked_or_done(test, finisher.get_server_pid(), pending)
        await canceller.execute("commit")
        await pending

    status = await test.fetchval("select status from durable.tasks where id = $1", x)
    assert status == "cancelled", (
        f"task {x} ends {status}: its cancel was acknowledged before the {outcome} committed"
    )

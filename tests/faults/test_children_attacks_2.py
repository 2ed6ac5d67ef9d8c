"""Attacks on child workflows, second round: restarts (retry, replay, fork) of a parent
whose children are still running or finishing, and what each child's finish costs its
waiting parent (durable.wake_waiting, durable.suspend, durable.restart).

Interleavings are forced with advisory locks held by the test and waits on what the
server says a session waits for, never with sleeps (see test_children_attacks.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from durable.store.schema import queries
from tests.support.helpers import wait_for

Q = queries()
WAKE_LOCK = 1685418593
"""The advisory lock class durable.wake_waiting and durable.suspend take per parent."""


@asynccontextmanager
async def session(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def waits_on_lock(probe: asyncpg.Connection, pid: int, kind: str | None = None) -> None:
    """Until session ``pid`` waits for a heavyweight lock (of ``kind``, when given)."""

    async def check() -> bool:
        row = await probe.fetchrow(
            "select wait_event_type, wait_event from pg_stat_activity where pid = $1", pid
        )
        return bool(row and row[0] == "Lock" and (kind is None or row[1] == kind))

    await wait_for(check, interval=0.005)


async def running_parent(conn: asyncpg.Connection, width: int) -> tuple[int, list[int]]:
    """A workflow running under claim token 7 with ``width`` running children (token =
    their id), each recorded as a pending child event of branch 0, as a spawn leaves them."""
    parent = await conn.fetchval(
        "insert into durable.tasks (queue, name, kind, status, claim_token, lease_until,"
        " started_at) values ('attack_children', 'root', 'workflow', 'running', 7,"
        " now() + interval '1 hour', now()) returning id"
    )
    kids = [
        r[0]
        for r in await conn.fetch(
            "insert into durable.tasks (queue, name, kind, status, parent_id, root_id,"
            " claim_token, lease_until, started_at)"
            " select 'attack_children', 'node', 'task', 'running', $1, $1, 1,"
            "        now() + interval '1 hour', now()"
            "   from generate_series(1, $2) order by 1 returning id",
            parent, width,
        )
    ]
    await conn.execute("update durable.tasks set claim_token = id where id = any($1)", kids)
    await conn.execute(
        "insert into durable.events (task_id, branch, seq, kind, name, digest, status, child_id,"
        " attempt)"
        " select $1, 0, i, 'child', 'node', 'd', 'pending', k, 1"
        "   from unnest($2::bigint[]) with ordinality as u(k, i)",
        parent, kids,
    )
    return parent, kids


async def suspended_parent(conn: asyncpg.Connection, width: int) -> tuple[int, list[int]]:
    """``running_parent``, suspended (durable.suspend) to wait on all of its children."""
    parent, kids = await running_parent(conn, width)
    assert await conn.fetchval(Q["suspend"], parent, 7, 0, kids, None, None) == "waiting"
    return parent, kids


BLOCKS = (
    "select sum(pg_stat_get_xact_blocks_fetched(c.oid))::bigint from pg_class c"
    " where c.relnamespace = 'durable'::regnamespace"
)
"""The blocks of durable's tables and indexes this session read and has not reported yet
(a running total, so only a difference within one transaction means anything)."""


async def finish_cost(conn: asyncpg.Connection, child: int) -> int:
    """The blocks of durable's tables and indexes one child's completion reads."""
    async with conn.transaction():
        before = await conn.fetchval(BLOCKS)
        await conn.fetch(Q["complete"], [child], [child], ["1"])
        return int(await conn.fetchval(BLOCKS) - before)


async def test_a_childs_finish_reads_as_much_for_2000_siblings_as_for_20(dsn: str) -> None:
    # Each finish looked for an unfinished child among all its parent waited on
    # (`c.id = any(p.waiting_on)` in durable.wake_waiting), probing them in id order: with
    # the first half of 2,000 finished, the next finish read the 1,000 finished ones first
    # (some 2,000 blocks), and a fan-out finishing in order cost O(n^2) over all.
    # Counted in blocks read, not time.
    async with session(dsn) as conn:
        costs = {}
        for width in (20, 2000):
            _, kids = await suspended_parent(conn, width)
            half = kids[: width // 2]
            await conn.fetch(Q["complete"], half, half, ["1"] * len(half))
            costs[width] = [await finish_cost(conn, k) for k in kids[width // 2:][:3]]
        # The middle of three: at a statement's sixth execution the plan cache plans it
        # generically too, reading blocks of its own, whichever width that finish is of.
        assert sorted(costs[2000])[1] <= max(costs[20]) + 50, costs


async def test_the_last_childs_finish_wakes_the_parent_once(dsn: str) -> None:
    # Held with the cheaper check: the parent stays waiting until its last child finishes,
    # children finishing out of order, one or several per statement.
    async with session(dsn) as conn:
        parent, kids = await suspended_parent(conn, 50)
        order = kids[25:] + kids[:25]
        while order:
            batch, order = order[:7], order[7:]
            await conn.fetch(Q["complete"], batch, batch, ["1"] * len(batch))
            status = await conn.fetchval("select status from durable.tasks where id = $1", parent)
            assert status == ("queued" if not order else "waiting")


async def test_a_child_finishing_twice_while_its_parent_waits_does_not_wake_it_early(
    dsn: str,
) -> None:
    # Held: a child that failed while a sibling still ran is retried (durable retry) and
    # finishes again. Its second finish counts the parent's waiting_left down once more;
    # the parent, finding the sibling unfinished, counts again and keeps waiting.
    async with session(dsn) as conn:
        parent, (a, b) = await suspended_parent(conn, 2)
        await conn.fetch(Q["fail"], a, a, '{"type": "x"}')
        await conn.fetchval(Q["restart"], a, "retry", None)
        await conn.execute(
            "update durable.tasks set status = 'running', claim_token = id,"
            " lease_until = now() + interval '1 hour' where id = $1", a,
        )
        await conn.fetch(Q["complete"], [a], [a], ["1"])
        row = await conn.fetchrow(
            "select status, waiting_left from durable.tasks where id = $1", parent
        )
        assert row is not None
        assert (row["status"], row["waiting_left"]) == ("waiting", 1)
        await conn.fetch(Q["complete"], [b], [b], ["1"])
        assert await conn.fetchval(
            "select status from durable.tasks where id = $1", parent
        ) == "queued"


async def child_events(conn: asyncpg.Connection, parent: int) -> list[int]:
    """The children the parent's current branch still refers to."""
    return [
        r[0]
        for r in await conn.fetch(
            "select e.child_id from durable.events e join durable.tasks t on t.id = e.task_id"
            " where e.task_id = $1 and e.branch = t.branch and e.kind = 'child' order by e.seq",
            parent,
        )
    ]


async def test_retrying_a_cancelled_parent_whose_child_is_still_stopping(dsn: str) -> None:
    # A cancelled parent retried at once, while its child was still running its step
    # (asked to stop; it ends cancelled whatever it does): the retry kept the child's
    # event, the retried parent waited on the stopping child and failed with its
    # cancellation. Retry runs again children cancelled before the parent saw them; a child
    # asked to stop is one of them.
    async with session(dsn) as conn:
        parent, (child,) = await suspended_parent(conn, 1)
        await conn.fetch(Q["cancel"], [parent])
        assert await conn.fetchval(
            "select cancel_requested and status = 'running' from durable.tasks where id = $1",
            child,
        )
        assert await conn.fetchval(Q["restart"], parent, "retry", None) == 0
        assert await child_events(conn, parent) == []
        # The stopping child ends cancelled; the restarted parent is not disturbed.
        await conn.fetch(Q["complete"], [child], [child], ["1"])
        assert await conn.fetchval(
            "select status from durable.tasks where id = $1", child
        ) == "cancelled"
        assert await conn.fetchval(
            "select status from durable.tasks where id = $1", parent
        ) == "queued"


async def test_an_attempt_retried_while_its_child_is_stopping_runs_the_child_again(
    dsn: str,
) -> None:
    # The same for a workflow's next attempt (retry_later): its child spawned and cancelled
    # on its own, still stopping as the attempt failed; the next attempt waited on it and
    # failed with its cancellation.
    async with session(dsn) as conn:
        parent, (child,) = await running_parent(conn, 1)
        await conn.fetch(Q["cancel"], [child])
        await conn.execute(Q["retry_later"], parent, 7, 0.0, '{"type": "x"}')
        assert await conn.fetchval(
            "select status from durable.tasks where id = $1", parent
        ) == "queued"
        assert await child_events(conn, parent) == []


async def test_a_parent_retried_as_its_child_fails_runs_the_child_again(dsn: str) -> None:
    # The parent ended (here: failed) while a child it spawned ran. The child's failure is
    # being written (its transaction waits, gated, to wake its parent) as the parent is
    # retried: the retry read the child as running and kept its event, and the retried
    # parent failed again with the child's error. The retry now waits for the child's row
    # and sees the failure: that child runs again.
    async with session(dsn) as setup, session(dsn) as gate, session(dsn) as probe:
        parent, (child,) = await running_parent(setup, 1)
        await setup.execute(
            "update durable.tasks set status = 'failed', claim_token = null,"
            " lease_until = null, finished_at = now() where id = $1", parent,
        )
        await gate.execute("select pg_advisory_lock($1, $2)", WAKE_LOCK, parent)
        async with session(dsn) as child_conn, session(dsn) as client_conn:
            failing = asyncio.ensure_future(
                child_conn.fetch(Q["fail"], child, child, '{"type": "x"}')
            )
            await waits_on_lock(probe, child_conn.get_server_pid(), "advisory")
            retry = asyncio.ensure_future(
                client_conn.fetchval(Q["restart"], parent, "retry", None)
            )
            pid = client_conn.get_server_pid()

            async def blocked_or_done() -> bool:
                # (Before the fix the retry did not wait: it read the child as running.)
                return retry.done() or await probe.fetchval(
                    "select wait_event_type = 'Lock' from pg_stat_activity where pid = $1", pid
                )

            await wait_for(blocked_or_done, interval=0.005)
            await gate.execute("select pg_advisory_unlock($1, $2)", WAKE_LOCK, parent)
            assert len(await asyncio.wait_for(failing, 20)) == 1
            assert await asyncio.wait_for(retry, 20) == 0
        assert await child_events(setup, parent) == []


@pytest.mark.parametrize("mode", ["replay", "fork"])
async def test_a_parent_replayed_while_its_child_runs(dsn: str, mode: str) -> None:
    # Held: replay starts an empty branch (the running child is not the new branch's: it
    # starts its own); fork at the child's position keeps it, and the new branch waits on
    # the same child. Either way the old child's finish wakes the parent at most once,
    # and only when the new branch waits on it.
    async with session(dsn) as conn:
        parent, (child,) = await running_parent(conn, 1)
        await conn.execute(
            "update durable.tasks set status = 'completed', claim_token = null,"
            " lease_until = null, finished_at = now() where id = $1", parent,
        )
        at = 2 if mode == "fork" else None
        branch = await conn.fetchval(Q["restart"], parent, mode, at)
        assert branch == 1
        assert await child_events(conn, parent) == ([] if mode == "replay" else [child])
        # The new branch's attempt runs and suspends on what it waits for.
        await conn.execute(
            "update durable.tasks set status = 'running', claim_token = 8,"
            " lease_until = now() + interval '1 hour' where id = $1", parent,
        )
        waits = [] if mode == "replay" else [child]
        if waits:
            assert await conn.fetchval(
                Q["suspend"], parent, 8, branch, waits, None, None
            ) == "waiting"
        await conn.fetch(Q["complete"], [child], [child], ["1"])
        status = await conn.fetchval("select status from durable.tasks where id = $1", parent)
        assert status == ("queued" if waits else "running")

"""Lock order between task trees, third round: a statement that ends tasks cancelled.

An attempt that ends after a cancel was asked for ends cancelled, and the update trigger
then cancels the task's unfinished descendants (durable.cancel_descendants), locking them
through durable.lock_trees. But the trigger runs after the statement: the ending task's
row was already held when its descendants, newer, were locked. A second cancel of the
same tree (durable.cancel, newest first) that held a descendant and waited for the ending
task's row closed the cycle, and Postgres failed one side with DeadlockDetectedError.

Each test forces the worst interleaving as tests/faults/test_lock_order_2.py does: a row
held by the test stops one statement half way, the other is started and seen waiting
(pg_stat_activity), then the row goes. The cancel detects a deadlock soon, the other side
never: a deadlock fails the cancel every time. Never a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from durable.acks import Acks, Completion
from durable.metrics import Metrics
from durable.models import Claimed
from durable.store import Store
from durable.store.schema import queries
from tests.faults.test_children_attacks import waits_on_lock
from tests.faults.test_lock_order_2 import PATIENT, QUICK, row_locks, session, statuses
from tests.support.helpers import blocked_or_done, wait_for

Q = queries()
ERROR = '{"type": "x", "message": "boom"}'


async def node(
    conn: asyncpg.Connection,
    *,
    parent: int | None = None,
    status: str = "running",
    asked: bool = False,
    expired: bool = False,
    kind: str = "workflow",
) -> int:
    """A workflow (or plain task) of queue lock_order_3: running under a claim whose token
    is its id, or finished (``status``); ``asked``: a cancel was asked for while it ran;
    ``expired``: its lease ran out (its daemon died)."""
    run = status == "running"
    task = int(await conn.fetchval(
        "insert into durable.tasks (queue, name, kind, status, parent_id, root_id,"
        " claim_token, lease_until, started_at, finished_at, cancel_requested)"
        " values ('lock_order_3', 'node', $6::text, $1::text, $2, $2,"
        "         case when $3 then 1 end,"
        "         case when $3 then now() + case when $4 then interval '-1 second'"
        "                                        else interval '1 hour' end end,"
        "         now(), case when not $3 then now() end, $5)"
        " returning id",
        status, parent, run, expired, asked, kind,
    ))  # fmt: skip
    if run:
        await conn.execute("update durable.tasks set claim_token = id where id = $1", task)
    return task


async def cancelled_tree(conn: asyncpg.Connection, *, expired: bool = False) -> list[int]:
    """A root cancelled while two children ran (both asked to stop, still running), and a
    grandchild under the first, started late (running, not asked to stop). Created in
    the order returned, so the grandchild is the newest."""
    root = await node(conn, status="cancelled")
    first = await node(conn, parent=root, asked=True, expired=expired)
    second = await node(conn, parent=root, asked=True)
    grandchild = await node(conn, parent=first)
    return [root, first, second, grandchild]


# -- a statement ending two siblings cancelled, and a second cancel of the tree ---------------

BATCHES: dict[str, Callable[[asyncpg.Connection, list[int]], Awaitable[Any]]] = {
    "complete": lambda c, ids: c.fetch(Q["complete"], ids, ids, ["1"] * len(ids)),
    "release": lambda c, ids: c.fetch(Q["release"], ids, ids),
}
"""The group commit of many attempts' results and the hand-back at shutdown or pause: one
statement, many running tasks (claim token = id, see ``node``), each ending cancelled when
a cancel was asked for while it ran."""


@pytest.mark.parametrize("batch", list(BATCHES))
async def test_a_batch_ending_two_siblings_cancelled_and_a_second_cancel_do_not_deadlock(
    dsn: str, batch: str
) -> None:
    # Two children of a cancelled workflow, both asked to stop, finish in one group commit
    # (or are handed back together) and so end cancelled; the first started a child late.
    # The batch locked the two (newest first) and the trigger then wanted the grandchild,
    # while a second cancel of the root (durable.lock_trees: the grandchild first) held
    # the grandchild and waited for the second child. Here the test holds the first
    # child, so the batch stops between its two rows.
    async with session(dsn) as setup, session(dsn) as probe:
        root, first, second, grandchild = await cancelled_tree(setup)
        async with (
            row_locks(dsn, [first]) as release,
            session(dsn, **PATIENT) as daemon_conn,
            session(dsn, **QUICK) as cancel_conn,
        ):
            written = asyncio.ensure_future(BATCHES[batch](daemon_conn, [first, second]))
            await waits_on_lock(probe, daemon_conn.get_server_pid())
            cancel = asyncio.ensure_future(cancel_conn.fetch(Q["cancel"], [root]))
            await waits_on_lock(probe, cancel_conn.get_server_pid())
            await release()
            assert len(await asyncio.wait_for(written, 20)) == 2
            again = await asyncio.wait_for(cancel, 20)
        # The batch came first: both children ended cancelled and took the grandchild
        # along (asked to stop); the second cancel found the root finished.
        assert [(r["id"], r["already_finished"]) for r in again] == [(root, True)]
        assert await statuses(setup, [first, second, grandchild]) == {
            first: "cancelled",
            second: "cancelled",
            grandchild: "running",
        }
        assert await setup.fetchval(
            "select cancel_requested from durable.tasks where id = $1", grandchild
        )


def claimed(task: int, kind: str) -> Claimed:
    return Claimed(task, "lock_order_3", "node", kind, "[]", "{}", 1, 3, None, task, 0, None,
                   None, False)  # fmt: skip


async def test_the_group_commit_of_a_workflow_and_a_task_and_a_second_cancel(dsn: str) -> None:
    # The daemon's group commit (durable/acks.py) writes a batch of plain tasks alone with
    # complete_tasks, which locks their rows alone (a plain task has no children), and any
    # batch holding a workflow with `complete`. Here a workflow asked to cancel finishes in
    # one flush with a plain task, as in the test below: had the flush taken
    # complete_tasks, the second cancel would fail with DeadlockDetectedError.
    async with session(dsn) as setup, session(dsn) as probe:
        root, first, second, grandchild = await cancelled_tree(setup)
        task = await node(setup, kind="task")
        store = await Store.open(
            dsn, min_size=1, max_size=2, name="lock_order_3", server_settings=PATIENT
        )
        acks = Acks(store, Metrics())
        try:
            async with row_locks(dsn, [second]) as release, session(dsn, **QUICK) as cancel_conn:
                cancel = asyncio.ensure_future(cancel_conn.fetch(Q["cancel"], [root]))
                await waits_on_lock(probe, cancel_conn.get_server_pid())
                items = [
                    Completion(claimed(first, "workflow"), "1", 0.0),
                    Completion(claimed(task, "task"), "1", 0.0),
                ]
                flush = asyncio.ensure_future(acks.complete(items))

                async def flush_waits() -> bool:
                    return bool(await probe.fetchval(
                        "select exists (select from pg_stat_activity"
                        " where application_name = 'lock_order_3' and wait_event_type = 'Lock')"
                    ))  # fmt: skip

                await wait_for(flush_waits, interval=0.005)
                await release()
                again = await asyncio.wait_for(cancel, 20)
                assert await asyncio.wait_for(flush, 20) == [True, True]
            # A batch of plain tasks alone is written too.
            other = await node(setup, kind="task")
            assert await acks.complete([Completion(claimed(other, "task"), "1", 0.0)]) == [True]
        finally:
            await acks.release()  # the pool's close waits for its kept connections
            await store.close()
        assert [(r["id"], r["already_finished"]) for r in again] == [(root, True)]
        assert await statuses(setup, [first, task, other, grandchild]) == {
            first: "cancelled",
            task: "completed",
            other: "completed",
            grandchild: "running",
        }
        assert await setup.fetchval(
            "select cancel_requested from durable.tasks where id = $1", grandchild
        )


# -- any statement ending one task cancelled, and a second cancel of the tree -----------------

ENDINGS: dict[str, Callable[[asyncpg.Connection, int], Awaitable[Any]]] = {
    "complete": lambda c, t: c.fetch(Q["complete"], [t], [t], ["1"]),
    "fail": lambda c, t: c.fetch(Q["fail"], t, t, ERROR),
    "retry_later": lambda c, t: c.fetch(Q["retry_later"], t, t, 0.0, ERROR),
    "mark_cancelled": lambda c, t: c.fetch(Q["mark_cancelled"], t, t),
    "release": lambda c, t: c.fetch(Q["release"], [t], [t]),
    "suspend": lambda c, t: c.fetchval(Q["suspend"], t, t, 0, None, None, "never"),
    "continue_as_new": lambda c, t: c.fetchval(Q["continue_as_new"], t, t, "[]", "{}"),
    "reap_expired": lambda c, t: c.fetch(Q["reap_expired"]),
}
"""Every statement by which a running attempt ends, each ending it cancelled when a cancel
was asked for while it ran (the reaper: when its lease expired)."""


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_an_attempt_ending_cancelled_and_a_second_cancel_do_not_deadlock(
    dsn: str, ending: str
) -> None:
    # The first child, asked to stop, ends its attempt: it ends cancelled, and the trigger
    # cancels the grandchild it started late. A second cancel of the root held the
    # grandchild (newest first) and waited for the first child's row, which the ending
    # statement held while its trigger waited for the grandchild. Here the test holds the
    # second child, so the cancel stops between the grandchild and the first child.
    async with session(dsn) as setup, session(dsn) as probe:
        root, first, second, grandchild = await cancelled_tree(
            setup, expired=ending == "reap_expired"
        )
        async with (
            row_locks(dsn, [second]) as release,
            session(dsn, **QUICK) as cancel_conn,
            session(dsn, **PATIENT) as daemon_conn,
        ):
            cancel = asyncio.ensure_future(cancel_conn.fetch(Q["cancel"], [root]))
            await waits_on_lock(probe, cancel_conn.get_server_pid())
            end = asyncio.ensure_future(ENDINGS[ending](daemon_conn, first))
            # It waits for the grandchild, holding the first child's row (before) or not.
            await waits_on_lock(probe, daemon_conn.get_server_pid())
            await release()
            again = await asyncio.wait_for(cancel, 20)
            await asyncio.wait_for(end, 20)
        # The cancel came first and found the root finished; then the first child ended
        # cancelled and took the grandchild along.
        assert [(r["id"], r["already_finished"]) for r in again] == [(root, True)]
        assert await statuses(setup, [first, second, grandchild]) == {
            first: "cancelled",
            second: "running",
            grandchild: "running",
        }
        assert await setup.fetchval(
            "select cancel_requested from durable.tasks where id = $1", grandchild
        )


async def test_the_reaper_passes_by_an_expired_task_another_statement_holds(dsn: str) -> None:
    # Held: the reaper waits for the descendants of the expired tasks asked to cancel, never
    # for an expired task's own row (a frozen daemon's open transaction may hold it): that
    # one is left for the next pass.
    async with session(dsn) as setup:
        _root, first, second, grandchild = await cancelled_tree(setup, expired=True)
        async with row_locks(dsn, [first]):
            assert await asyncio.wait_for(setup.fetch(Q["reap_expired"]), 20) == []
        assert [tuple(r) for r in await setup.fetch(Q["reap_expired"])] == [(first, "cancelled")]
        assert await statuses(setup, [first, second, grandchild]) == {
            first: "cancelled",
            second: "running",
            grandchild: "running",
        }


# -- held: other statements changing several tasks of one tree, and a cancel of it ----------


async def tree_for(conn: asyncpg.Connection, statement: str) -> list[int]:
    """root < first < second < grandchild (under first, started late, running): the first
    and second children in the state ``statement`` changes, the root waiting on them
    (all three failed, for a retry); for a completion of the grandchild, the first child
    waits on it."""
    if statement in ("retry_many", "restart_each"):
        root = await node(conn, status="failed")
        first = await node(conn, parent=root, status="failed")
        second = await node(conn, parent=root, status="failed")
    else:
        root = await node(conn, status="running")
        first = await node(conn, parent=root)
        second = await node(conn, parent=root)
    grandchild = await node(conn, parent=first)
    children = [first, second]
    if statement == "expire_deadlines":
        await conn.execute(
            "update durable.tasks set status = 'waiting', claim_token = null,"
            " lease_until = null, waiting_on = '{}', deadline = now() - interval '1 second'"
            " where id = any($1)", children,
        )  # fmt: skip
    elif statement == "wake_timers":
        await conn.execute(
            "update durable.tasks set status = 'waiting', claim_token = null,"
            " lease_until = null, wake_at = now() - interval '1 second' where id = any($1)",
            children,
        )  # fmt: skip
    elif statement == "complete_waking":
        await conn.execute(
            "update durable.tasks set status = 'waiting', claim_token = null,"
            " lease_until = null, waiting_on = $2, waiting_left = 1 where id = $1",
            first, [grandchild],
        )  # fmt: skip
    if statement not in ("retry_many", "restart_each"):
        await conn.execute(
            "update durable.tasks set status = 'waiting', claim_token = null,"
            " lease_until = null, waiting_on = $2, waiting_left = 2 where id = $1",
            root, children,
        )  # fmt: skip
    return [root, first, second, grandchild]


async def restart_each(conn: asyncpg.Connection, ids: list[int]) -> None:
    async with conn.transaction():
        for task in ids:
            await conn.fetchval(Q["restart"], task, "retry", None)


STATEMENTS: dict[str, Callable[[asyncpg.Connection, list[int]], Awaitable[Any]]] = {
    "expire_deadlines": lambda c, ids: c.fetch(Q["expire_deadlines"]),
    "wake_timers": lambda c, ids: c.fetch(Q["wake_timers"]),
    "cancel_many": lambda c, ids: c.fetch(Q["cancel"], ids),
    "retry_many": lambda c, ids: c.fetch(Q["retry_many"], ids, ["failed"]),
    "restart_each": restart_each,
    "complete_waking": lambda c, ids: c.fetch(Q["complete"], ids[-1:], ids[-1:], ["1"]),
}
"""Statements that change several tasks of one tree at once: the timer's deadline expiry
and wake-ups, `durable tasks cancel` and `retry` of several tasks (a retry that finds its
tasks one at a time in a transaction too), and a completion that wakes its waiting
parent (the cascade of a finish up the tree)."""


@pytest.mark.parametrize("first_in", ["statement", "cancel"])
@pytest.mark.parametrize("statement", list(STATEMENTS))
async def test_a_statement_on_several_tasks_and_a_cancel_of_the_tree(
    dsn: str, statement: str, first_in: str
) -> None:
    # Held: every one takes the rows of the tree in the cancel's order (children first,
    # newest first) or passes locked rows by. The test holds a child, so whichever of the
    # two comes first stops half way in the tree, holding what it took.
    async with session(dsn) as setup, session(dsn) as probe:
        root, first, second, grandchild = await tree_for(setup, statement)
        targets = [grandchild] if statement == "complete_waking" else [first, second]
        held = first if first_in == "statement" else second
        # A cancel of a finished root stops nothing: a retried tree is cancelled by its
        # children.
        retry = statement in ("retry_many", "restart_each")
        cancelled = [first, second] if retry else [root]
        async with (
            row_locks(dsn, [held]) as release,
            session(dsn, **QUICK) as cancel_conn,
            session(dsn, **PATIENT) as other_conn,
        ):
            if first_in == "statement":
                acting = asyncio.ensure_future(STATEMENTS[statement](other_conn, targets))
                await blocked_or_done(probe, other_conn.get_server_pid(), acting)
            cancel = asyncio.ensure_future(cancel_conn.fetch(Q["cancel"], cancelled))
            await blocked_or_done(probe, cancel_conn.get_server_pid(), cancel)
            if first_in == "cancel":
                acting = asyncio.ensure_future(STATEMENTS[statement](other_conn, targets))
                await blocked_or_done(probe, other_conn.get_server_pid(), acting)
            await release()
            await asyncio.wait_for(cancel, 20)
            await asyncio.wait_for(acting, 20)
        # Whatever came first, every task left unfinished is asked to stop; but a retry
        # after the cancel, which runs its tasks again.
        rows = await setup.fetch(
            "select id, status, cancel_requested from durable.tasks where id = any($1)",
            [root, first, second, grandchild],
        )
        unfinished = {r["id"] for r in rows if r["status"] in ("queued", "running", "waiting")}
        asked = {r["id"] for r in rows if r["cancel_requested"]}
        if retry and first_in == "cancel":
            assert unfinished == {first, second, grandchild}
            assert asked == set()
        else:
            assert grandchild in unfinished or statement == "complete_waking"
            assert unfinished <= asked, rows

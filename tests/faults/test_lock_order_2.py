"""Lock order between task trees, second round: every path that locks several tasks takes
them newest first, children before parents (durable.lock_trees), the order a finishing
child takes (its own row, then its waiting parent's in durable.wake_waiting). A path
that took a parent's row and then a child's, or several rows in another order, waited on
one that waited on it, and Postgres broke the cycle after `deadlock_timeout` by failing
one of them (DeadlockDetectedError).

Each test forces the worst interleaving: a row or advisory lock held by the test stops
one statement half way, the other is started and seen waiting (pg_stat_activity), then
the lock goes. The session that would detect a deadlock first has a short
`deadlock_timeout`, the other a long one, so a deadlock fails the same statement every
time. Never a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from durable.store.schema import queries
from tests.faults.test_children_attacks import tree, waits_on_lock
from tests.support.helpers import blocked_or_done

Q = queries()
WAKE_LOCK = 1685418593
"""The advisory lock class durable.wake_waiting and durable.suspend take per parent."""
ERROR = '{"type": "x", "message": "boom"}'
PATIENT = {"deadlock_timeout": "100s"}
"""A session that waits without looking for a deadlock (the other side looks)."""
QUICK = {"deadlock_timeout": "1500ms"}
"""A session that looks for a deadlock soon after it starts to wait."""


@asynccontextmanager
async def session(dsn: str, **settings: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, server_settings=settings or None)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def row_locks(dsn: str, ids: list[int]) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Hold the rows of ``ids`` locked (FOR UPDATE) in an open transaction; the block gets
    a function that lets them go (they go at the end of the block in any case)."""
    async with session(dsn) as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("select 1 from durable.tasks where id = any($1) for update", ids)
        held = True

        async def release() -> None:
            nonlocal held
            if held:
                held = False
                await tx.rollback()

        try:
            yield release
        finally:
            await release()


async def statuses(conn: asyncpg.Connection, ids: list[int]) -> dict[int, str]:
    rows = await conn.fetch("select id, status from durable.tasks where id = any($1)", ids)
    return {r["id"]: r["status"] for r in rows}


async def running(
    conn: asyncpg.Connection, *, parent: int | None = None, kind: str = "task"
) -> int:
    """A task running under a claim whose token is its id (a child of ``parent``, recorded
    as its pending child event, as a spawn leaves it)."""
    task = int(await conn.fetchval(
        "insert into durable.tasks (queue, name, kind, status, parent_id, root_id,"
        " claim_token, lease_until, started_at)"
        " values ('lock_order', 'node', $1, 'running', $2, $2, 1,"
        "         now() + interval '1 hour', now()) returning id",
        kind, parent,
    ))  # fmt: skip
    await conn.execute("update durable.tasks set claim_token = id where id = $1", task)
    if parent is not None:
        await conn.execute(
            "insert into durable.events (task_id, branch, seq, kind, name, digest, status,"
            " child_id, attempt)"
            " select $1, 0, coalesce(max(seq) + 1, 0), 'child', 'node', 'd', 'pending', $2, 1"
            "   from durable.events where task_id = $1",
            parent, task,
        )  # fmt: skip
    return task


async def failed_with_running_child(conn: asyncpg.Connection) -> tuple[int, int]:
    """A workflow that failed while a child it spawned still runs."""
    parent = await running(conn, kind="workflow")
    child = await running(conn, parent=parent)
    await conn.fetch(Q["fail"], parent, parent, ERROR)
    return parent, child


# -- a bulk retry (retry_many) and a cancel of the same tree ----------------------------------


async def test_a_bulk_retry_and_a_cancel_of_the_same_tree_do_not_deadlock(dsn: str) -> None:
    # `durable tasks retry --status failed` (retry_many) took the tasks it picked one at a
    # time, in id order, each one's row and then (durable.restart) its unfinished
    # children's. Picking a failed workflow and its failed child, it held the workflow and
    # then wanted the grandchild, while a cancel of the workflow (children first) held the
    # grandchild and waited for a child the retry had taken: Postgres failed the cancel
    # with DeadlockDetectedError. Here the retry is stopped at the workflow's running
    # child, held by the test.
    async with session(dsn) as setup, session(dsn) as probe:
        parent = await running(setup, kind="workflow")
        child = await running(setup, parent=parent, kind="workflow")
        sibling = await running(setup, parent=parent)
        grandchild = await running(setup, parent=child)
        await setup.fetch(Q["fail"], child, child, ERROR)
        await setup.fetch(Q["fail"], parent, parent, ERROR)
        async with (
            row_locks(dsn, [sibling]) as release,
            session(dsn, **PATIENT) as retry_conn,
            session(dsn, **QUICK) as cancel_conn,
        ):
            retry = asyncio.ensure_future(
                retry_conn.fetch(Q["retry_many"], [parent, child], ["failed"])
            )
            await waits_on_lock(probe, retry_conn.get_server_pid())
            cancel = asyncio.ensure_future(cancel_conn.fetch(Q["cancel"], [parent]))
            await waits_on_lock(probe, cancel_conn.get_server_pid())
            await release()
            retried = await asyncio.wait_for(retry, 20)
            cancelled = await asyncio.wait_for(cancel, 20)
        assert sorted(r["id"] for r in retried) == [parent, child]
        # The cancel came second: it ends the retried tree, the running tasks asked to stop.
        assert {(r["id"], r["status"]) for r in cancelled} == {
            (parent, "cancelled"),
            (child, "cancelled"),
            (sibling, "running"),
            (grandchild, "running"),
        }
        assert await setup.fetchval(
            "select bool_and(cancel_requested) from durable.tasks where id = any($1)",
            [sibling, grandchild],
        )


async def test_a_bulk_retry_as_a_child_fails_runs_the_child_again(dsn: str) -> None:
    # Held: the child's failure is being written (its transaction holds the child's row and
    # waits, gated, to wake its parent) as retry_many restarts the parent. The retry waits
    # for the child's row, sees the failure and drops the child's event: the retried
    # parent starts that child again instead of failing with its old error.
    async with session(dsn) as setup, session(dsn) as gate, session(dsn) as probe:
        parent, child = await failed_with_running_child(setup)
        await gate.execute("select pg_advisory_lock($1, $2)", WAKE_LOCK, parent)
        async with session(dsn, **PATIENT) as child_conn, session(dsn, **QUICK) as retry_conn:
            failing = asyncio.ensure_future(child_conn.fetch(Q["fail"], child, child, ERROR))
            await waits_on_lock(probe, child_conn.get_server_pid(), "advisory")
            retry = asyncio.ensure_future(retry_conn.fetch(Q["retry_many"], [parent], ["failed"]))
            await waits_on_lock(probe, retry_conn.get_server_pid())
            await gate.execute("select pg_advisory_unlock($1, $2)", WAKE_LOCK, parent)
            assert len(await asyncio.wait_for(failing, 20)) == 1
            assert [r["id"] for r in await asyncio.wait_for(retry, 20)] == [parent]
        assert await statuses(setup, [parent, child]) == {parent: "queued", child: "failed"}
        assert (
            await setup.fetchval("select count(*) from durable.events where task_id = $1", parent)
            == 0
        )


async def test_a_bulk_retry_skips_a_task_retried_meanwhile(dsn: str) -> None:
    # Held: a bulk retry that meets a task `durable tasks retry ID` holds (it waits for the
    # row now, where it used to pass it by) reads the task again once that retry commits,
    # and skips it (already queued) rather than fail on restarting an unfinished task.
    async with session(dsn) as setup, session(dsn) as probe:
        parent, child = await failed_with_running_child(setup)
        async with session(dsn) as single, session(dsn, **QUICK) as bulk_conn:
            tx = single.transaction()
            await tx.start()
            assert await single.fetchval(Q["restart"], parent, "retry", None) == 0
            bulk = asyncio.ensure_future(bulk_conn.fetch(Q["retry_many"], [parent], ["failed"]))
            try:
                await blocked_or_done(probe, bulk_conn.get_server_pid(), bulk)
            finally:
                await tx.commit()
            assert await asyncio.wait_for(bulk, 20) == []
        assert await statuses(setup, [parent, child]) == {parent: "queued", child: "running"}
        assert await setup.fetchval("select attempt from durable.tasks where id = $1", parent) == 2


# -- an attempt that ends cancelled, its cascade, and a grandchild finishing ------------------

ENDINGS: dict[str, Callable[[asyncpg.Connection, int], Awaitable[Any]]] = {
    "complete": lambda c, t: c.fetch(Q["complete"], [t], [7], ["1"]),
    "fail": lambda c, t: c.fetch(Q["fail"], t, 7, ERROR),
    "retry_later": lambda c, t: c.fetch(Q["retry_later"], t, 7, 0.0, ERROR),
    "mark_cancelled": lambda c, t: c.fetch(Q["mark_cancelled"], t, 7),
    "release": lambda c, t: c.fetch(Q["release"], [t], [7]),
    "suspend": lambda c, t: c.fetchval(Q["suspend"], t, 7, 0, None, None, "never"),
    "continue_as_new": lambda c, t: c.fetchval(Q["continue_as_new"], t, 7, "[]", "{}"),
    "reap_expired": lambda c, t: c.fetch(Q["reap_expired"]),
}
"""Every statement by which a running attempt ends, each ending it cancelled when a cancel
was asked for while it ran."""


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_an_attempt_ending_cancelled_and_a_grandchild_finishing_do_not_deadlock(
    dsn: str, ending: str
) -> None:
    # A workflow asked to stop while it ran (it had started a child since the cancel's own
    # cascade) ends cancelled; the update trigger then cancels its descendants
    # (durable.cancel_descendants), taking the waiting child's row and then the running
    # grandchild's. The grandchild, finishing at that moment, held its own row and waited
    # for its waiting parent's (durable.wake_waiting): Postgres failed the attempt's write
    # with DeadlockDetectedError.
    async with session(dsn) as setup, session(dsn) as gate, session(dsn) as probe:
        (root,), (child,), (grandchild,) = await tree(setup, depth=2)
        await setup.execute(
            "update durable.tasks set status = 'running', claim_token = 7, waiting_on = null,"
            " cancel_requested = true, lease_until = now() + interval '1 hour'"
            " where id = $1", root,
        )  # fmt: skip
        if ending == "reap_expired":
            await setup.execute(
                "update durable.tasks set lease_until = now() - interval '1 second'"
                " where id = $1", root,
            )  # fmt: skip
        await gate.execute("select pg_advisory_lock($1, $2)", WAKE_LOCK, child)
        async with session(dsn, **PATIENT) as leaf_conn, session(dsn, **QUICK) as root_conn:
            finish = asyncio.ensure_future(
                leaf_conn.fetch(Q["complete"], [grandchild], [grandchild], ["1"])
            )
            # The grandchild's completion holds its row and waits to wake the child.
            await waits_on_lock(probe, leaf_conn.get_server_pid(), "advisory")
            end = asyncio.ensure_future(ENDINGS[ending](root_conn, root))
            await waits_on_lock(probe, root_conn.get_server_pid())
            await gate.execute("select pg_advisory_unlock($1, $2)", WAKE_LOCK, child)
            assert [r["id"] for r in await asyncio.wait_for(finish, 20)] == [grandchild]
            await asyncio.wait_for(end, 20)
        # The grandchild finished first and woke the child; the cascade cancelled it.
        assert await statuses(setup, [root, child, grandchild]) == {
            root: "cancelled",
            child: "cancelled",
            grandchild: "completed",
        }


# -- one statement writing several running tasks of one tree ----------------------------------

BATCHES: dict[str, Callable[[asyncpg.Connection, list[int]], Awaitable[Any]]] = {
    "complete": lambda c, ids: c.fetch(Q["complete"], ids, ids, ["1"] * len(ids)),
    "release": lambda c, ids: c.fetch(Q["release"], ids, ids),
    "checkpoint": lambda c, ids: c.fetch(
        Q["checkpoint"],
        [(t, t, 0, 5, "step", "s", "d", "completed", "1", None, 1, 0.0, None) for t in ids],
    ),
}
"""The group writes of many attempts' outcomes or steps (durable/acks.py) and the hand-back
at shutdown: one statement, many running tasks (claim token = id, see ``running``)."""


@pytest.mark.parametrize("shape", ["parent_and_child", "siblings", "bulk_cancel"])
@pytest.mark.parametrize("batch", list(BATCHES))
async def test_a_batch_and_a_cancel_of_the_same_tasks_do_not_deadlock(
    dsn: str, batch: str, shape: str
) -> None:
    # Two children of a workflow finishing in one group commit (or a workflow that returned
    # while a child it spawned still ran, both in one commit; or both handed back at
    # shutdown; or two plain tasks in the batch and in one `durable tasks cancel --status
    # running`): the statement took the rows in the order it was given them, the older
    # first, while the cancel (durable.lock_trees: newest first) held the newer and waited
    # for the older. Postgres failed the cancel with DeadlockDetectedError. Here an
    # unrelated running task between the two, held by the test, stops the batch half way.
    async with session(dsn) as setup, session(dsn) as probe:
        if shape == "bulk_cancel":
            first = await running(setup)
            tree_ = [first]
        else:
            parent = await running(setup, kind="workflow")
            first = parent if shape == "parent_and_child" else await running(setup, parent=parent)
            tree_ = [parent, first]
        other = await running(setup)
        second = await running(setup, parent=None if shape == "bulk_cancel" else tree_[0])
        targets = [first, second] if shape == "bulk_cancel" else [tree_[0]]
        tree_ = sorted({*tree_, second})
        ids = [first, other, second]
        async with (
            row_locks(dsn, [other]) as release,
            session(dsn, **PATIENT) as daemon_conn,
            session(dsn, **QUICK) as cancel_conn,
        ):
            written = asyncio.ensure_future(BATCHES[batch](daemon_conn, ids))
            await waits_on_lock(probe, daemon_conn.get_server_pid())
            cancel = asyncio.ensure_future(cancel_conn.fetch(Q["cancel"], targets))
            await waits_on_lock(probe, cancel_conn.get_server_pid())
            await release()
            await asyncio.wait_for(written, 20)
            await asyncio.wait_for(cancel, 20)
        # The batch came first, then the cancel: what the batch finished stays finished,
        # what it handed back is cancelled, and what still runs is asked to stop.
        outcome = {"complete": "completed", "release": "cancelled", "checkpoint": "running"}
        expected = {t: "running" for t in tree_} | {t: outcome[batch] for t in (first, second)}
        expected[other] = {"complete": "completed", "release": "queued"}.get(batch, "running")
        assert await statuses(setup, [*tree_, other]) == expected
        unfinished = await setup.fetch(
            "select id, cancel_requested from durable.tasks"
            " where id = any($1) and status not in ('completed', 'cancelled')",
            tree_,
        )
        assert all(r["cancel_requested"] for r in unfinished), unfinished


# -- retention: a prune statement and a tree changed under it --------------------------------

DAY = 86400.0


async def finished(
    conn: asyncpg.Connection, status: str, *, parent: int | None = None, root: int | None = None
) -> int:
    """A workflow that finished (``status``) two days ago, old enough to be pruned."""
    return int(await conn.fetchval(
        "insert into durable.tasks (queue, name, kind, status, parent_id, root_id, created_at,"
        " finished_at) values ('lock_order', 'node', 'workflow', $1::text, $2, $3,"
        " now() - interval '3 days', now() - interval '2 days') returning id",
        status, parent, root,
    ))  # fmt: skip


async def old_trees(conn: asyncpg.Connection) -> tuple[int, int, int, int]:
    """Two finished trees of a root and a child each, created in this order; the first
    child failed before its parent saw it (its event is pending)."""
    root = await finished(conn, "failed")
    child = await finished(conn, "failed", parent=root, root=root)
    await conn.execute(
        "insert into durable.events (task_id, branch, seq, kind, name, digest, status,"
        " child_id, attempt) values ($1, 0, 0, 'child', 'node', 'd', 'pending', $2, 1)",
        root, child,
    )  # fmt: skip
    root2 = await finished(conn, "completed")
    child2 = await finished(conn, "completed", parent=root2, root=root2)
    return root, child, root2, child2


ACTIONS: dict[str, Callable[[asyncpg.Connection, int, int], Awaitable[Any]]] = {
    "cancel": lambda c, root, child: c.fetch(Q["cancel"], [root]),
    "retry_many": lambda c, root, child: c.fetch(Q["retry_many"], [root, child], ["failed"]),
}
"""What an operator does to a tree a prune statement has already read."""


@pytest.mark.parametrize("action", list(ACTIONS))
async def test_a_prune_and_an_action_on_a_tree_it_read_do_not_deadlock(
    dsn: str, action: str
) -> None:
    # A prune statement (prune_trees) locked the roots of the trees it read as finished,
    # then deleted their tasks newest first. A child retried alone after that statement
    # began (`durable tasks retry CHILD`), then its tree cancelled (durable.cancel locks
    # the unfinished child, then the root) or retried (retry_many, children first): the
    # prune held the root and waited for the child's row, the other held the child's and
    # waited for the root's, and Postgres failed it with DeadlockDetectedError. Here the
    # prune is stopped at a second tree's root, held by the test.
    async with session(dsn) as setup, session(dsn) as probe:
        root, child, root2, child2 = await old_trees(setup)
        cutoff = await setup.fetchval(Q["prune_cutoff"], DAY)
        async with (
            row_locks(dsn, [root2]) as release,
            session(dsn, **PATIENT) as prune_conn,
            session(dsn, **QUICK) as other_conn,
        ):
            pruning = asyncio.ensure_future(
                prune_conn.fetch(Q["prune_trees"], [root, root2], cutoff, 1000)
            )
            await waits_on_lock(probe, prune_conn.get_server_pid())
            if action == "cancel":
                assert await setup.fetchval(Q["restart"], child, "retry", None) == 0
            acting = asyncio.ensure_future(ACTIONS[action](other_conn, root, child))
            await blocked_or_done(probe, other_conn.get_server_pid(), acting)
            await release()
            await asyncio.wait_for(acting, 20)
            pruned = await asyncio.wait_for(pruning, 20)
        # The first tree is running again (all of it or the child): it stays, whole. Of the
        # second, the child goes in this statement, the root in the next.
        left = await statuses(setup, [root, child, root2, child2])
        assert pruned[0]["tasks"] == 1
        if action == "cancel":
            assert left == {root: "failed", child: "queued", root2: "completed"}
        else:
            assert left == {root: "queued", child: "queued", root2: "completed"}


# -- held: restarts and wake-ups take the same order -----------------------------------------


@pytest.mark.parametrize("mode", ["retry", "replay", "fork"])
async def test_a_restart_and_a_cancel_of_the_same_tree_do_not_deadlock(dsn: str, mode: str) -> None:
    # Held: durable.restart (`durable tasks retry/replay/fork`) locks the unfinished
    # children before the task itself, as the cancel does: stopped at the child, the
    # restart holds nothing the cancel needs, and the cancel that follows it ends the
    # restarted tree.
    async with session(dsn) as setup, session(dsn) as probe:
        parent, child = await failed_with_running_child(setup)
        async with (
            row_locks(dsn, [child]) as release,
            session(dsn, **PATIENT) as restart_conn,
            session(dsn, **QUICK) as cancel_conn,
        ):
            restart = asyncio.ensure_future(
                restart_conn.fetchval(Q["restart"], parent, mode, 1 if mode == "fork" else None)
            )
            await waits_on_lock(probe, restart_conn.get_server_pid())
            cancel = asyncio.ensure_future(cancel_conn.fetch(Q["cancel"], [parent]))
            await waits_on_lock(probe, cancel_conn.get_server_pid())
            await release()
            assert await asyncio.wait_for(restart, 20) == (0 if mode == "retry" else 1)
            await asyncio.wait_for(cancel, 20)
        assert await statuses(setup, [parent, child]) == {parent: "cancelled", child: "running"}
        assert await setup.fetchval(
            "select cancel_requested from durable.tasks where id = $1", child
        )


async def test_children_of_two_parents_finishing_together_and_a_cancel_of_both(dsn: str) -> None:
    # Held: one completion statement finishing the children of two waiting workflows holds
    # both children and then locks the parents (durable.wake_waiting, in id order); a
    # cancel of both trees (children first) waits for the children before it takes any
    # parent, so neither holds what the other waits for.
    async with session(dsn) as setup, session(dsn) as gate, session(dsn) as probe:
        (first,), (first_child,) = await tree(setup)
        (second,), (second_child,) = await tree(setup)
        await gate.execute("select pg_advisory_lock($1, $2)", WAKE_LOCK, first)
        kids = [first_child, second_child]
        async with session(dsn, **PATIENT) as daemon_conn, session(dsn, **QUICK) as cancel_conn:
            finish = asyncio.ensure_future(daemon_conn.fetch(Q["complete"], kids, kids, ["1", "1"]))
            await waits_on_lock(probe, daemon_conn.get_server_pid(), "advisory")
            cancel = asyncio.ensure_future(cancel_conn.fetch(Q["cancel"], [second, first]))
            await waits_on_lock(probe, cancel_conn.get_server_pid())
            await gate.execute("select pg_advisory_unlock($1, $2)", WAKE_LOCK, first)
            assert len(await asyncio.wait_for(finish, 20)) == 2
            await asyncio.wait_for(cancel, 20)
        assert await statuses(setup, [first, second, *kids]) == {
            first: "cancelled",
            second: "cancelled",
            first_child: "completed",
            second_child: "completed",
        }

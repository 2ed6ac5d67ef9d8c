"""Attacks on child workflows and cancellation (durable/children.py, durable.cancel,
durable.cancel_descendants, durable.wake_waiting, durable.suspend).

Each test either guards a promise that held under a nasty interleaving, or exposes a
broken one (fixed since). Interleavings are forced with advisory locks held by the test
and by waiting on what the server says a session waits for, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from durable.store.schema import queries
from tests.support.helpers import wait_for

Q = queries()
WAKE_LOCK = 1685418593
"""The advisory lock class durable.wake_waiting and durable.suspend take per parent."""


@asynccontextmanager
async def session(dsn: str, **settings: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, server_settings=settings or None)
    try:
        yield conn
    finally:
        await conn.close()


async def waits_on_lock(probe: asyncpg.Connection, pid: int, kind: str | None = None) -> None:
    """Until session ``pid`` waits for a heavyweight lock (of ``kind``: 'advisory',
    'transactionid', 'tuple'...)."""

    async def check() -> bool:
        row = await probe.fetchrow(
            "select wait_event_type, wait_event from pg_stat_activity where pid = $1", pid
        )
        return bool(row and row[0] == "Lock" and (kind is None or row[1] == kind))

    await wait_for(check, interval=0.005)


async def tree(conn: asyncpg.Connection, *, depth: int = 1, width: int = 1) -> list[list[int]]:
    """A workflow tree as a daemon leaves it: each inner node waiting on its children,
    the leaves running under a claim (token = id). Returns the ids level by level."""
    root = await conn.fetchval(
        "insert into durable.tasks (queue, name, kind, status) values"
        " ('attack_children', 'root', 'workflow', 'waiting') returning id"
    )
    levels = [[root]]
    for d in range(depth):
        last = d == depth - 1
        level: list[int] = []
        for parent in levels[-1]:
            kids = [
                r[0]
                for r in await conn.fetch(
                    "insert into durable.tasks (queue, name, kind, status, parent_id, root_id,"
                    " claim_token, lease_until, started_at)"
                    " select 'attack_children', 'node', $3::text, $4::text, $1, $2,"
                    "        case when $5 then 1 end, case when $5 then now() + interval '1 hour' end,"
                    "        now()"
                    "   from generate_series(1, $6) order by 1 returning id",
                    parent, root, "task" if last else "workflow",
                    "running" if last else "waiting", last, width,
                )
            ]
            await conn.execute(
                "update durable.tasks set waiting_on = $2 where id = $1", parent, kids
            )
            level.extend(kids)
        levels.append(level)
    if levels[-1]:
        await conn.execute(
            "update durable.tasks set claim_token = id where id = any($1)", levels[-1]
        )
    return levels


async def test_a_cancel_and_a_child_finishing_at_once_do_not_deadlock(dsn: str) -> None:
    # A child's completion locks the child's row, then (durable.wake_waiting, from the
    # trigger) its waiting parent's. A cancel of the parent locked the parent's row, then
    # the children's: the two waited for each other and Postgres killed one of them (the
    # cancel here, as it waits longest: `client.cancel` raised DeadlockDetectedError).
    async with session(dsn) as setup, session(dsn) as gate, session(dsn) as probe:
        (parent,), (child,) = await tree(setup)
        await gate.execute("select pg_advisory_lock($1, $2)", WAKE_LOCK, parent)
        async with session(dsn, deadlock_timeout="100s") as daemon_conn, session(
            dsn, deadlock_timeout="1500ms"
        ) as client_conn:
            finish = asyncio.ensure_future(
                daemon_conn.fetch(Q["complete"], [child], [child], ["1"])
            )
            # The completion holds the child's row and waits to wake the parent.
            await waits_on_lock(probe, daemon_conn.get_server_pid(), "advisory")
            cancel = asyncio.ensure_future(client_conn.fetch(Q["cancel"], [parent]))
            await waits_on_lock(probe, client_conn.get_server_pid())
            await gate.execute("select pg_advisory_unlock($1, $2)", WAKE_LOCK, parent)
            done = await asyncio.wait_for(finish, 20)
            rows = await asyncio.wait_for(cancel, 20)
        assert [r["id"] for r in done] == [child]
        assert {(r["id"], r["status"]) for r in rows} == {(parent, "cancelled")}
        assert await setup.fetchval("select status from durable.tasks where id = $1",
                                    child) == "completed"


async def test_a_deadline_expiry_and_a_child_finishing_at_once_do_not_deadlock(dsn: str) -> None:
    # The same lock order in the timer loop's expiry of a waiting workflow past its
    # deadline: it locked the workflow's row, then cancelled its children.
    async with session(dsn) as setup, session(dsn) as gate, session(dsn) as probe:
        (parent,), (child,) = await tree(setup)
        await setup.execute(
            "update durable.tasks set deadline = now() - interval '1 second' where id = $1",
            parent,
        )
        await gate.execute("select pg_advisory_lock($1, $2)", WAKE_LOCK, parent)
        async with session(dsn, deadlock_timeout="100s") as daemon_conn, session(
            dsn, deadlock_timeout="1500ms"
        ) as timer_conn:
            finish = asyncio.ensure_future(
                daemon_conn.fetch(Q["complete"], [child], [child], ["1"])
            )
            await waits_on_lock(probe, daemon_conn.get_server_pid(), "advisory")
            expire = asyncio.ensure_future(timer_conn.fetch(Q["expire_deadlines"]))
            await waits_on_lock(probe, timer_conn.get_server_pid())
            await gate.execute("select pg_advisory_unlock($1, $2)", WAKE_LOCK, parent)
            done = await asyncio.wait_for(finish, 20)
            expired = await asyncio.wait_for(expire, 20)
        assert [r["id"] for r in done] == [child]
        assert [(r["id"], r["status"]) for r in expired] == [(parent, "failed")]
        assert await setup.fetchval("select status from durable.tasks where id = $1",
                                    child) == "completed"


@pytest.mark.parametrize("first", ["suspend", "finish"])
async def test_a_child_finishing_as_its_parent_suspends_wakes_the_parent_once(
    dsn: str, first: str
) -> None:
    # Held: the parent's suspension and the child's wake-up queue on the same advisory
    # lock, in either order, and the parent ends queued, never left waiting.
    async with session(dsn) as setup, session(dsn) as gate, session(dsn) as probe:
        (parent,), (child,) = await tree(setup)
        await setup.execute(
            "update durable.tasks set status = 'running', claim_token = 7, waiting_on = null,"
            " lease_until = now() + interval '1 hour' where id = $1", parent,
        )
        await gate.execute("select pg_advisory_lock($1, $2)", WAKE_LOCK, parent)
        async with session(dsn) as parent_conn, session(dsn) as child_conn:
            calls: dict[str, tuple[asyncpg.Connection, Any]] = {
                "suspend": (parent_conn, lambda: parent_conn.fetchval(
                    Q["suspend"], parent, 7, 0, [child], None, None)),
                "finish": (child_conn, lambda: child_conn.fetch(
                    Q["complete"], [child], [child], ["1"])),
            }
            order = [first, "finish" if first == "suspend" else "suspend"]
            pending = {}
            for name in order:
                conn, call = calls[name]
                pending[name] = asyncio.ensure_future(call())
                await waits_on_lock(probe, conn.get_server_pid(), "advisory")
            await gate.execute("select pg_advisory_unlock($1, $2)", WAKE_LOCK, parent)
            suspended = await asyncio.wait_for(pending["suspend"], 20)
            await asyncio.wait_for(pending["finish"], 20)
        assert suspended == ("waiting" if first == "suspend" else "queued")
        row = await setup.fetchrow(
            "select status, waiting_on from durable.tasks where id = $1", parent
        )
        assert row is not None
        assert (row["status"], row["waiting_on"]) == ("queued", None)


async def test_a_cancel_during_a_spawn_leaves_no_child_behind(dsn: str) -> None:
    # Held: the spawn's fenced transaction has inserted its children and waits for its
    # parent's row, which a cancel holds. The cancel commits first; the spawn then sees
    # the request and rolls back: no child exists, the parent ends cancelled.
    async with session(dsn) as setup, session(dsn) as probe:
        (parent,), (_child,) = await tree(setup)
        await setup.execute(
            "update durable.tasks set status = 'running', claim_token = 7, waiting_on = null,"
            " lease_until = now() + interval '1 hour' where id = $1", parent,
        )
        before = await setup.fetchval(
            "select count(*) from durable.tasks where parent_id = $1", parent
        )
        async with session(dsn) as canceller, session(dsn) as spawner:
            cancelling = canceller.transaction()
            await cancelling.start()
            rows = await canceller.fetch(Q["cancel"], [parent])
            assert {r["id"] for r in rows} >= {parent}
            spawn = spawner.transaction()
            await spawn.start()
            await spawner.fetch(
                Q["insert_children"], ["attack_children"], ["late"], ["task"], ["[]"],
                ["{}"], [0], [1], [None], [0], parent, parent, [None], [None], [None],
                [None], [None], [None], [None],
            )
            fence = asyncio.ensure_future(spawner.fetchval(Q["fence_lock"], parent, 7, 30.0))
            await waits_on_lock(probe, spawner.get_server_pid())
            await cancelling.commit()
            assert await asyncio.wait_for(fence, 20) is True  # cancel_requested: roll back
            await spawn.rollback()
        assert await setup.fetchval(
            "select count(*) from durable.tasks where parent_id = $1", parent
        ) == before
        # The child from before is running: asked to stop, it ends cancelled.
        assert await setup.fetchval(
            "select count(*) from durable.tasks where parent_id = $1"
            " and not cancel_requested and status not in ('cancelled', 'completed', 'failed')",
            parent,
        ) == 0


@pytest.mark.parametrize(("depth", "width"), [(50, 1), (1, 2000)])
async def test_cancelling_a_deep_or_wide_tree_while_a_leaf_finishes(
    dsn: str, depth: int, width: int
) -> None:
    # A leaf finishes (and wakes its waiting parent) while the root's cancel walks the
    # tree: no deadlock, and every task of the tree ends cancelled or finished, none left
    # queued or waiting for ever.
    async with session(dsn) as setup, session(dsn) as gate, session(dsn) as probe:
        levels = await tree(setup, depth=depth, width=width)
        leaf, leaf_parent = levels[-1][-1], levels[-2][-1]
        await gate.execute("select pg_advisory_lock($1, $2)", WAKE_LOCK, leaf_parent)
        async with session(dsn, deadlock_timeout="100s") as daemon_conn, session(
            dsn, deadlock_timeout="1500ms"
        ) as client_conn:
            finish = asyncio.ensure_future(
                daemon_conn.fetch(Q["complete"], [leaf], [leaf], ["1"])
            )
            await waits_on_lock(probe, daemon_conn.get_server_pid(), "advisory")
            cancel = asyncio.ensure_future(client_conn.fetch(Q["cancel"], [levels[0][0]]))
            await waits_on_lock(probe, client_conn.get_server_pid())
            await gate.execute("select pg_advisory_unlock($1, $2)", WAKE_LOCK, leaf_parent)
            await asyncio.wait_for(finish, 20)
            await asyncio.wait_for(cancel, 20)
        everyone = [i for level in levels for i in level]
        left = await setup.fetch(
            "select id, status from durable.tasks where id = any($1)"
            " and status in ('queued', 'waiting')", everyone,
        )
        assert left == []
        running = await setup.fetchval(
            "select count(*) from durable.tasks where id = any($1) and status = 'running'"
            " and not cancel_requested", everyone,
        )
        assert running == 0
        assert await setup.fetchval(
            "select status from durable.tasks where id = $1", leaf
        ) == "completed"

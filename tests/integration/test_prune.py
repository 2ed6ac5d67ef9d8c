"""Pruning finished tasks (`Store.prune`, DURABLE_RETENTION) against a real Postgres.

Tasks are written straight into the tables with finished_at in the past: the database's
clock is the one prune reads, and the test sets the ages instead of waiting them out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import asyncpg

from durable.daemon import Daemon
from durable.models import PruneResult
from durable.registry import registry
from durable.store import PRUNE_LOCK, Store
from tests.support.helpers import running_daemon, settings, wait_for

DAY = 86400.0


@asynccontextmanager
async def connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def make(
    conn: asyncpg.Connection,
    status: str,
    *,
    finished: str | None = "2 days",
    parent: int | None = None,
    root: int | None = None,
    events: int = 0,
    signals: int = 0,
) -> int:
    """A task in ``status`` that finished ``finished`` ago (for finished statuses)."""
    done = status in ("completed", "failed", "cancelled")
    task_id: int = await conn.fetchval(
        """
        insert into durable.tasks (queue, name, kind, status, parent_id, root_id, created_at,
                                   finished_at, claim_token, lease_until)
        values ('p', 'p_task', 'workflow', $1::text, $2, $3, now() - interval '3 days',
                case when $4 then now() - $5::text::interval end,
                case when $1 = 'running' then 1 end,
                case when $1 = 'running' then now() + interval '1 hour' end)
        returning id
        """,
        status, parent, root, done, finished or "0 seconds",
    )  # fmt: skip
    for seq in range(events):
        await conn.execute(
            "insert into durable.events (task_id, branch, seq, kind, name, digest, status,"
            " attempt) values ($1, 0, $2, 'step', 's', 'd', 'completed', 1)",
            task_id, seq,
        )  # fmt: skip
    for _ in range(signals):
        await conn.execute("insert into durable.signals (task_id, name) values ($1, 'go')", task_id)
    return task_id


async def remaining(conn: asyncpg.Connection) -> set[int]:
    return {r["id"] for r in await conn.fetch("select id from durable.tasks")}


async def build_history(conn: asyncpg.Connection) -> tuple[set[int], set[int]]:
    """Tasks in every situation; returns (ids prune must delete, ids it must keep)."""
    gone: set[int] = set()
    kept: set[int] = set()
    # Plain tasks.
    gone.add(await make(conn, "completed", events=3, signals=1))
    gone.add(await make(conn, "failed", events=1))
    gone.add(await make(conn, "cancelled", signals=2))
    kept.add(await make(conn, "completed", finished="10 minutes", events=2))
    kept.add(await make(conn, "queued"))
    kept.add(await make(conn, "running"))
    kept.add(await make(conn, "waiting"))
    # A finished tree: root, child, grandchild, all old. Goes as a whole.
    root = await make(conn, "completed", events=2)
    child = await make(conn, "completed", parent=root, root=root, events=1)
    grandchild = await make(conn, "failed", parent=child, root=root)
    gone |= {root, child, grandchild}
    # A finished root with a child still running: nothing of it goes.
    root = await make(conn, "failed", events=1)
    done_child = await make(conn, "completed", parent=root, root=root)
    running_child = await make(conn, "running", parent=root, root=root)
    kept |= {root, done_child, running_child}
    # A waiting parent: its old finished children stay with it.
    root = await make(conn, "waiting", events=1)
    kept |= {root, await make(conn, "completed", parent=root, root=root, events=1)}
    # A grandchild queued under finished parents: the whole tree stays.
    root = await make(conn, "completed")
    child = await make(conn, "completed", parent=root, root=root)
    kept |= {root, child, await make(conn, "queued", parent=child, root=root)}
    # An old root whose child finished only recently: stays until the child is old too.
    root = await make(conn, "completed")
    kept |= {root, await make(conn, "completed", finished="1 minute", parent=root, root=root)}
    return gone, kept


async def test_prune_deletes_only_old_finished_trees(dsn: str) -> None:
    async with connection(dsn) as conn:
        gone, kept = await build_history(conn)
        events_before = await conn.fetchval("select count(*) from durable.events")
        kept_events = await conn.fetchval(
            "select count(*) from durable.events where task_id = any($1::bigint[])", list(kept)
        )
        store = await Store.open(dsn, max_size=2)
        try:
            progress: list[PruneResult] = []
            # Tiny batches: many windows and many statements, descendants before roots.
            result = await store.prune(DAY, batch=2, progress=progress.append)
            again = await store.prune(DAY, batch=2)
        finally:
            await store.close()
        assert await remaining(conn) == kept
        assert result == PruneResult(tasks=len(gone), events=events_before - kept_events,
                                     signals=3)  # fmt: skip
        assert await conn.fetchval("select count(*) from durable.events") == kept_events
        assert await conn.fetchval("select count(*) from durable.signals") == 0
        assert len(progress) > 1 and progress[-1].tasks == len(gone)
        assert again == PruneResult()


async def test_a_task_deleted_by_hand_takes_its_events_with_it(dsn: str) -> None:
    # The event log has no foreign key to its task (a trigger does the cascade): tasks
    # deleted by a statement of the user's own, one or many at once, leave no events
    # behind, and the events of the tasks that stay are untouched.
    async with connection(dsn) as conn:
        a, b, c = [await make(conn, "completed", events=n) for n in (3, 2, 4)]
        await conn.execute("delete from durable.tasks where id = $1", a)
        assert await conn.fetchval("select count(*) from durable.events") == 6
        await conn.execute("delete from durable.tasks where id = any($1::bigint[])", [b, c])
        assert await conn.fetchval("select count(*) from durable.events") == 0
        kept = await make(conn, "completed", events=2)
        async with conn.transaction():  # deleted and re-read within one transaction
            await conn.execute("delete from durable.tasks where id <> $1", kept)
            rows = await conn.fetch("select task_id, count(*) from durable.events group by task_id")
            assert [tuple(r) for r in rows] == [(kept, 2)]


async def test_a_parent_deleted_by_hand_leaves_its_children_without_a_parent(dsn: str) -> None:
    # parent_id has no foreign key (its check cost every insert); the delete trigger does
    # what ON DELETE SET NULL did: children of a deleted task, one or many deleted at
    # once, no longer name it, a child deleted with its parent is simply gone, and a
    # delete that orphans nobody touches no other row.
    async with connection(dsn) as conn:
        p1, p2, p3 = [await make(conn, "completed") for _ in range(3)]
        kids = [await make(conn, "completed", parent=p) for p in (p1, p1, p2, p3)]
        grandchild = await make(conn, "completed", parent=kids[3])
        versions = "select id, xmin::text from durable.tasks where id <> $1 order by id"
        before = await conn.fetch(versions, grandchild)
        await conn.execute("delete from durable.tasks where id = $1", grandchild)
        assert await conn.fetch(versions, grandchild) == before
        await conn.execute("delete from durable.tasks where id = $1", p1)
        await conn.execute("delete from durable.tasks where id = any($1::bigint[])", [p2, kids[3]])
        rows = await conn.fetch("select id, parent_id from durable.tasks order by id")
        assert [tuple(r) for r in rows] == [(p3, None), (kids[0], None), (kids[1], None),
                                            (kids[2], None)]  # fmt: skip
        # The one whose parent stays keeps it.
        kept = await make(conn, "completed", parent=p3)
        await conn.execute("delete from durable.tasks where id = $1", kids[0])
        assert await conn.fetchval("select parent_id from durable.tasks where id = $1", kept) == p3


async def test_prune_cutoff_is_the_age_of_the_finish(dsn: str) -> None:
    async with connection(dsn) as conn:
        old = await make(conn, "completed", finished="2 hours")
        young = await make(conn, "completed", finished="30 minutes")
        store = await Store.open(dsn, max_size=2)
        try:
            assert await store.prune_count(3600) == 1
            assert (await store.prune(3600)) == PruneResult(tasks=1)
        finally:
            await store.close()
        assert await remaining(conn) == {young}
        assert old not in await remaining(conn)


async def test_prune_removes_long_stopped_daemons_only(dsn: str) -> None:
    async with connection(dsn) as conn:
        await conn.execute(
            """
            insert into durable.workers (id, host, pid, queues, heartbeat_at, stopped_at) values
              (gen_random_uuid(), 'h', 1, '{}', now() - interval '3 days', now() - interval '3 days'),
              (gen_random_uuid(), 'h', 2, '{}', now() - interval '3 days', null),
              (gen_random_uuid(), 'h', 3, '{}', now() - interval '1 minute', now() - interval '1 minute'),
              (gen_random_uuid(), 'h', 4, '{}', now(), null)
            """
        )
        store = await Store.open(dsn, max_size=2)
        try:
            assert (await store.prune(DAY)) == PruneResult(workers=2)
        finally:
            await store.close()
        pids = {r["pid"] for r in await conn.fetch("select pid from durable.workers")}
        assert pids == {3, 4}


async def test_one_pruner_at_a_time(dsn: str) -> None:
    async with connection(dsn) as conn:
        old = await make(conn, "completed")
        store = await Store.open(dsn, max_size=2)
        try:
            await conn.execute("select pg_advisory_lock($1)", PRUNE_LOCK)
            assert await store.prune(DAY) is None
            assert await remaining(conn) == {old}
            await conn.execute("select pg_advisory_unlock($1)", PRUNE_LOCK)
            assert await store.prune(DAY) == PruneResult(tasks=1)
            # The lock went back with the connection: the next pass may take it again.
            assert await store.prune(DAY) == PruneResult()
        finally:
            await store.close()


# -- DURABLE_RETENTION -------------------------------------------------------------------------


async def test_daemon_with_retention_prunes_old_finished_tasks(dsn: str) -> None:
    async with connection(dsn) as conn:
        gone, kept = await build_history(conn)
        async with running_daemon(dsn, retention="1d", queues="nothing_here") as daemon:

            async def pruned() -> bool:
                return daemon.prune_runs >= 1

            await wait_for(pruned)
            assert daemon.metrics.tasks_pruned == len(gone)
        assert await remaining(conn) == kept


async def test_retention_waits_for_the_pruner_holding_the_lock(dsn: str) -> None:
    async with connection(dsn) as conn:
        old = await make(conn, "completed")
        await conn.execute("select pg_advisory_lock($1)", PRUNE_LOCK)
        daemon = Daemon(settings(retention="1d", queues="nothing_here"), registry, dsn)
        daemon.retention_interval = 0.05
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:

                async def tried(n: int) -> bool:
                    return daemon.prune_runs >= n

                await wait_for(lambda: tried(2))
                assert await remaining(conn) == {old}  # another pruner holds the lock
                await conn.execute("select pg_advisory_unlock($1)", PRUNE_LOCK)

                async def emptied() -> bool:
                    return not await remaining(conn)

                await wait_for(emptied)

                async def counted() -> bool:  # counted once the prune call has returned
                    return daemon.metrics.tasks_pruned == 1

                await wait_for(counted)
            finally:
                daemon.stop()


async def test_no_retention_no_pruning(dsn: str) -> None:
    async with connection(dsn) as conn:
        old = await make(conn, "completed", finished="1000 days")
        async with running_daemon(dsn, queues="nothing_here") as daemon:
            assert daemon.settings.retention is None
        assert daemon.prune_runs == 0
        assert await remaining(conn) == {old}

"""Attacks on child workflows, third round: deadlines of parents and children, a daemon
killed between starting children and suspending, a fan-out with a failing child, and
children nobody can run (durable/children.py, fail_deadline, expire_deadlines,
durable.cancel_descendants, durable.wake_waiting).

Interleavings are forced with advisory locks held by the test and waits on what the
server says a session waits for, never with sleeps (see test_children_attacks.py).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import durable
from durable.store.schema import queries
from tests.apps.children_attacks_app import GATE_SQL, KIDS, QUEUE, SUSPEND_GATE
from tests.apps.children_attacks_app import parent as kill_parent
from tests.faults.test_children_attacks import tree, waits_on_lock
from tests.support.helpers import (
    execute,
    fetchval,
    kill,
    reaped,
    running_daemon,
    spawn_daemon_logged,
    statuses_in,
    wait_for,
    wait_status,
)

Q = queries()
WAKE_LOCK = 1685418593
"""The advisory lock class durable.wake_waiting and durable.suspend take per parent."""
DEADLINE_ERROR = '{"type": "durable.errors.DeadlineExceeded", "message": "passed"}'


@asynccontextmanager
async def session(dsn: str, **settings: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, server_settings=settings or None)
    try:
        yield conn
    finally:
        await conn.close()


async def test_a_running_workflows_deadline_and_a_grandchild_finishing_do_not_deadlock(
    dsn: str,
) -> None:
    # The runner fails a running workflow past its deadline (fail_deadline) and cancels its
    # unfinished descendants. A grandchild finishing at that moment holds its own row and
    # waits for its waiting parent's (durable.wake_waiting); the deadline's cascade took
    # that parent's row and then waited for the grandchild's.
    async with session(dsn) as setup, session(dsn) as gate, session(dsn) as probe:
        (root,), (child,), (grandchild,) = await tree(setup, depth=2)
        await setup.execute(
            "update durable.tasks set status = 'running', claim_token = 7, waiting_on = null,"
            " lease_until = now() + interval '1 hour', deadline = now() where id = $1", root,
        )
        await gate.execute("select pg_advisory_lock($1, $2)", WAKE_LOCK, child)
        async with session(dsn, deadlock_timeout="100s") as leaf_conn, session(
            dsn, deadlock_timeout="1500ms"
        ) as runner_conn:
            finish = asyncio.ensure_future(
                leaf_conn.fetch(Q["complete"], [grandchild], [grandchild], ["1"])
            )
            await waits_on_lock(probe, leaf_conn.get_server_pid(), "advisory")
            failing = asyncio.ensure_future(
                runner_conn.fetchrow(Q["fail_deadline"], root, 7, DEADLINE_ERROR)
            )
            await waits_on_lock(probe, runner_conn.get_server_pid())
            await gate.execute("select pg_advisory_unlock($1, $2)", WAKE_LOCK, child)
            done = await asyncio.wait_for(finish, 20)
            failed = await asyncio.wait_for(failing, 20)
        assert [r["id"] for r in done] == [grandchild]
        assert failed is not None and failed[0] == root
        rows = await setup.fetch(
            "select id, status::text from durable.tasks where id = any($1)",
            [root, child, grandchild],
        )
        statuses = {r[0]: r[1] for r in rows}
        assert statuses == {root: "failed", child: "cancelled", grandchild: "completed"}


WAKES = """
create table ca3_wakes (id bigint not null);
create function public.ca3_count_wake() returns trigger language plpgsql as $$
begin
    insert into public.ca3_wakes values (new.id);
    return null;
end $$;
create trigger ca3_count_wake after update on durable.tasks for each row
    when (old.status::text = 'waiting' and new.status::text = 'queued')
    execute function public.ca3_count_wake();
"""
"""Counts each time a task is woken (waiting to queued)."""


async def descendants(dsn: str, root: int) -> dict[int, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "with recursive tree as (select id from durable.tasks where parent_id = $1"
            " union select t.id from durable.tasks t join tree on t.parent_id = tree.id)"
            " select t.id, t.status::text from durable.tasks t join tree using (id)", root,
        )
        return {r[0]: r[1] for r in rows}
    finally:
        await conn.close()


@durable.workflow(name="ca3_never", max_attempts=1)
async def ca3_never(ctx: durable.Context) -> Any:
    return await ctx.wait_for_event("never")


@durable.task(name="ca3_hang", max_attempts=1)
async def ca3_hang() -> None:
    await asyncio.Event().wait()


@durable.workflow(name="ca3_mid", max_attempts=1)
async def ca3_mid(ctx: durable.Context) -> Any:
    return await ctx.run(ca3_never)


@durable.workflow(name="ca3_late_child_parent", max_attempts=1)
async def ca3_late_child_parent(ctx: durable.Context) -> list[str]:
    try:
        await ctx.run(ca3_never_short)
    except durable.TaskFailed as exc:
        return [exc.type, exc.message]
    return []


ca3_never_short = durable.workflow(name="ca3_never_short", max_attempts=1, deadline=2.0)(
    ca3_never.fn
)


async def test_a_child_past_its_deadline_fails_its_waiting_parent_once(dsn: str) -> None:
    # Held: the child fails with DeadlineExceeded; the parent, waiting on it, is woken
    # once and sees TaskFailed carrying that type.
    await execute(dsn, WAKES)
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(ca3_late_child_parent)
        seen = await handle.result(timeout=30)
    assert seen[0] == "durable.errors.DeadlineExceeded"
    assert "deadline" in seen[1]
    assert await fetchval(
        dsn, "select count(*) from public.ca3_wakes where id = $1", handle.id
    ) == 1


@durable.workflow(name="ca3_deadline_root", max_attempts=1)
async def ca3_deadline_root(ctx: durable.Context) -> Any:
    hang = await ctx.spawn(ca3_hang)
    never = await ctx.spawn(ca3_never_long)
    return await ctx.gather(hang, never, ctx.run(ca3_mid))


ca3_never_long = durable.workflow(name="ca3_never_long", max_attempts=1, deadline=3600)(
    ca3_never.fn
)


async def test_a_parents_deadline_cancels_every_unfinished_descendant(dsn: str) -> None:
    # Held: a parent whose deadline passes while it waits on a running task, a waiting
    # child whose own deadline is an hour later, and a child workflow waiting on a
    # grandchild: it fails with DeadlineExceeded, and every descendant ends cancelled,
    # none left running, queued or waiting.
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(ca3_deadline_root, deadline=1.0)

        async def all_started() -> bool:
            found = await descendants(dsn, handle.id)
            return len(found) == 4 and "running" in found.values()

        await wait_for(all_started)
        with pytest.raises(durable.TaskFailed, match="DeadlineExceeded"):
            await handle.result(timeout=30)
        tree_ = await descendants(dsn, handle.id)
        await statuses_in(dsn, list(tree_), "cancelled", "completed", "failed")
    assert set((await descendants(dsn, handle.id)).values()) == {"cancelled"}


@durable.task(name="ca3_ok", max_attempts=1)
async def ca3_ok(x: int) -> int:
    return x * 10


@durable.task(name="ca3_boom", max_attempts=1)
async def ca3_boom(x: int) -> int:
    raise ValueError(f"boom {x}")


@durable.workflow(name="ca3_fanout", max_attempts=1)
async def ca3_fanout(ctx: durable.Context) -> dict[str, Any]:
    a = await ctx.spawn(ca3_ok, 1)
    c = await ctx.spawn(ca3_ok, 3)
    try:
        await ctx.gather(a, ctx.run(ca3_boom, 2), ctx.run(ca3_boom, 4), c)
    except durable.TaskFailed as exc:
        first = [exc.type, exc.message]
    return {"first": first, "siblings": [await a, await c], "again": await ctx.run(ca3_ok, 5)}


@pytest.mark.parametrize("cache", [1000, 0])
async def test_a_fan_out_with_failing_children_raises_the_first_once_all_finished(
    dsn: str, cache: int
) -> None:
    # Held, resumed in place and replayed cold (no workflow cache): the first failure in
    # order is raised, the siblings run to their end (none cancelled), their results stay
    # readable from their handles, and the workflow goes on after catching it.
    await execute(dsn, WAKES)
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=cache):
        handle = await client.start(ca3_fanout)
        out = await handle.result(timeout=30)
    assert out == {"first": ["builtins.ValueError", "boom 2"], "siblings": [10, 30], "again": 50}
    kids = await descendants(dsn, handle.id)
    assert sorted(kids.values()) == ["completed"] * 3 + ["failed"] * 2
    # Woken at most once for the four (a child may finish before its parent suspends:
    # the suspension then finds nothing to wait for), at most once for the last child.
    assert await fetchval(
        dsn, "select count(*) from public.ca3_wakes where id = $1", handle.id
    ) <= 2


@durable.workflow(name="ca3_orphan_parent", max_attempts=1)
async def ca3_orphan_parent(ctx: durable.Context) -> Any:
    return await ctx.run("ca3_nobody_defines_this", 1)


async def test_a_child_nobody_defines_waits_queued_with_its_parent(dsn: str) -> None:
    # Held: a child by a name no daemon has published starts with the default options
    # and waits, queued, and its parent waits on it; cancelling the parent ends both.
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(ca3_orphan_parent)
        await wait_status(dsn, handle.id, "waiting")
        [(child, status)] = (await descendants(dsn, handle.id)).items()
        assert status == "queued"
        assert await fetchval(
            dsn, "select queue from durable.tasks where id = $1", child
        ) == "default"
        await client.cancel(handle.id)
        with pytest.raises(durable.TaskCancelled):
            await handle.result(timeout=30)
    assert await descendants(dsn, handle.id) == {child: "cancelled"}


@pytest.mark.timeout(120)
async def test_a_daemon_killed_between_spawning_children_and_suspending(
    dsn: str, tmp_path: Path
) -> None:
    # The spawn committed (children and their events, one fenced transaction); the
    # suspension had not. Another daemon takes the parent over: it starts no child again,
    # waits on the three, and completes with their results.
    await execute(dsn, GATE_SQL)
    log = tmp_path / "daemon.log"
    procs: list[subprocess.Popen[bytes]] = []
    async with session(dsn) as gate, session(dsn) as probe, durable.connect(dsn) as client:
        await gate.execute("select pg_advisory_lock($1)", SUSPEND_GATE)
        with reaped(procs):
            procs.append(spawn_daemon_logged(
                dsn, "tests.apps.children_attacks_app", log, DURABLE_QUEUES=QUEUE,
                DURABLE_LEASE="2",
            ))  # fmt: skip
            handle = await client.start(kill_parent, 3)

            async def suspending() -> int | None:
                pid: int | None = await probe.fetchval(
                    "select pid from pg_locks where locktype = 'advisory' and not granted"
                    " and objid = $1", SUSPEND_GATE,
                )  # fmt: skip
                return pid

            blocked = await wait_for(suspending, timeout=60)
            kids = await descendants(dsn, handle.id)
            assert sorted(kids.values()) == ["queued"] * 3
            kill(procs[0])
            procs[0].wait(timeout=30)
            # The daemon's backend dies with it (a dead client's statement would go on
            # once the gate opens, and commit).
            assert await probe.fetchval("select pg_terminate_backend($1)", blocked)
            await gate.execute("select pg_advisory_unlock($1)", SUSPEND_GATE)
            assert await fetchval(
                dsn, "select status from durable.tasks where id = $1", handle.id
            ) == "running"
            procs.append(spawn_daemon_logged(
                dsn, "tests.apps.children_attacks_app", log,
                DURABLE_QUEUES=f"{QUEUE},{KIDS}",
            ))  # fmt: skip
            assert await handle.result(timeout=60) == [0, 2, 4]
    assert await descendants(dsn, handle.id) == {k: "completed" for k in kids}
    assert sorted(await probe_children(dsn, handle.id)) == sorted(kids)


async def probe_children(dsn: str, parent: int) -> list[int]:
    """The children the parent's log refers to."""
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch(
            "select child_id from durable.events where task_id = $1 and kind = 'child'", parent
        )]  # fmt: skip
    finally:
        await conn.close()

"""A cancel that commits before a task's outcome wins, whatever path writes the outcome;
the caller is told what it cancelled; a daemon hears of it even with notifications lost;
and the cascade reaches every descendant, whatever ended the task."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

import durable
from durable.store import Store
from tests.support.helpers import execute, fetchval, running_daemon, wait_status

UNSERVED = "cw_nobody"
"""A queue no daemon of these tests serves: a child started there stays queued until a
cancel reaches it."""

GATES: dict[str, asyncio.Event] = {}
STARTED: dict[str, asyncio.Event] = {}


@durable.task(queue=UNSERVED)
async def cw_plain(k: str) -> str:
    return k


async def _claim_one(store: Store, task_id: int) -> int:
    [claimed] = await store.claim(UNSERVED, ["cw_plain"], 1, 60, uuid.uuid4())
    assert claimed.id == task_id
    return claimed.token


async def _silent_cancel(dsn: str, task_id: int) -> None:
    """What a cancel does to a running task, with its notification lost."""
    await execute(dsn, "update durable.tasks set cancel_requested = true where id = $1", task_id)


async def test_a_cancel_that_commits_before_the_completion_wins(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        store = client.store
        handle = await client.start(cw_plain, "done-too-late")
        token = await _claim_one(store, handle.id)
        cancel = await client.cancel(handle.id)
        assert cancel.cancelled == (handle.id,) and cancel.finished is None
        # The attempt finishes after the cancel committed: the completion is accepted
        # (the claim still holds) but the task ends cancelled, and says so.
        assert await store.complete_many([(handle.id, token, '"k"')]) == {handle.id: True}
        info = await client.get(handle.id)
        assert (info.status, info.result) == ("cancelled", None)
        with pytest.raises(durable.TaskCancelled):
            await handle.result(timeout=5)


async def test_a_cancel_that_commits_before_the_failure_wins(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handle = await client.start(cw_plain, "failed-too-late")
        token = await _claim_one(client.store, handle.id)
        await client.cancel(handle.id)
        assert await client.store.fail(handle.id, token, '{"type": "x", "message": "boom"}')
        info = await client.get(handle.id)
        assert info.status == "cancelled"
        assert info.error is not None and info.error["message"] == "boom"  # kept, for the record


async def test_a_cancel_after_the_outcome_says_the_task_had_finished(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handle = await client.start(cw_plain, "finished-first")
        token = await _claim_one(client.store, handle.id)
        assert await client.store.complete_many([(handle.id, token, '"k"')]) == {
            handle.id: False
        }
        cancel = await client.cancel(handle.id)
        assert (cancel.cancelled, cancel.finished, bool(cancel)) == ((), "completed", False)
        assert await handle.result(timeout=5) == "k"


@durable.task(max_attempts=1)
async def cw_block(k: str) -> None:
    STARTED[k].set()
    await asyncio.Event().wait()  # only a cancellation ends this


async def test_a_daemon_hears_of_a_cancel_at_its_heartbeat_when_the_notice_is_lost(
    dsn: str,
) -> None:
    k = "heartbeat-cancel"
    STARTED[k] = asyncio.Event()
    async with durable.connect(dsn) as client, running_daemon(dsn, lease="1.5") as daemon:
        handle = await client.start(cw_block, k)
        await asyncio.wait_for(STARTED[k].wait(), 20)
        await _silent_cancel(dsn, handle.id)
        # No notification comes; the next heartbeat (every lease/3 = 0.3 s) reads it.
        with pytest.raises(durable.TaskCancelled):
            await handle.result(timeout=10)
        assert not daemon.attempts


@durable.workflow(max_attempts=1)
async def cw_leaves_a_child(ctx: durable.Context, k: str) -> str:
    await ctx.spawn(cw_plain, k)  # started, never awaited
    await ctx.step("gate", _gate, k)
    return k


async def _gate(k: str) -> None:
    STARTED[k].set()
    await GATES[k].wait()


async def test_a_workflow_that_completes_after_a_cancel_takes_its_children_with_it(
    dsn: str,
) -> None:
    # The cancel's own cascade did not reach the child (its notice was lost and only the
    # flag was set): the task ending cancelled, by whatever statement, cascades.
    k = "complete-cascades"
    STARTED[k], GATES[k] = asyncio.Event(), asyncio.Event()
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(cw_leaves_a_child, k)
        await asyncio.wait_for(STARTED[k].wait(), 20)
        child = await fetchval(dsn, "select id from durable.tasks where parent_id = $1", handle.id)
        await _silent_cancel(dsn, handle.id)
        GATES[k].set()
        with pytest.raises(durable.TaskCancelled):
            await handle.result(timeout=10)
        assert await wait_status(dsn, child, "cancelled", timeout=5) == "cancelled"


async def test_a_lease_reaped_after_a_cancel_takes_the_children_with_it(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        parent = await client.start(cw_plain, "reaped-parent")
        await _claim_one(client.store, parent.id)
        await execute(
            dsn,
            "insert into durable.tasks (queue, name, parent_id, root_id) values ($1, 'x', $2, $2)",
            UNSERVED, parent.id,
        )  # fmt: skip
        await execute(
            dsn,
            "update durable.tasks set cancel_requested = true,"
            " lease_until = now() - interval '1 second' where id = $1",
            parent.id,
        )
        assert await client.store.reap_expired() == [(parent.id, "cancelled")]
        statuses = await fetchval(
            dsn, "select array_agg(status order by id) from durable.tasks where parent_id = $1",
            parent.id,
        )  # fmt: skip
        assert statuses == ["cancelled"]


@durable.workflow(max_attempts=1)
async def cw_fan_out(ctx: durable.Context, n: int) -> None:
    await ctx.gather(*(ctx.run(cw_plain, str(i)) for i in range(n)))


@pytest.mark.slow
async def test_cancels_at_random_moments_of_a_fan_out_leave_no_child_behind(dsn: str) -> None:
    # The cancel lands before, during or after the gather's spawn: either the spawn is
    # refused, or the cancel reaches every child it committed. The daemon runs in this
    # event loop, so yielding a random number of times varies where the cancel lands.
    rng = random.Random(20)
    async with durable.connect(dsn) as client, running_daemon(dsn):
        for _ in range(12):
            handle = await client.start(cw_fan_out, 100)
            for _ in range(rng.randrange(400)):
                await asyncio.sleep(0)
            await client.cancel(handle.id)
            with pytest.raises(durable.TaskCancelled):
                await handle.result(timeout=10)

        async def children_left() -> int:
            return int(await fetchval(
                dsn, "select count(*) from durable.tasks where parent_id is not null"
                " and status not in ('completed', 'failed', 'cancelled')",
            ))  # fmt: skip

        assert await children_left() == 0


@durable.workflow(max_attempts=1)
async def cw_spawns_after_cancel(ctx: durable.Context, k: str) -> str:
    await ctx.step("gate", _gate, k)
    try:
        await ctx.spawn(cw_plain, k)
    except durable.TaskCancelled:
        return "the spawn was refused"
    return "spawned"


async def test_a_workflow_asked_to_cancel_starts_no_child(dsn: str) -> None:
    k = "no-spawn"
    STARTED[k], GATES[k] = asyncio.Event(), asyncio.Event()
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(cw_spawns_after_cancel, k)
        await asyncio.wait_for(STARTED[k].wait(), 20)
        await _silent_cancel(dsn, handle.id)
        GATES[k].set()
        # Even a workflow that catches the refusal and returns ends cancelled.
        with pytest.raises(durable.TaskCancelled):
            await handle.result(timeout=10)
        assert await fetchval(
            dsn, "select count(*) from durable.tasks where parent_id = $1", handle.id
        ) == 0


async def test_cancel_many_reports_which_had_finished(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        a = await client.start(cw_plain, "a")
        b = await client.start(cw_plain, "b")
        token = await _claim_one(client.store, a.id)
        await client.store.complete_many([(a.id, token, '"a"')])
        rows = await client.store.cancel([a.id, b.id, 10**9])
        assert sorted(rows) == [(a.id, "completed", True), (b.id, "cancelled", False)]


async def test_a_heartbeat_stops_only_the_tasks_asked_to_cancel(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        store = client.store
        x = await client.start(cw_plain, "x")
        y = await client.start(cw_plain, "y")
        claimed = await store.claim(UNSERVED, ["cw_plain"], 2, 60, uuid.uuid4())
        tokens = {c.id: c.token for c in claimed}
        await _silent_cancel(dsn, x.id)
        beat = await store.extend_leases(list(tokens), list(tokens.values()), 60)
        assert beat == {x.id: True, y.id: False}
        assert await store.extend_leases([x.id], [tokens[x.id] + 1], 60) == {}  # stale token

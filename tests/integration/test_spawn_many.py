"""ctx.spawn_many starts many children in one transaction, with the log a loop of
ctx.spawn records; a handle whose child has finished is awaited without a suspension
(durable/children.py)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import durable
from durable.store.schema import queries
from tests.faults.test_fan_out import fan_out_parent, rows_touched, seed_history
from tests.faults.test_fan_out import session as asyncpg_session
from tests.support.helpers import fetchval, running_daemon, wait_for, wait_status

Q = queries()

PARENTS = "sm_parents"
KIDS = "sm_kids"
"""The children's queue: a daemon serving only PARENTS leaves them queued."""


@durable.task(name="sm_leaf", queue=KIDS)
async def sm_leaf(x: int, plus: int = 0) -> int:
    return x + plus


@durable.workflow(name="sm_fan", queue=PARENTS, max_attempts=1)
async def sm_fan(ctx: durable.Context, n: int) -> int:
    calls = [[i] if i % 2 else ([i], {"plus": 0}) for i in range(n)]
    handles = await ctx.spawn_many(sm_leaf, calls)
    assert [h.seq for h in handles] == list(range(n))
    return sum(await ctx.gather(*handles))


@durable.workflow(name="sm_switch", queue=PARENTS, max_attempts=2)
async def sm_switch(ctx: durable.Context, n: int) -> int:
    """The first attempt spawns half the children one by one and dies; the second starts
    them all with one spawn_many, over that log."""
    if ctx.attempt == 1:
        for i in range(n // 2):
            await ctx.spawn(sm_leaf, i)
        raise RuntimeError("dies after half its spawns")
    handles = await ctx.spawn_many(sm_leaf, [[i] for i in range(n)])
    return sum(await ctx.gather(*handles))


@durable.workflow(name="sm_bad_calls", queue=PARENTS, max_attempts=1)
async def sm_bad_calls(ctx: durable.Context) -> list[Any]:
    out: list[Any] = [await ctx.spawn_many(sm_leaf, [])]
    try:
        await ctx.spawn_many(sm_leaf, [[1], "12"])
    except TypeError as exc:
        out.append(str(exc))
    out.append(ctx.position)  # the refused call took no position
    return out


async def kids_of(dsn: str, parent: int) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select id, (args->>0)::int as x, xmin::text as xmin, created_at, status::text"
            " from durable.tasks"
            " where parent_id = $1 order by id", parent,
        )  # fmt: skip
        return [dict(r) for r in rows]
    finally:
        await conn.close()


async def test_spawn_many_starts_its_children_in_one_transaction(dsn: str) -> None:
    # A loop of ctx.spawn wrote each child in a transaction of its own: 1,000 children,
    # 1,000 round trips to the database. spawn_many writes them in one.
    n = 300
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, queues={PARENTS: 1}):
            handle = await client.start(sm_fan, n)
            await wait_status(dsn, handle.id, "waiting")
        kids = await kids_of(dsn, handle.id)
        assert sorted(k["x"] for k in kids) == list(range(n))
        assert len({k["xmin"] for k in kids}) == 1, "one transaction"
        assert await fetchval(
            dsn, "select array_agg(seq order by seq) = array_agg(seq order by child_id)"
            " and count(*) = $2 from durable.events where task_id = $1 and kind = 'child'",
            handle.id, n,
        )  # fmt: skip
        async with running_daemon(dsn, queues={PARENTS: 1, KIDS: 10}):
            assert await handle.result(timeout=60) == n * (n - 1) // 2


async def test_a_log_of_spawns_one_by_one_replays_under_spawn_many(dsn: str) -> None:
    # Each child takes the position and digest a spawn of the same call takes: the second
    # attempt's spawn_many finds the first five children in the log and starts the rest.
    n = 10
    async with durable.connect(dsn) as client, running_daemon(dsn, queues={PARENTS: 1, KIDS: 4}):
        handle = await client.start(sm_switch, n)
        assert await handle.result(timeout=60) == n * (n - 1) // 2
    kids = await kids_of(dsn, handle.id)
    assert sorted(k["x"] for k in kids) == list(range(n))
    # One transaction: one start time (their xmin changes as they finish, batch by batch).
    assert len({k["created_at"] for k in kids if k["x"] >= n // 2}) == 1
    assert len({k["created_at"] for k in kids}) == n // 2 + 1


async def test_spawn_many_refuses_a_call_that_is_no_argument_list(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, queues={PARENTS: 1}):
        handle = await client.start(sm_bad_calls)
        empty, message, position = await handle.result(timeout=30)
    assert empty == [] and position == 0
    assert message == (
        "ctx.spawn_many: calls[1] must be a list of arguments or an (args, kwargs) pair, not str"
    )
    assert not await fetchval(dsn, "select count(*) from durable.tasks where parent_id = $1", handle.id)


# -- a handle whose child already finished ---------------------------------------------


async def finished(dsn: str, child: int) -> None:
    """Until ``child`` has finished (its completion committed)."""

    async def done() -> bool:
        status = await fetchval(dsn, "select status::text from durable.tasks where id = $1", child)
        return bool(status == "completed")

    await wait_for(done, timeout=30)


@durable.task(name="sm_quick")
async def sm_quick(x: int) -> int:
    return x * 10


@durable.workflow(name="sm_await_done", max_attempts=1)
async def sm_await_done(ctx: durable.Context, dsn: str, gather: bool) -> list[int]:
    a, b = await ctx.spawn_many(sm_quick, [[1], [2]])
    await ctx.step("until_done", finished, dsn, a.id)
    await ctx.step("until_done", finished, dsn, b.id)
    if gather:
        return list(await ctx.gather(a, b))
    return [await a, await b]


@pytest.mark.parametrize("gather", [False, True])
async def test_awaiting_handles_whose_children_finished_does_not_suspend(
    dsn: str, gather: bool
) -> None:
    # `await handle` once its child had finished suspended the workflow all the same: the
    # suspension found the child done and queued it again, and a claim and a resume later
    # it read the outcome. It now reads it at once, and records it as a resume would.
    async with durable.connect(dsn) as client, running_daemon(dsn) as daemon:
        handle = await client.start(sm_await_done, dsn, gather)
        assert await handle.result(timeout=60) == [10, 20]
        counts = daemon.metrics.workflows
        assert (counts.warm, counts.cold) == (0, 0)
    assert await fetchval(
        dsn, "select suspend_token is null from durable.tasks where id = $1", handle.id
    )
    # The outcomes went into the parent's own log, as a resume records them.
    assert await fetchval(
        dsn, "select array_agg(status || ':' || result::text order by seq) from durable.events"
        " where task_id = $1 and kind = 'child'", handle.id,
    ) == ["completed:10", "completed:20"]  # fmt: skip


async def test_the_look_at_a_handle_touches_the_same_rows_at_any_width(dsn: str) -> None:
    # One probe by the whole key per position, under the generic plan a prepared statement
    # gets after five executions, over statistics of small logs (see record_children).
    await seed_history(dsn)
    touched = {}
    async with asyncpg_session(dsn) as conn:
        for width in (200, 2000):
            parent, _ = await fan_out_parent(conn, width)
            touched[width] = await rows_touched(conn, Q["child_events"], parent, 0, [width // 2])
    assert touched[200] <= 10 and touched[2000] <= touched[200] + 2, touched


# -- the connection a transaction step had -----------------------------------------------


async def leave_a_setting(conn: asyncpg.Connection) -> None:
    await conn.execute("set application_name = 'sm_leaked'")


@durable.workflow(name="sm_transaction_then_spawns", max_attempts=1)
async def sm_transaction_then_spawns(ctx: durable.Context) -> int:
    await ctx.transaction("leave", leave_a_setting)
    handles = [await ctx.spawn(sm_quick, i) for i in range(3)]
    return sum(await ctx.gather(*handles))


async def test_the_session_a_transaction_step_had_is_reset_and_a_spawns_need_not_be(
    dsn: str,
) -> None:
    # A spawn's transaction runs no user code, and skips the reset (a round trip a
    # child); the connection a transaction step handed to user code is reset still.
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sm_transaction_then_spawns)
        assert await handle.result(timeout=30) == 30
        assert not await fetchval(
            dsn, "select count(*) from pg_stat_activity where application_name = 'sm_leaked'"
        )

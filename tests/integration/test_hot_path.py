"""The daemon's hot path against the store: connections open and warm at start, and the
claim's rows in the shape the daemon reads them."""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import uuid
from types import FrameType

import asyncpg
import pytest

import durable
from durable.attempts import Attempt
from durable.daemon import WARM_CONNECTIONS
from durable.models import Claimed
from durable.registry import Definition, Registry
from durable.runner import Runner
from durable.store import Store, queries
from durable.store.database import WARM_UP
from tests.support.helpers import execute, running_daemon, wait_for

RESUMABLE = inspect.CO_COROUTINE | inspect.CO_GENERATOR
PATH_LIMIT = 5
"""Coroutine frames a step's resumption passes, from the attempt's task down to
Context.step: every one costs each resumption, once per step of every workflow."""


async def test_a_daemon_starts_with_its_hot_statements_prepared(dsn: str) -> None:
    q = queries()
    async with running_daemon(dsn) as daemon:
        assert daemon.store is not None
        pool = daemon.store.pool
        assert pool.get_size() >= WARM_CONNECTIONS
        async with contextlib.AsyncExitStack() as stack:
            held = [
                await stack.enter_async_context(pool.acquire()) for _ in range(WARM_CONNECTIONS)
            ]
            for conn in held:
                prepared = {
                    r["statement"]
                    for r in await conn.fetch("select statement from pg_prepared_statements")
                }
                assert {name for name, _ in WARM_UP} == {
                    name for name, _ in WARM_UP if q[name] in prepared
                }


async def test_claimed_rows_map_onto_claimed_by_position(dsn: str) -> None:
    await execute(
        dsn,
        "insert into durable.tasks (queue, name, kind, args, kwargs, max_attempts, timeout)"
        " select 'hp', 'hp_task', 'workflow', '[1, \"a\"]', '{\"k\": 2}', 7, 1.5"
        " from generate_series(1, 2)",
    )
    conn = await asyncpg.connect(dsn)
    try:
        (row,) = await conn.fetch(queries()["claim"], "hp", ["hp_task"], 1, 30.0, uuid.uuid4())
    finally:
        await conn.close()
    keys = list(row.keys())
    assert ["token" if k == "claim_token" else k for k in keys] == list(Claimed._fields[: len(keys)])
    store = await Store.open(dsn)
    try:
        (c,) = await store.claim("hp", ["hp_task"], 1, 30.0, uuid.uuid4())
    finally:
        await store.close()
    assert c.id == row["id"] + 1 and (c.queue, c.name, c.kind) == ("hp", "hp_task", "workflow")
    assert (c.args, c.kwargs, c.attempt, c.max_attempts, c.timeout) == (
        '[1, "a"]', '{"k": 2}', 1, 7, 1.5,
    )
    assert c.token != row["claim_token"] and (c.branch, c.parent_id, c.root_id) == (0, None, None)
    assert c.cancel_requested is False and c.fresh is True and c.trace_context is None


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
async def test_a_claim_inside_a_longer_transaction_leaves_the_triggers_whole(
    dsn: str, keyed: bool
) -> None:
    # durable.claim flags its own update so that the update trigger skips its pass; the
    # flag must be gone once the claim returns, or a task finishing later in the same
    # transaction would wake no parent.
    conn = await asyncpg.connect(dsn)
    try:
        parent = await conn.fetchval(
            "insert into durable.tasks (queue, name, kind) values ('hp', 'hp_parent', 'workflow')"
            " returning id"
        )
        child = await conn.fetchval(
            "insert into durable.tasks (queue, name, parent_id, root_id, priority)"
            " values ('hp', 'hp_child', $1, $1, 10) returning id",
            parent,
        )
        await conn.execute(
            "update durable.tasks set status = 'waiting', waiting_on = array[$2::bigint]"
            " where id = $1",
            parent, child,
        )
        if keyed:  # a keyed task waiting in the queue sends the claim down its keyed path
            await conn.execute(
                "insert into durable.tasks (queue, name, concurrency_key)"
                " values ('hp', 'hp_keyed', 'k')"
            )
        async with conn.transaction():
            rows = await conn.fetch(
                queries()["claim"], "hp", ["hp_child"], 1, 30.0, uuid.uuid4()
            )
            assert [r["id"] for r in rows] == [child]
            assert await conn.fetchval("select current_setting('durable.claiming', true)") == ""
            await conn.execute(
                "update durable.tasks set status = 'completed', claim_token = null,"
                " lease_until = null, finished_at = now() where id = $1",
                child,
            )
        assert await conn.fetchval("select status from durable.tasks where id = $1", parent) == (
            "queued"
        )
    finally:
        await conn.close()


async def _fetched(conn: asyncpg.Connection) -> int:
    """Task rows this transaction has read so far, by scan or through an index."""
    return int(
        await conn.fetchval(
            "select coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
            " from pg_stat_xact_user_tables"
            " where schemaname = 'durable' and relname = 'tasks'"
        )
    )


async def _schedule_ahead(dsn: str) -> None:
    # 20,000 tasks scheduled for tomorrow, at two priorities, all ahead (by id) of the
    # three that are due: one at priority 5 and two at priority 0.
    await execute(
        dsn,
        "insert into durable.tasks (queue, name, priority, run_at)"
        " select 'hp', 'hp_a', (g % 2) * 5, now() + interval '1 day' + g * interval '1 second'"
        " from generate_series(1, 20000) g",
    )
    await execute(
        dsn,
        "insert into durable.tasks (queue, name, priority, run_at) values"
        " ('hp', 'hp_a', 0, now()), ('hp', 'hp_a', 0, now() - interval '1 hour'),"
        " ('hp', 'hp_a', 5, now())",
    )
    await execute(dsn, "analyze durable.tasks")


async def test_a_claim_reads_the_due_tasks_not_those_scheduled_ahead_of_them(dsn: str) -> None:
    await _schedule_ahead(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            before = await _fetched(conn)
            rows = await conn.fetch(queries()["claim"], "hp", ["hp_a"], 10, 30.0, uuid.uuid4())
            read = await _fetched(conn) - before
        order = [
            (r["priority"], r["age"])
            for r in await conn.fetch(
                "select priority, now() - run_at > interval '1 minute' as age"
                " from durable.tasks where id = any($1::bigint[])"
                " order by array_position($1::bigint[], id)",
                [r["id"] for r in rows],
            )
        ]
    finally:
        await conn.close()
    # Priority first; within a priority, the task due for an hour before the one due now,
    # though it was started after it.
    assert order == [(5, False), (0, True), (0, False)]
    assert read < 50, read  # not the 20,000 scheduled ones (the old index read them all)


async def test_an_idle_loop_finds_its_next_due_task_without_reading_the_queue(dsn: str) -> None:
    await _schedule_ahead(dsn)
    await execute(dsn, "update durable.tasks set status = 'cancelled', finished_at = now()"
                       " where run_at <= now()")
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            before = await _fetched(conn)
            due = await conn.fetchval(queries()["next_due"], "hp", ["hp_a"])
            read = await _fetched(conn) - before
        first = await conn.fetchval(
            "select min(run_at) from durable.tasks where status = 'queued'"
        )
    finally:
        await conn.close()
    assert due == first
    assert read < 50, read


async def test_a_claim_reads_past_the_dead_entries_of_claimed_tasks_once(dsn: str) -> None:
    # 30,000 tasks claimed and finished leave their entries in tasks_ready_idx, dead, at
    # the start of their level until VACUUM removes them (none runs here). The claim finds
    # the highest level from the newest entry, so its scan of the level is the only read
    # past them: with the level found from the start of the range it read them twice.
    await execute(dsn, "insert into durable.tasks (queue, name)"
                       " select 'hp', 'hp_a' from generate_series(1, 30000)")
    await execute(dsn, "analyze durable.tasks")
    await execute(dsn, "update durable.tasks set status = 'completed', finished_at = now()")
    await execute(dsn, "insert into durable.tasks (queue, name)"
                       " select 'hp', 'hp_a' from generate_series(1, 3)")
    conn = await asyncpg.connect(dsn)
    try:
        pages = await conn.fetchval(
            "select pg_relation_size('durable.tasks_ready_idx')"
            " / current_setting('block_size')::int"
        )
        read = []
        # The first claim marks the dead entries as it passes them, as any scan does, once
        # no snapshot can still see them (another session's open snapshot delays that);
        # the later ones are measured and the least kept. All roll back.
        for _ in range(5):
            tr = conn.transaction()
            await tr.start()
            try:
                plan = json.loads(await conn.fetchval(
                    "explain (analyze, buffers, format json)"
                    " select * from durable.claim('hp', array['hp_a'], 1, 30, $1)",
                    uuid.uuid4(),
                ))[0]["Plan"]
            finally:
                await tr.rollback()
            assert plan["Actual Rows"] == 1
            read.append(plan["Shared Hit Blocks"] + plan["Shared Read Blocks"])
    finally:
        await conn.close()
    # One pass over the index and some fifty buffers more (heap, catalog, primary key):
    # about 200 against 350 when the level was found from the start of the range.
    assert pages > 140
    assert min(read[1:]) < 2 * pages, (read, pages)


async def test_a_step_resumes_through_few_coroutine_levels(dsn: str) -> None:
    """The frames between an attempt's task and ``Context.step`` when a workflow resumes
    after its first checkpoint (the second step's function runs inside that resumption)."""
    path: list[str] = []

    def second(x: int) -> int:
        frame: FrameType | None = sys._getframe(1)
        # Up to the first frame that is not a coroutine's or a generator's: the loop's.
        while frame is not None and frame.f_code.co_flags & RESUMABLE:
            path.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")
            frame = frame.f_back
        return x + 1

    async def flow(ctx: durable.Context, x: int) -> int:
        x = await ctx.step("first", lambda: x + 1)
        return int(await ctx.step("second", second, x))

    reg = Registry()
    reg.add(Definition(name="hp_levels", fn=flow, kind="workflow", queue="hp_levels"))
    async with durable.connect(dsn) as client, running_daemon(
        dsn, reg=reg, queues="hp_levels=1"
    ):
        handle = await client.start("hp_levels", 1, queue="hp_levels")
        assert await handle.result(timeout=20) == 3
    # The workflow's own frame and the step's are the user's; the rest are durable's.
    levels = [f for f in path if f not in ("test_hot_path.py:flow",)]
    assert levels[0] == "context.py:step", path
    assert len(levels) <= PATH_LIMIT, path


async def test_a_fault_in_the_runner_is_logged_and_frees_the_slot(
    dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug in durable's own runner (not in the task's code) ends that attempt with a
    ``runner_error`` and its traceback; the slot goes back and the daemon goes on."""
    original = Runner.run

    async def faulty(self: Runner, attempt: Attempt) -> None:
        if attempt.task.name == "hp_faulty":
            raise RuntimeError("a bug in the runner")
        await original(self, attempt)

    monkeypatch.setattr(Runner, "run", faulty)

    async def job() -> str:
        return "ran"

    reg = Registry()
    reg.add(Definition(name="hp_faulty", fn=job, queue="hp_fault"))
    reg.add(Definition(name="hp_fine", fn=job, queue="hp_fault"))
    async with durable.connect(dsn) as client, running_daemon(
        dsn, reg=reg, queues="hp_fault=1"
    ) as daemon:
        await client.start("hp_faulty", queue="hp_fault")
        fine = await client.start("hp_fine", queue="hp_fault")
        # One slot: the second task runs only once the faulty attempt gave it back.
        assert await fine.result(timeout=20) == "ran"
        await wait_for(lambda: _true(not daemon.attempts))
    out = capsys.readouterr().out
    assert "runner_error" in out and "RuntimeError: a bug in the runner" in out


async def _true(value: bool) -> bool:
    return value

"""Workflows that fan out into thousands of children (ctx.gather, ctx.spawn, ctx.run):
what each child costs as the fan-out grows, daemons killed in the middle of one, a cancel
reaching every child, and the limits at the edge (durable/sticky.py, durable/store/workflows.py,
durable.wake_waiting, record_children and load_parked in sql/queries.sql).

Costs are counted, never timed: blocks and rows from the server's statistics, rows each
plan node touched from EXPLAIN ANALYZE, transactions committed. The statements run with
the generic plans Postgres caches for a prepared statement after its fifth execution
(forced here), over statistics of a table of small logs (seeded): what a daemon runs
with in production, where a fan-out's parent is the exception the statistics do not show.
Interleavings are forced with an advisory lock the test holds, never with sleeps.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import durable
import durable.store.workflows
from durable.errors import TaskCancelled, TaskFailed
from durable.registry import Registry, registry
from durable.store.schema import queries
from durable.tools.fan_out import TOTALS
from tests.apps import fan_out_app as app
from tests.support.helpers import (
    ROOT,
    daemon_env,
    kill,
    reaped,
    running_daemon,
    spawn_daemon_logged,
    statuses_in,
    wait_for,
)

Q = queries()
pytestmark = pytest.mark.slow

@asynccontextmanager
async def session(dsn: str, **settings: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, server_settings=settings or None)
    try:
        yield conn
    finally:
        await conn.close()


async def seed_history(dsn: str) -> None:
    """Finished tasks and 3,000 workflows of three events each, analyzed: the statistics
    of a table of small logs, as a production database has them. Every later session of
    the database plans its prepared statements generically. Autovacuum leaves durable's
    tables alone: a pass it made in the middle of a measure added its own reads (and an
    analyze, other statistics)."""
    async with session(dsn) as conn:
        await conn.execute(
            "do $$ declare t text; begin"
            " for t in select tablename from pg_tables where schemaname = 'durable' loop"
            " execute format('alter table durable.%I set (autovacuum_enabled = off,"
            " toast.autovacuum_enabled = off)', t); end loop; end $$"
        )
        await conn.execute(
            "insert into durable.tasks (queue, name, status, finished_at)"
            " select 'seed', 'seed', 'completed', now() from generate_series(1, 10000)"
        )
        await conn.execute(
            "insert into durable.events (task_id, branch, seq, kind, name, digest, status,"
            " attempt) select 1000000000 + t, 0, i, 'step', 's', 'd', 'completed', 1"
            " from generate_series(1, 3000) t, generate_series(0, 2) i"
        )
        await conn.execute("analyze durable.tasks; analyze durable.events")
        db = await conn.fetchval("select quote_ident(current_database())")
        await conn.execute(f"alter database {db} set plan_cache_mode = force_generic_plan")


# -- what a fan-out costs, per child ---------------------------------------------------


async def settled(conn: asyncpg.Connection) -> dict[str, int]:
    """The totals, once no other client is connected to the database (a backend reports
    its statistics when it exits)."""

    async def alone() -> bool:
        others = await conn.fetchval(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and pid <> pg_backend_pid() and backend_type = 'client backend'"
        )
        return bool(others == 0)

    await wait_for(alone, timeout=30)
    row = await conn.fetchrow(TOTALS)
    assert row is not None
    return {k: int(v) for k, v in row.items()}


QUIET: dict[str, Any] = {"poll_interval": "3600", "lease": "3600"}
"""No loop of the daemon's on a timer comes round while it is measured: the poll, the
timers' and schedules' looks (every poll interval), the heartbeats, the reaper and the
catalog's publication (every lease/3). Their statements grow with the wall time of the
measure, and so with the load of the machine, not with the fan-out: counted, they failed
the comparison on a loaded server. Notifications wake every loop the fan-out needs."""


def fan_outs() -> Registry:
    """The definitions of the fan-out's queues alone: a schedule another module of the
    test run declares would fire on its own clock, and be counted."""
    reg = Registry()
    for d in registry.definitions():
        if d.queue in (app.QUEUE, app.KIDS):
            reg.add(d)
    return reg


async def spent(
    dsn: str, workflow: Any, n: int, hold: Callable[[], Awaitable[None]] | None = None
) -> dict[str, int]:
    """The totals a daemon adds from its start to its stop, running a fan-out of ``n``
    children from its workflow's start to its result (none: ``n`` 0), then ``hold()``."""
    async with session(dsn) as probe:
        before = await settled(probe)
        async with running_daemon(
            dsn, reg=fan_outs(), queues={app.QUEUE: 4, app.KIDS: 20}, **QUIET
        ) as daemon, durable.connect(dsn) as client:
            await daemon.ready.wait()  # its first poll has answered
            if n:
                handle = await client.start(workflow, n)
                assert await handle.result(timeout=300) == n * (n - 1) // 2
            if hold is not None:
                await hold()
            # The poll at the start, and one after each reconnect of the listener (a
            # catch-up, once; never one on a timer).
            reconnects = daemon.listener.reconnects if daemon.listener is not None else 0
            assert daemon.poller.polls == 1 + reconnects, "a poll on a timer was counted"
        after = await settled(probe)
    return {k: after[k] - before[k] for k in after}


async def per_child(dsn: str, workflow: Any, n: int) -> dict[str, float]:
    """What a real daemon spends on a fan-out of ``n`` children, divided by ``n``: the
    fan-out's own statements alone, those of the daemon's start and stop taken out (as
    a daemon that ran nothing spends them)."""
    idle = await spent(dsn, workflow, 0)
    busy = await spent(dsn, workflow, n)
    return {k: (busy[k] - idle[k]) / n for k in busy}


def no_growth(small: dict[str, float], large: dict[str, float]) -> None:
    """Each figure per child at the larger fan-out is at most that of the smaller one (with
    room for what batching and a busy server move), the toast blocks at most a tenth of a
    block more. What grew with the fan-out grew tenfold here."""
    for key in ("blocks", "rows", "xacts"):
        assert large[key] <= 1.5 * small[key] + 1, (key, small, large)
    assert large["toast_blocks"] <= small["toast_blocks"] + 0.1, ("toast", small, large)


@pytest.mark.timeout(300)
async def test_a_gathers_cost_per_child_does_not_grow_with_its_width(dsn: str) -> None:
    # Each child finishing looked for itself in its waiting parent's waiting_on: the array
    # (8 bytes a child, toasted) was read again for every child finishing, and scanned.
    # 2,000 children read 2 toast blocks per child where 200 read none, and 10,000 spent
    # 1.3 s of a 2.4 s fan-out there. With the generic plan, recording the 2,000 outcomes
    # in the parent's log compared each with every event of the log (8,000,000 rows
    # touched, 9 s on the server; held apart below, where rows a join filter removed show).
    await seed_history(dsn)
    small = await per_child(dsn, app.gather, 200)
    large = await per_child(dsn, app.gather, 2000)
    no_growth(small, large)


@pytest.mark.timeout(300)
async def test_handles_awaited_in_turn_cost_the_same_per_child_at_any_width(
    dsn: str,
) -> None:
    # `for h in handles: await h`: each resume read the parent's log from the awaited
    # handle's position to its end (every later spawn again), and recording the one
    # outcome read the whole log: 95 rows per child for 40 children, 815 for 400.
    await seed_history(dsn)
    small = await per_child(dsn, app.each, 40)
    large = await per_child(dsn, app.each, 400)
    no_growth(small, large)


# -- the statements, one at a time -----------------------------------------------------


def touched(plan: dict[str, Any]) -> int:
    """Rows a plan node and those under it produced or threw away, over all their loops."""
    loops = plan.get("Actual Loops", 1)
    own = sum(
        plan.get(k, 0)
        for k in (
            "Actual Rows",
            "Rows Removed by Filter",
            "Rows Removed by Join Filter",
            "Rows Removed by Index Recheck",
        )
    )
    return int(own * loops) + sum(touched(p) for p in plan.get("Plans", []))


async def rows_touched(conn: asyncpg.Connection, query: str, *args: Any) -> int:
    """The rows ``query`` touches with these arguments, planned generically (PREPARE,
    then EXPLAIN ANALYZE EXECUTE, in a transaction rolled back)."""
    literals = [await conn.fetchval("select quote_nullable($1::text)", _text(a)) for a in args]
    tr = conn.transaction()
    await tr.start()
    try:
        await conn.execute("set local plan_cache_mode = force_generic_plan")
        await conn.execute(f"prepare probe as {query}")
        out = await conn.fetchval(
            f"explain (analyze, format json) execute probe({', '.join(literals)})"
        )
    finally:
        await tr.rollback()  # what the statement wrote
        await conn.execute("deallocate probe")  # a prepared statement outlives a rollback
    return touched(json.loads(out)[0]["Plan"])


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return "{" + ",".join("NULL" if v is None else json.dumps(str(v)) for v in value) + "}"
    return str(value)


async def fan_out_parent(conn: asyncpg.Connection, width: int) -> tuple[int, list[int]]:
    """A workflow running under claim token 7 whose log holds ``width`` pending child
    events (seq 0..width-1), and its children, finished."""
    parent = await conn.fetchval(
        "insert into durable.tasks (queue, name, kind, status, claim_token, lease_until,"
        " started_at) values ('fo', 'parent', 'workflow', 'running', 7,"
        " now() + interval '1 hour', now()) returning id"
    )
    kids = [
        r[0]
        for r in await conn.fetch(
            "insert into durable.tasks (queue, name, status, parent_id, root_id, result,"
            " finished_at) select 'fo', 'kid', 'completed', $1, $1, '1', now()"
            " from generate_series(1, $2) order by 1 returning id",
            parent, width,
        )
    ]  # fmt: skip
    await conn.execute(
        "insert into durable.events (task_id, branch, seq, kind, name, digest, status,"
        " child_id, attempt) select $1, 0, i - 1, 'child', 'kid', 'd', 'pending', k, 1"
        " from unnest($2::bigint[]) with ordinality as u(k, i)",
        parent, kids,
    )  # fmt: skip
    return parent, kids


async def statement_costs(dsn: str, width: int) -> dict[str, int]:
    async with session(dsn) as conn:
        parent, _ = await fan_out_parent(conn, width)
        every = list(range(width))
        one = [width // 2]
        return {
            "record_all": await rows_touched(
                conn, Q["record_children"], parent, 7, 0, every, ["completed"] * width,
                ["1"] * width, [None] * width,
            ),
            "record_one": await rows_touched(
                conn, Q["record_children"], parent, 7, 0, one, ["completed"], ["1"], [None]
            ),
            "load_one": await rows_touched(conn, Q["load_parked"], parent, 0, width, one),
            "load_tail": await rows_touched(conn, Q["load_tail"], parent, 0, 0),
        }


async def test_recording_and_reloading_outcomes_touch_rows_in_proportion(dsn: str) -> None:
    # Generic plans over statistics of small logs: record_children joined the outcomes to
    # the parent's log on seq alone and the plan compared every outcome with every event
    # (200 outcomes touched 80,805 rows, 2,000 touched 8,008,006); one outcome read the
    # whole log (1,007 and 10,008 rows). load_parked finds each position by its whole key.
    await seed_history(dsn)
    small = await statement_costs(dsn, 200)
    large = await statement_costs(dsn, 2000)
    assert large["record_all"] <= 10 * 2000, (small, large)
    assert small["record_one"] <= 20 and large["record_one"] <= small["record_one"] + 2, (
        small, large)
    assert small["load_one"] <= 20 and large["load_one"] <= small["load_one"] + 2, (
        small, large)
    # The resume of a gather reads its whole tail, once: in proportion.
    assert large["load_tail"] <= 10 * small["load_tail"] + 10, (small, large)


TOAST_BLOCKS = """
select sum(pg_stat_get_xact_blocks_fetched(c.oid))::bigint from pg_class c
 where c.oid in (select t.reltoastrelid from pg_class t where t.oid = 'durable.tasks'::regclass)
    or c.oid in (select i.indexrelid from pg_index i join pg_class t on t.reltoastrelid = i.indrelid
                  where t.oid = 'durable.tasks'::regclass)
"""
"""The blocks of the tasks table's toast (where a long waiting_on is kept) and its index
this session read and has not reported yet (only a difference within one transaction
means anything)."""

BLOCKS = """
select sum(pg_stat_get_xact_blocks_fetched(c.oid))::bigint from pg_class c
 where c.relnamespace = 'durable'::regnamespace
"""
"""The same for every table and index of durable's own."""


async def suspended(conn: asyncpg.Connection, width: int, awaited: int) -> tuple[int, list[int]]:
    """A workflow with ``width`` running children, suspended on the first ``awaited``."""
    parent, kids = await running(conn, width)
    assert await conn.fetchval(Q["suspend"], parent, 7, 0, kids[:awaited], None, None) == "waiting"
    return parent, kids


async def running(conn: asyncpg.Connection, width: int) -> tuple[int, list[int]]:
    """A workflow running under claim token 7, and its ``width`` running children."""
    parent = await conn.fetchval(
        "insert into durable.tasks (queue, name, kind, status, claim_token, lease_until,"
        " started_at) values ('fo', 'parent', 'workflow', 'running', 7,"
        " now() + interval '1 hour', now()) returning id"
    )
    kids = [
        r[0]
        for r in await conn.fetch(
            "insert into durable.tasks (queue, name, status, parent_id, root_id, claim_token,"
            " lease_until, started_at) select 'fo', 'kid', 'running', $1, $1, 1,"
            " now() + interval '1 hour', now() from generate_series(1, $2) order by 1"
            " returning id",
            parent, width,
        )
    ]  # fmt: skip
    await conn.execute("update durable.tasks set claim_token = id where id = any($1)", kids)
    return parent, kids


async def finish(conn: asyncpg.Connection, kids: list[int], blocks: str = BLOCKS) -> int:
    """Complete ``kids`` in one statement; the blocks it read (of ``blocks``)."""
    async with conn.transaction():
        before = await conn.fetchval(blocks)
        await conn.fetch(Q["complete"], kids, kids, ["1"] * len(kids))
        return int(await conn.fetchval(blocks) - before)


async def status_of(conn: asyncpg.Connection, task: int) -> tuple[str, int | None, int | None]:
    row = await conn.fetchrow(
        "select status::text, waiting_left, cardinality(waiting_on) from durable.tasks"
        " where id = $1", task,
    )  # fmt: skip
    assert row is not None
    return row[0], row[1], row[2]


async def test_a_childs_finish_reads_no_more_for_a_wider_wait(dsn: str) -> None:
    # The finish of one child of a parent waiting on 2,000 read the parent's waiting_on
    # (16 kB, kept compressed in the toast table) and scanned it, for each child of the
    # statement: in the toast relations, which the blocks of durable's own tables leave
    # out. It reads none of it now, at either width.
    async with session(dsn) as conn:
        costs = {}
        for width in (20, 2000):
            _, kids = await suspended(conn, width, width)
            await finish(conn, kids[: width // 2])
            costs[width] = [await finish(conn, [k], TOAST_BLOCKS) for k in kids[width // 2 :][:5]]
        assert costs == {20: [0] * 5, 2000: [0] * 5}, costs


async def test_children_the_parent_does_not_wait_for_count_down_and_are_trimmed(
    dsn: str,
) -> None:
    # Each child finishing counts its waiting parent down, whether the parent waits for it
    # or not; at zero the parent looks, keeps waiting on the unfinished ones only, and is
    # woken once, by the last of those.
    async with session(dsn) as conn:
        parent, kids = await suspended(conn, 10, 5)
        awaited, others = kids[:5], kids[5:]
        await finish(conn, others[:3] + awaited[:2])  # five finish: the count reaches 0
        assert await status_of(conn, parent) == ("waiting", 3, 3)
        assert await conn.fetchval(
            "select waiting_on from durable.tasks where id = $1", parent
        ) == awaited[2:]
        await finish(conn, others[3:])  # two the parent does not wait for
        assert await status_of(conn, parent) == ("waiting", 1, 3)
        await finish(conn, awaited[2:4])  # down to -1: the look finds one left
        assert await status_of(conn, parent) == ("waiting", 1, 1)
        await finish(conn, awaited[4:])
        assert await status_of(conn, parent) == ("queued", None, None)


async def test_a_wait_on_the_same_child_twice_and_parents_sharing_a_statement(
    dsn: str,
) -> None:
    async with session(dsn) as conn:
        # ctx.gather(h, h): the array holds the child twice, the count once.
        parent, (kid,) = await running(conn, 1)
        assert await conn.fetchval(Q["suspend"], parent, 7, 0, [kid, kid], None, None) == "waiting"
        assert await status_of(conn, parent) == ("waiting", 1, 2)
        await finish(conn, [kid])
        assert (await status_of(conn, parent))[0] == "queued"
        # Two parents' children finishing in one statement count each parent down by its own.
        a, a_kids = await suspended(conn, 4, 4)
        b, b_kids = await suspended(conn, 3, 3)
        await finish(conn, a_kids[:3] + b_kids[:1])
        assert await status_of(conn, a) == ("waiting", 1, 4)
        assert await status_of(conn, b) == ("waiting", 2, 3)
        await finish(conn, a_kids[3:] + b_kids[1:])
        assert (await status_of(conn, a))[0] == (await status_of(conn, b))[0] == "queued"


async def test_siblings_finishing_outside_a_wide_wait_cost_a_bounded_amount(dsn: str) -> None:
    # A parent waits on 2,000 children, 1,999 of which have finished, while 300 others it
    # spawned finish one at a time: each counts it down to zero, and the look that follows
    # reads the one child still awaited, not the 2,000 (the first look kept only that one).
    # They cost what they cost a parent that waits on one child from the start.
    async with session(dsn) as conn:
        parent, kids = await suspended(conn, 2300, 2000)
        await finish(conn, kids[:1999])
        assert await status_of(conn, parent) == ("waiting", 1, 2000)
        wide = [await finish(conn, [k]) for k in kids[2000:]]
        assert await status_of(conn, parent) == ("waiting", 1, 1)
        parent, kids = await suspended(conn, 301, 1)
        narrow = [await finish(conn, [k]) for k in kids[1:]]
        assert await status_of(conn, parent) == ("waiting", 1, 1)
        assert sum(wide) <= 1.5 * sum(narrow), (sum(wide), sum(narrow))


# -- daemons killed in the middle of a fan-out ----------------------------------------


async def gate_waiter(probe: asyncpg.Connection) -> int | None:
    pid: int | None = await probe.fetchval(
        "select pid from pg_locks where locktype = 'advisory' and not granted and objid = $1",
        app.GATE,
    )
    return pid


async def children(conn: asyncpg.Connection, parent: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "select id, (args->>0)::int as x, status::text, attempt from durable.tasks"
        " where parent_id = $1 order by id", parent,
    )  # fmt: skip


async def check_delivered_once(conn: asyncpg.Connection, parent: int, n: int) -> None:
    """n children, one per argument, all completed; the parent's log holds each of them
    once, at the position of its argument, with its result."""
    kids = await children(conn, parent)
    assert sorted(k["x"] for k in kids) == list(range(n))
    assert {k["status"] for k in kids} == {"completed"}
    events = await conn.fetch(
        "select seq, child_id, status, result::text from durable.events"
        " where task_id = $1 and kind = 'child' order by seq", parent,
    )  # fmt: skip
    by_id = {k["id"]: k["x"] for k in kids}
    assert [e["seq"] for e in events] == list(range(n))
    assert [by_id[e["child_id"]] for e in events] == list(range(n))
    assert all(e["status"] == "completed" and e["result"] == str(e["seq"]) for e in events)


@pytest.mark.timeout(180)
async def test_a_daemon_killed_after_half_its_spawns_neither_loses_nor_repeats_one(
    dsn: str, tmp_path: Path
) -> None:
    # ctx.spawn one child at a time; the daemon dies with 50 of 100 spawned (the 51st's
    # insert held by the gate). The next daemon replays the 50 from the log, spawns the
    # other 50, and the parent sees each of the 100 once.
    n = 100
    async with session(dsn) as setup:
        await setup.execute(app.spawn_gate(n // 2))
    log = tmp_path / "daemon.log"
    procs: list[subprocess.Popen[bytes]] = []
    async with session(dsn) as gate, session(dsn) as probe, durable.connect(dsn) as client:
        await gate.execute("select pg_advisory_lock($1)", app.GATE)
        with reaped(procs):
            procs.append(spawn_daemon_logged(
                dsn, "tests.apps.fan_out_app", log, DURABLE_QUEUES=app.QUEUE, DURABLE_LEASE="2",
            ))  # fmt: skip
            handle = await client.start(app.spawn, n)
            blocked = await wait_for(lambda: gate_waiter(probe), timeout=60)
            assert sorted(k["x"] for k in await children(probe, handle.id)) == list(range(n // 2))
            kill(procs[0])
            procs[0].wait(timeout=30)
            assert await probe.fetchval("select pg_terminate_backend($1)", blocked)
            await gate.execute("select pg_advisory_unlock($1)", app.GATE)
            procs.append(spawn_daemon_logged(
                dsn, "tests.apps.fan_out_app", log, DURABLE_QUEUES=f"{app.QUEUE},{app.KIDS}",
            ))  # fmt: skip
            assert await handle.result(timeout=120) == n * (n - 1) // 2
        await check_delivered_once(probe, handle.id, n)


@pytest.mark.timeout(180)
async def test_a_daemon_killed_after_half_the_children_finished_neither_loses_nor_repeats_one(
    dsn: str, tmp_path: Path
) -> None:
    # A gather of 200: the daemon dies while the completion of the 101st child (and of those
    # written with it) waits at the gate. The children finished before stay finished and
    # are not run again; the others run again on the next daemon; the parent, resumed cold
    # there, sees each of the 200 once.
    n = 200
    async with session(dsn) as setup:
        await setup.execute(app.finish_gate(n // 2))
    log = tmp_path / "daemon.log"
    procs: list[subprocess.Popen[bytes]] = []
    queues = f"{app.QUEUE}=4,{app.KIDS}=10"
    async with session(dsn) as gate, session(dsn) as probe, durable.connect(dsn) as client:
        await gate.execute("select pg_advisory_lock($1)", app.GATE)
        with reaped(procs):
            procs.append(spawn_daemon_logged(
                dsn, "tests.apps.fan_out_app", log, DURABLE_QUEUES=queues, DURABLE_LEASE="2",
            ))  # fmt: skip
            handle = await client.start(app.gather, n)
            blocked = await wait_for(lambda: gate_waiter(probe), timeout=60)
            kill(procs[0])
            procs[0].wait(timeout=30)
            assert await probe.fetchval("select pg_terminate_backend($1)", blocked)
            await gate.execute("select pg_advisory_unlock($1)", app.GATE)
            before = {k["id"]: k for k in await children(probe, handle.id)}
            done = [k for k in before.values() if k["status"] == "completed"]
            assert 0 < len(done) < n, len(done)
            # Waiting, or (on a slow day) still running, its suspension not yet written.
            assert await probe.fetchval(
                "select status::text from durable.tasks where id = $1", handle.id
            ) in ("waiting", "running")
            procs.append(spawn_daemon_logged(
                dsn, "tests.apps.fan_out_app", log, DURABLE_QUEUES=queues,
            ))  # fmt: skip
            assert await handle.result(timeout=120) == n * (n - 1) // 2
        await check_delivered_once(probe, handle.id, n)
        after = {k["id"]: k for k in await children(probe, handle.id)}
        assert all(after[k["id"]]["attempt"] == k["attempt"] for k in done)


@pytest.mark.timeout(180)
async def test_cancelling_a_wide_fan_out_reaches_every_child(dsn: str) -> None:
    # 2,000 children, some finished, some running (their completion held at the gate),
    # the rest queued: the cancel ends every one that had not finished, and none runs
    # after it.
    n = 2000
    async with session(dsn) as setup:
        await setup.execute(app.finish_gate(n // 2))
    async with session(dsn) as gate, session(dsn) as probe, durable.connect(dsn) as client:
        await gate.execute("select pg_advisory_lock($1)", app.GATE)
        async with running_daemon(dsn, queues={app.QUEUE: 4, app.KIDS: 20}):
            handle = await client.start(app.gather, n)
            await wait_for(lambda: gate_waiter(probe), timeout=60)
            task = asyncio.ensure_future(client.cancel(handle.id))

            async def cancel_waits() -> bool:
                # For the rows the held completion has locked (the gate's wait is advisory).
                return task.done() or bool(await probe.fetchval(
                    "select count(*) from pg_stat_activity where datname = current_database()"
                    " and wait_event_type = 'Lock' and wait_event <> 'advisory'"
                ))  # fmt: skip

            await wait_for(cancel_waits, timeout=60)
            await gate.execute("select pg_advisory_unlock($1)", app.GATE)
            result = await asyncio.wait_for(task, 60)
            cancelled_at = await probe.fetchval("select clock_timestamp()")
            assert result.cancelled[0] == handle.id
            kids = [k["id"] for k in await children(probe, handle.id)]
            assert len(kids) == n
            await statuses_in(dsn, kids, "completed", "cancelled", timeout=60)
            with pytest.raises(TaskCancelled):
                await handle.result(timeout=10)
        statuses = [k["status"] for k in await children(probe, handle.id)]
        assert statuses.count("completed") >= n // 4
        assert statuses.count("cancelled") >= n // 4
        # None started after the cancel.
        assert not await probe.fetchval(
            "select count(*) from durable.tasks where parent_id = $1 and started_at > $2",
            handle.id, cancelled_at,
        )  # fmt: skip


# -- the limits at the edge -----------------------------------------------------------


async def test_a_fan_out_larger_than_one_statement_goes_in_several_of_one_transaction(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Postgres closes the connection on a message over 1 GB: a gather whose children's
    # arguments (each up to 16 MB) added up past it lost the daemon's connection at every
    # attempt ("connection was closed in the middle of operation"), and so did recording
    # their results. Both now go in statements of at most STATEMENT_BYTES, in one
    # transaction each; shown at 300 kB, not at 1 GB. (xmin names a row version's
    # transaction, cmin the statement in it.)
    monkeypatch.setattr(durable.store.workflows, "STATEMENT_BYTES", 300_000)
    n, size = 24, 50_000
    versions = (
        "select count(distinct xmin::text), count(distinct cmin::text) from {}"
        " where {} = $1 and {}"
    )
    async with session(dsn) as conn, durable.connect(dsn) as client:
        async with running_daemon(dsn, queues={app.QUEUE: 2}):  # children left queued
            handle = await client.start(app.echoes, n, size)
            await statuses_in(dsn, [handle.id], "waiting", timeout=60)
        spawned = await conn.fetchrow(
            versions.format("durable.tasks", "parent_id", "true"), handle.id
        )
        assert spawned is not None and spawned[0] == 1 and spawned[1] >= 4, spawned
        async with running_daemon(dsn, queues={app.QUEUE: 2, app.KIDS: 8}):
            assert await handle.result(timeout=120) == [str(i) for i in range(n)]
        recorded = await conn.fetchrow(
            versions.format("durable.events", "task_id", "kind = 'child'"), handle.id
        )
        assert recorded is not None and recorded[0] == 1 and recorded[1] >= 4, recorded
        assert await conn.fetchval(
            "select bool_and(result #>> '{}' = rpad(seq || ':', $2, 'x')) from durable.events"
            " where task_id = $1 and kind = 'child'", handle.id, size,
        )  # fmt: skip


async def test_a_child_past_the_payload_limit_fails_the_gather_in_one_line_starting_none(
    dsn: str,
) -> None:
    # One child's arguments over codec.MAX_PAYLOAD (16 MiB): the workflow fails with one
    # line naming the limit, and no child of the gather was started.
    big = 16 * 1024 * 1024 + 1
    async with running_daemon(dsn, queues={app.QUEUE: 2, app.KIDS: 2}), durable.connect(
        dsn
    ) as client:
        handle = await client.start(app.echoes, 3, 10, big)
        with pytest.raises(TaskFailed) as failed:
            await handle.result(timeout=120)
    message = str(failed.value.message)
    assert "\n" not in message
    assert "the arguments of 'fo_echo'" in message and "the limit is 16777216 bytes" in message
    async with session(dsn) as conn:
        assert not await conn.fetchval(
            "select count(*) from durable.tasks where parent_id = $1", handle.id
        )


@pytest.mark.timeout(180)
async def test_the_measuring_tool_runs_and_checks_its_count(server_dsn: str) -> None:
    # `python -m durable.tools.fan_out` (docs/performance.md, "Fan-out"), small.
    env = daemon_env(server_dsn)
    del env["DURABLE_DATABASE_URL"]
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "durable.tools.fan_out", "--database-url", server_dsn,
         "--workflow", "each", "20", "--queues", "fanout_parents=2,fanout_kids=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout)
    assert (line["children"], line["verified"], line["parent_log_events"]) == (20, True, 20)
    assert line["rows_per_child"] > 0 and line["xacts_per_child"] > 0

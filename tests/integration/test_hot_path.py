"""The daemon's hot path against the store: connections open and warm at start, and the
claim's rows in the shape the daemon reads them."""

from __future__ import annotations

import contextlib
import uuid

import asyncpg
import pytest

from durable.daemon import WARM_CONNECTIONS
from durable.models import Claimed
from durable.store import Store, queries
from durable.store.tasks import WARM_UP
from tests.helpers import execute, running_daemon


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


async def test_an_idle_loop_finds_its_next_due_task_without_reading_the_queue(dsn: str) -> None:
    # 20,000 tasks scheduled for tomorrow and one for the day after in another queue: the
    # look for the next due task reads one index entry, not every queued task.
    await execute(
        dsn,
        "insert into durable.tasks (queue, name, run_at)"
        " select 'hp', case when g % 2 = 0 then 'hp_a' else 'hp_b' end,"
        "        now() + interval '1 day' + g * interval '1 second'"
        " from generate_series(1, 20000) g",
    )
    await execute(dsn, "analyze durable.tasks")
    conn = await asyncpg.connect(dsn)
    try:
        due = await conn.fetchval(queries()["next_due"], "hp", ["hp_b"])
        first = await conn.fetchval(
            "select min(run_at) from durable.tasks where name = 'hp_b'"
        )
        assert due == first
        stmt = await conn.prepare(queries()["next_due"])
        (plan,) = await stmt.explain("hp", ["hp_b"], analyze=True)
    finally:
        await conn.close()

    def nodes(node: dict[str, object]) -> list[dict[str, object]]:
        children = node.get("Plans", [])
        assert isinstance(children, list)
        return [node, *(n for child in children for n in nodes(child))]

    scans = [n for n in nodes(plan["Plan"]) if "Scan" in str(n["Node Type"])]
    assert [n.get("Index Name") for n in scans] == ["tasks_due_idx"]
    # One row read: the first entry of queue hp in due order is an hp_a, the second is hp_b.
    (scan,) = scans
    assert float(str(scan["Actual Rows"])) + float(str(scan.get("Rows Removed by Filter", 0))) <= 2


async def test_no_claim_can_take_the_due_index(dsn: str) -> None:
    # tasks_due_idx leads with the queue, like the ready index: a claim planned on stale
    # statistics once took it and sorted a whole backlog. Its predicate keeps every claim
    # off it: with the ready index gone (in a transaction rolled back), the claim's shape
    # of query still finds no use for it.
    await execute(
        dsn,
        "insert into durable.tasks (queue, name) select 'hp', 'hp_a' from generate_series(1, 500)",
    )
    await execute(dsn, "analyze durable.tasks")
    conn = await asyncpg.connect(dsn)
    try:
        tr = conn.transaction()
        await tr.start()
        try:
            await conn.execute("drop index durable.tasks_ready_idx")
            await conn.execute("set local enable_seqscan = off")
            rows = await conn.fetch(
                "explain select id from durable.tasks where queue = 'hp' and status = 'queued'"
                " and run_at <= now() and name = any(array['hp_a'])"
                " order by priority desc, id limit 32"
            )
        finally:
            await tr.rollback()
    finally:
        await conn.close()
    plan = "\n".join(r[0] for r in rows)
    assert "tasks_due_idx" not in plan, plan

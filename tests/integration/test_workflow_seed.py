"""The seed tutorial's scenarios: an order workflow of two child tasks, and a panic after
the charge; and how `durable show` / `durable ls` present a finished workflow."""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter

import asyncpg

import durable
from tests.support.helpers import durable_cli, execute, fetchval, running_daemon

EMAILS: Counter[str] = Counter()
CHARGES_TABLE = "create table wf_charges (order_id text not null, at timestamptz default now())"


@durable.task(max_attempts=1)
async def wf_seed_charge(dsn: str, order: str, amount: int) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("insert into wf_charges (order_id) values ($1)", order)
    finally:
        await conn.close()
    return f"charged {amount} for {order}"


@durable.task(max_attempts=1)
async def wf_seed_email(order: str) -> str:
    EMAILS[order] += 1
    return f"emailed {order}"


@durable.workflow(max_attempts=3, retry=durable.RetryPolicy(base=0, jitter=0))
async def wf_seed_order(
    ctx: durable.Context, dsn: str, order: str, panic: bool = False
) -> dict[str, object]:
    charge = await ctx.run(wf_seed_charge, dsn, order, 100)
    if panic and ctx.attempt == 1:
        raise RuntimeError("panic after charge")
    email = await ctx.run(wf_seed_email, order)
    return {"charge": charge, "email": email, "attempt": ctx.attempt}


async def charges(dsn: str, order: str) -> int:
    return int(await fetchval(dsn, "select count(*) from wf_charges where order_id = $1", order))


async def event_rows(dsn: str, task_id: int) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select branch, seq, kind, name, child_id, status from durable.events"
            " where task_id = $1 order by branch, seq",
            task_id,
        )
    finally:
        await conn.close()
    return [tuple(r) for r in rows]


async def children(dsn: str, task_id: int) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select id, name, status from durable.tasks where parent_id = $1 order by id", task_id
        )
    finally:
        await conn.close()
    return [tuple(r) for r in rows]


async def test_two_step_workflow_completes_with_two_child_tasks(dsn: str) -> None:
    await execute(dsn, CHARGES_TABLE)
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(wf_seed_order, dsn, "order-1")
        assert await handle.result(timeout=20) == {
            "charge": "charged 100 for order-1",
            "email": "emailed order-1",
            "attempt": 1,
        }
        kids = await children(dsn, handle.id)
        assert [(name, status) for _, name, status in kids] == [
            ("wf_seed_charge", "completed"),
            ("wf_seed_email", "completed"),
        ]
        history = await client.history(handle.id)
        assert [(e.seq, e.kind, e.name, e.child_status) for e in history] == [
            (0, "child", "wf_seed_charge", "completed"),
            (1, "child", "wf_seed_email", "completed"),
        ]
        assert [e.child_id for e in history] == [k[0] for k in kids]
        assert await charges(dsn, "order-1") == 1 and EMAILS["order-1"] == 1


async def test_rerunning_a_finished_workflow_writes_no_duplicate_events(dsn: str) -> None:
    await execute(dsn, CHARGES_TABLE)
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(wf_seed_order, dsn, "order-2")
        first = await handle.result(timeout=20)
        events, kids = await event_rows(dsn, handle.id), await children(dsn, handle.id)
        for run in (2, 3):
            assert await client.retry(handle.id) == 0
            again = await handle.result(timeout=20)
            # Every durable call replayed from the log: same children, same results.
            assert again == {**first, "attempt": run}
            assert await event_rows(dsn, handle.id) == events
            assert await children(dsn, handle.id) == kids
        assert await charges(dsn, "order-2") == 1 and EMAILS["order-2"] == 1
        assert (await client.get(handle.id)).attempt == 3


async def test_panic_after_charge_charges_exactly_once(dsn: str) -> None:
    await execute(dsn, CHARGES_TABLE)
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(wf_seed_order, dsn, "order-3", panic=True)
        result = await handle.result(timeout=20)
        assert result["attempt"] == 2  # attempt 1 panicked after the charge
        info = await client.get(handle.id)
        assert info.status == "completed" and info.attempt == 2
        assert await charges(dsn, "order-3") == 1
        assert EMAILS["order-3"] == 1
        kids = await children(dsn, handle.id)
        assert [name for _, name, _ in kids] == ["wf_seed_charge", "wf_seed_email"]
        history = await client.history(handle.id)
        assert [(e.kind, e.name, e.attempt) for e in history] == [
            ("child", "wf_seed_charge", 1),
            ("child", "wf_seed_email", 2),
        ]


# -- the CLI ---------------------------------------------------------------------------


def wf_cli_lookup(sku: str) -> dict[str, object]:
    return {"sku": sku, "stock": 3}


def wf_cli_broken() -> None:
    raise ValueError("scanner jammed")


@durable.workflow(max_attempts=1)
async def wf_cli_show(ctx: durable.Context, order: str) -> str:
    await ctx.step("lookup", wf_cli_lookup, "sku-9")
    with contextlib.suppress(ValueError):
        await ctx.step("scan", wf_cli_broken)
    await ctx.run(wf_seed_email, order)
    return "shown"


def event_table(out: str) -> list[dict[str, str]]:
    """The rows of the event log table in `durable show` output, by column title."""
    lines = out[out.index("event log, branch") :].splitlines()[1:]
    header = lines[0]
    assert header.startswith("SEQ")
    titles = header.split()
    starts = [header.index(f" {t} ") + 1 if i else 0 for i, t in enumerate(titles[:-1])]
    starts.append(header.rindex(" " + titles[-1]) + 1)
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [
        {t: line[a:b].strip() for t, (a, b) in zip(titles, bounds, strict=True)}
        for line in lines[1:]
        if line.strip()
    ]


async def only_child(dsn: str, task_id: int) -> int:
    return int(
        await fetchval(
            dsn,
            "select child_id from durable.events where task_id = $1 and kind = 'child'",
            task_id,
        )
    )


async def test_cli_show_prints_the_event_log_and_ls_lists_the_workflow(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(wf_cli_show, "order-cli")
        assert await handle.result(timeout=20) == "shown"
    child_id = await only_child(dsn, handle.id)

    shown = durable_cli("show", str(handle.id), dsn=dsn)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"task {handle.id}" in out and "'wf_cli_show'" in out
    assert re.search(r"^status\s+completed$", out, re.MULTILINE)
    assert "event log, branch 0" in out
    rows = event_table(out)
    assert [(r["SEQ"], r["KIND"], r["NAME"]) for r in rows] == [
        ("0", "step", "lookup"),
        ("1", "step", "scan"),
        ("2", "child", "wf_seed_email"),
    ]
    assert rows[0]["OUTCOME"].startswith("->") and "sku-9" in rows[0]["OUTCOME"]
    assert rows[1]["OUTCOME"] == "failed: builtins.ValueError: scanner jammed"
    assert rows[2]["OUTCOME"] == f"child {child_id}: completed"

    listed = durable_cli("ls", "--name", "wf_cli_show", dsn=dsn)
    assert listed.returncode == 0, listed.stderr
    entries = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    assert [(e["id"], e["name"], e["kind"], e["status"]) for e in entries] == [
        (handle.id, "wf_cli_show", "workflow", "completed")
    ]
    everything = durable_cli("ls", dsn=dsn)
    ids = {json.loads(line)["id"] for line in everything.stdout.splitlines() if line.strip()}
    assert {handle.id, child_id} <= ids

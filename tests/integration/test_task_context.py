"""durable.TaskContext and durable.current(): a task's own id, attempt and queue, and its
progress: stored coalesced, shown by `durable show`/`ls`, streamed by handle.progress()."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import pytest

import durable
from durable.taskcontext import PROGRESS_INTERVAL
from tests.support.helpers import durable_cli, execute, fetchval, running_daemon

seen: dict[str, Any] = {}
gates: dict[int, asyncio.Event] = {}


@durable.task(name="tc_self", queue="default", max_attempts=3, retry=durable.RetryPolicy(base=0.0))
async def tc_self(ctx: durable.TaskContext, fail_first: bool) -> list[Any]:
    if fail_first and ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    assert durable.current() is ctx
    return [ctx.id, ctx.name, ctx.queue, ctx.attempt, ctx.max_attempts, ctx.deadline]


@durable.task(name="tc_current")
async def tc_current(x: int) -> list[Any]:  # no TaskContext parameter: durable.current()
    here = durable.current()
    return [here.id, here.attempt, x]


@durable.task(name="tc_loop")
async def tc_loop(n: int) -> str:
    here = durable.current()
    for i in range(1, n + 1):
        here.progress(i / n, f"item {i} of {n}")
    return "done"


@durable.task(name="tc_steps")
async def tc_steps(ctx: durable.TaskContext) -> str:
    for i in (1, 2, 3):
        ctx.progress(i, f"step {i}")
        await gates[i].wait()  # the test opens it once it has seen report i
    return "done"


@durable.workflow(name="tc_flow", max_attempts=1)
async def tc_flow(ctx: durable.Context) -> str:
    ctx.progress({"stage": "charging"}, "charging the card")
    await ctx.step("charge", lambda: "ok")
    return "ok"


@durable.task(name="tc_bad_message", max_attempts=1)
async def tc_bad_message() -> None:
    durable.current().progress(1, "x" * 1001)


async def test_a_task_sees_its_own_attempt(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        first = await client.start(tc_self, True)
        assert await first.result(timeout=30) == [first.id, "tc_self", "default", 2, 3, None]
        second = await client.start(tc_current, 5)
        assert await second.result(timeout=30) == [second.id, 1, 5]
    # Tasks that never report write nothing.
    assert await fetchval(dsn, "select count(*) from durable.progress") == 0
    with pytest.raises(durable.DurableError, match="only available inside a running task"):
        durable.current()


async def test_a_tight_loop_of_reports_is_coalesced(dsn: str) -> None:
    # Every row version written to durable.progress, counted by a trigger of the test's.
    await execute(
        dsn,
        """
        create table tc_writes (n bigint);
        insert into tc_writes values (0);
        create function tc_count() returns trigger language plpgsql as $$
        begin update tc_writes set n = n + 1; return null; end $$;
        create trigger tc_count after insert or update on durable.progress
            for each row execute function tc_count();
        """,
    )
    async with durable.connect(dsn) as client, running_daemon(dsn):
        started = anyio.current_time()
        handle = await client.start(tc_loop, 20000)
        assert await handle.result(timeout=60) == "done"
        took = anyio.current_time() - started
    writes = await fetchval(dsn, "select n from tc_writes")
    # The first report at once, one per interval while the loop runs, the last at the end.
    assert 1 <= writes <= 2 + took / PROGRESS_INTERVAL
    stored = await fetchval(dsn, "select message from durable.progress where task_id = $1", handle.id)
    assert stored == "item 20000 of 20000"  # the latest report wins


async def test_handle_progress_streams_each_report_until_the_end(dsn: str) -> None:
    gates.clear()
    gates.update({i: asyncio.Event() for i in (1, 2, 3)})
    got: list[Any] = []
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(tc_steps)
        # Three reports a PROGRESS_INTERVAL apart: woken by notifications, the iterator
        # sees them well before its 5 s fallback re-check would.
        with anyio.fail_after(3 * PROGRESS_INTERVAL + 4):
            async for p in handle.progress():
                got.append((p.value, p.message))
                gates[p.value].set()
        assert await handle.result(timeout=30) == "done"
    assert got == [(1, "step 1"), (2, "step 2"), (3, "step 3")]


async def test_progress_is_shown_and_fenced(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        flow = await client.start(tc_flow)
        assert await flow.result(timeout=30) == "ok"
        bad = await client.start(tc_bad_message)
        with pytest.raises(durable.TaskFailed, match="a progress message must be a string of 1 to 1000 characters"):
            await bad.result(timeout=30)
    shown = durable_cli("show", str(flow.id), dsn=dsn)
    assert shown.returncode == 0, shown.stderr
    assert 'progress   {"stage": "charging"} charging the card' in shown.stdout
    listed = [json.loads(line) for line in durable_cli("ls", "--json", dsn=dsn).stdout.splitlines()]
    assert {r["id"]: r["progress"] for r in listed}[flow.id] == '{"stage": "charging"} charging the card'
    # A write under a claim that no longer holds (a stale attempt) writes nothing.
    async with durable.connect(dsn) as client:
        await client.store.report_progress(bad.id, 12345, "1", "stale")
    assert await fetchval(dsn, "select count(*) from durable.progress where task_id = $1", bad.id) == 0

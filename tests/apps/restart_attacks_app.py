"""Workflows for tests/faults/test_restart_attacks.py: retry, replay and fork of finished
runs, in the test's own daemons or in subprocess ones (``durable run --app
tests.apps.restart_attacks_app``).

Every step body writes a row to ``rs_effects`` (the task, the step, the branch and the
attempt it ran under), so the test counts what actually ran again after a restart.
``RS_STAGE`` in the daemon's environment picks the code it runs: ``broken`` (the default:
step ``c`` of ``rs_fixable`` fails), ``fixed`` (it succeeds) or ``changed`` (fixed, and a
step inserted at position 1: the recorded histories no longer match).
"""

from __future__ import annotations

import os
from typing import Any

import asyncpg

import durable

QUEUE = "rs_flows"

EFFECTS_SQL = """
create table if not exists public.rs_effects (
    id bigint generated always as identity primary key,
    task_id bigint not null,
    name text not null,
    branch integer not null,
    attempt integer not null
)
"""

GATE = 911
"""``rs_gated`` holds this advisory lock shared while its step runs: the test holds it
exclusively to keep the step (and the attempt) running."""


async def effect(dsn: str, name: str) -> str:
    """Record that the step ``name`` ran, under the task's current branch and attempt."""
    me = durable.current()
    conn = await asyncpg.connect(dsn)
    try:
        branch = await conn.fetchval("select branch from durable.tasks where id = $1", me.id)
        await conn.execute(
            "insert into public.rs_effects (task_id, name, branch, attempt) values ($1, $2, $3, $4)",
            me.id, name, branch, me.attempt,
        )
    finally:
        await conn.close()
    return f"{name}@{branch}"


async def flaky(dsn: str) -> str:
    """Fails on the first try of each branch's run of it (no failed try in the log yet)."""
    me = durable.current()
    await effect(dsn, "flaky")
    conn = await asyncpg.connect(dsn)
    try:
        failed = await conn.fetchval(
            "select count(*) from durable.events e join durable.tasks t on t.id = e.task_id"
            " and t.branch = e.branch where e.task_id = $1 and e.name = 'flaky'"
            " and e.status = 'failed'", me.id,
        )  # fmt: skip
    finally:
        await conn.close()
    if failed == 0:
        raise ValueError("the first try fails")
    return "flaky ok"


def whoami() -> list[Any]:
    me = durable.current()
    return [me.id, me.attempt, me.max_attempts, me.deadline.isoformat() if me.deadline else None]


@durable.task(name="rs_kid", queue=QUEUE, max_attempts=1)
async def kid(dsn: str, tag: str) -> str:
    return await effect(dsn, f"kid:{tag}")


@durable.workflow(name="rs_all", queue=QUEUE, max_attempts=1)
async def everything(ctx: durable.Context, dsn: str) -> dict[str, Any]:
    """One call of every kind, in this order (one position each, but the step with a
    retry policy, which takes one per try)."""
    out: dict[str, Any] = {"me": durable.current().id == ctx.task_id}
    out["a"] = await ctx.step("a", effect, dsn, "a")
    out["flaky"] = await ctx.step(
        "flaky", flaky, dsn, retry=durable.RetryPolicy(max_attempts=3, base=0.01, jitter=0)
    )
    await ctx.sleep(0.01, name="nap")
    out["event"] = await ctx.wait_for_event("go")
    out["run"] = await ctx.run(kid, dsn, "run")
    spawned = await ctx.spawn(kid, dsn, "spawned")
    out["gather"] = await ctx.gather(ctx.run(kid, dsn, "g1"), ctx.run(kid, dsn, "g2"), spawned)
    out["patched"] = await ctx.patched("p1")
    out["uuid"] = str(await ctx.uuid4())
    out["current"] = await ctx.step("current", whoami)
    out["b"] = await ctx.step("b", effect, dsn, "b")
    return out


async def buggy(dsn: str) -> str:
    await effect(dsn, "c")
    if os.environ.get("RS_STAGE", "broken") == "broken":
        raise RuntimeError("the bug in step c")
    return "c fixed"


@durable.workflow(name="rs_fixable", queue=QUEUE, max_attempts=1)
async def fixable(ctx: durable.Context, dsn: str) -> list[Any]:
    out: list[Any] = [await ctx.step("a", effect, dsn, "a")]
    if os.environ.get("RS_STAGE") == "changed":
        out.append(await ctx.step("inserted", effect, dsn, "inserted"))
    out.append(await ctx.wait_for_event("go"))
    out.append(await ctx.step("b", effect, dsn, "b"))
    out.append(await ctx.step("c", buggy, dsn))
    out.append(await ctx.step("d", effect, dsn, "d"))
    return out


async def gated(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("select pg_advisory_lock_shared($1)", GATE)
    finally:
        await conn.close()
    return await effect(dsn, "gated")


@durable.workflow(name="rs_gated", queue=QUEUE, max_attempts=1)
async def gated_flow(ctx: durable.Context, dsn: str) -> str:
    await ctx.step("a", effect, dsn, "a")
    return str(await ctx.step("gated", gated, dsn))


async def refuse_unless_fixed(dsn: str) -> str:
    await effect(dsn, "x")
    if os.environ.get("RS_STAGE", "broken") == "broken":
        raise ValueError("x refused")
    return "x ok"


@durable.workflow(name="rs_handled", queue=QUEUE, max_attempts=1)
async def handled(ctx: durable.Context, dsn: str) -> str:
    """Handles the failure of step x, then runs the gated step."""
    try:
        path = str(await ctx.step("x", refuse_unless_fixed, dsn))
    except ValueError:
        path = "fallback"
    await ctx.step("gated", gated, dsn)
    return path


@durable.workflow(name="rs_waiter", queue=QUEUE, max_attempts=1)
async def waiter(ctx: durable.Context, tag: str) -> str:
    return f"{tag}:{await ctx.wait_for_event('go')}"


@durable.workflow(name="rs_leaver", queue=QUEUE, max_attempts=1)
async def leaver(ctx: durable.Context, dsn: str) -> str:
    """Spawns a child workflow that waits for an event, and ends without awaiting it
    (the child goes on running after its parent finished)."""
    await ctx.step("a", effect, dsn, "a")
    child = await ctx.spawn(waiter, "child")
    await ctx.step("b", effect, dsn, "b")
    if os.environ.get("RS_AWAIT") == "1":
        return str(await child)
    return f"left {child.id}"


@durable.workflow(name="rs_chain", queue=QUEUE, max_attempts=1)
async def chain(ctx: durable.Context, dsn: str, n: int) -> list[Any]:
    got = await ctx.wait_for_event("tick")
    done = await ctx.step(f"run{n}", effect, dsn, f"run{n}")
    if n < 2:
        ctx.continue_as_new(dsn, n + 1)
    return [n, got, done]


@durable.workflow(name="rs_plain_flow", queue=QUEUE, max_attempts=1)
async def plain_flow(ctx: durable.Context, dsn: str) -> str:
    return str(await ctx.step("a", effect, dsn, "a"))


@durable.task(name="rs_plain", queue=QUEUE, max_attempts=1)
async def plain(dsn: str) -> str:
    return await effect(dsn, "plain")

"""A long-lived entity workflow for the fault tests: its step hangs once at a chosen
position, so that the daemon can be killed in the middle of a warm resume."""

from __future__ import annotations

import asyncio
import os

import durable

ENTITY_QUEUE = "entity_faults"
ENTITY_TABLES = """
create table entity_starts (pid int not null);
create table entity_steps (i int not null, pid int not null);
create table entity_hang (i int primary key);
"""


async def _record(query: str, *args: object) -> bool:
    import asyncpg

    conn = await asyncpg.connect(os.environ["DURABLE_DATABASE_URL"])
    try:
        return bool(await conn.fetchval(query, *args))
    finally:
        await conn.close()


async def entity_step(i: int, v: int) -> int:
    await _record("insert into entity_steps values ($1, $2) returning true", i, os.getpid())
    # Hangs the first time position i is listed in entity_hang (the row is then marked).
    if await _record("delete from entity_hang where i = $1 returning true", i):
        await asyncio.sleep(3600)
    return v + 1


@durable.workflow(queue=ENTITY_QUEUE)
async def wf_entity_fault(ctx: durable.Context, n: int) -> list[int]:
    # Not durable on purpose: one row per time the function starts (a cold run).
    await _record("insert into entity_starts values ($1) returning true", os.getpid())
    out = []
    for i in range(n):
        v = await ctx.wait_for_event("e")
        out.append(await ctx.step(f"s{i}", entity_step, i, v))
    return out

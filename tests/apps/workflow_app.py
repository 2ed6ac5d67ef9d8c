"""Workflows for subprocess daemons: ``durable run --app tests.apps.workflow_app``.

The fault tests create the tables these write to (``FAULT_TABLES``) in their own database.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg

import durable

FAULT_QUEUE = "wf_faults"
STEPS = 20
TRANSACTIONAL = frozenset({2, 6, 10, 14, 18})
"""Positions of the twenty-step workflow that are ``ctx.transaction``s; the rest are steps."""

FAULT_TABLES = """
create table wf_side_effects (
    id bigint generated always as identity primary key,
    seq integer not null,
    attempt integer not null,
    run_id uuid not null,
    checkpoint_existed boolean not null,
    at timestamptz not null default clock_timestamp()
);
create table wf_business (
    id bigint generated always as identity primary key,
    task_id bigint not null,
    seq integer not null,
    at timestamptz not null default clock_timestamp()
);
"""


async def _side_effect(dsn: str, task_id: int, seq: int, attempt: int) -> str:
    """A step's external effect, recorded with whether its checkpoint already existed."""
    run_id = str(uuid.uuid4())
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "insert into wf_side_effects (seq, attempt, run_id, checkpoint_existed)"
            " select $1, $2, $3::uuid, exists (select 1 from durable.events e"
            "  where e.task_id = $4 and e.branch = 0 and e.seq = $1)",
            seq,
            attempt,
            run_id,
            task_id,
        )
    finally:
        await conn.close()
    # The step's work after its effect and before its checkpoint: a kill may land here.
    await asyncio.sleep(random.uniform(0.02, 0.12))
    return run_id


async def _business_write(conn: asyncpg.Connection, task_id: int, seq: int) -> int:
    await conn.execute("insert into wf_business (task_id, seq) values ($1, $2)", task_id, seq)
    await asyncio.sleep(random.uniform(0.0, 0.05))  # a kill may land inside the transaction
    return seq


@durable.workflow(queue=FAULT_QUEUE, max_attempts=50)
async def wf_fault_twenty_steps(ctx: durable.Context, dsn: str) -> list[object]:
    out: list[object] = []
    for i in range(STEPS):
        if i in TRANSACTIONAL:
            out.append(await ctx.transaction(f"business{i}", _business_write, ctx.task_id, i))
        else:
            seq, attempt = ctx.position, ctx.attempt
            # The attempt is not an argument of the step: arguments must replay identically.
            out.append(
                await ctx.step(
                    f"effect{i}", lambda s=seq, a=attempt: _side_effect(dsn, ctx.task_id, s, a)
                )
            )
    return out

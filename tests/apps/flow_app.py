"""Tasks for the flow-control tests; subprocess daemons import it with --app."""

from __future__ import annotations

import os
import random
from typing import Any

import anyio
import asyncpg

import durable

_pool: asyncpg.Pool | None = None


async def pool() -> asyncpg.Pool:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(
            os.environ["DURABLE_DATABASE_URL"], min_size=1, max_size=4
        )
    return _pool


@durable.task(name="flow_limited", queue="flow_limited")
async def flow_limited(i: int) -> None:
    """Records its interval and how many tasks of its queue the table shows running."""
    p = await pool()
    running = await p.fetchval(
        "select count(*) from durable.tasks where queue = 'flow_limited' and status = 'running'"
    )
    started = await p.fetchval("select clock_timestamp()")
    await anyio.sleep(random.uniform(0.002, 0.012))  # the work itself
    await p.execute(
        "insert into flow_log (i, pid, started, ended, running) values ($1, $2, $3,"
        " clock_timestamp(), $4)",
        i,
        os.getpid(),
        started,
        running,
    )


def _customer(customer: str, i: int) -> str:
    return customer


@durable.task(name="flow_keyed", queue="flow_keyed", concurrency_key=_customer, key_limit=1)
async def flow_keyed(customer: str, i: int) -> dict[str, Any]:
    started = anyio.current_time()
    await anyio.sleep(random.uniform(0.001, 0.005))
    return {"customer": customer, "i": i, "started": started, "ended": anyio.current_time()}


@durable.task(name="flow_rated", queue="flow_rated")
async def flow_rated(i: int) -> int:
    return i


@durable.task(name="flow_tick", queue="flow_ticks")
async def flow_tick() -> str:
    return "tick"


@durable.task(name="batch_noop", queue="batch_q", max_attempts=5)
async def batch_noop(i: int) -> int:
    """Records every execution, so a test can count re-runs after a crash."""
    p = await pool()
    await p.execute("insert into batch_runs (i) values ($1)", i)
    return i

"""The workload of ``durable soak``, served by its daemons (``--app durable.soak_app``).

Plain tasks, children on a queue whose name needs quoting, a task that fails on purpose,
and a workflow using every durable call: steps, transactions, a durable sleep, an event
wait (with and without a sender), a child, a fan-out and a failing child it catches.
Every body records its run in ``soak.effects`` as it starts, so the soak can prove after
the fact which steps ran again and which processes wrote which outcome.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from typing import Any

import durable
from durable.errors import EventTimeout, NonRetryable, TaskFailed
from durable.store import NamedSql, is_transient, named_queries

QUEUE = "soak"
CHILD_QUEUE = 'soak "kids" ü'
"""Children run on a queue whose name has quotes, a space and non-ASCII letters."""
ATTEMPTS = 100
"""Faults cost attempts (a killed daemon's lease expires); a task must outlive many."""
FAST = durable.RetryPolicy(base=0.2, factor=2.0, max_delay=2.0, jitter=0.2)
EFFECT_DEADLINE = 120.0
"""Seconds a body keeps retrying its own record through a database restart."""

_db: NamedSql | None = None
_db_lock: asyncio.Lock | None = None


async def _sql() -> NamedSql:
    global _db, _db_lock
    if _db is None:
        if _db_lock is None:
            _db_lock = asyncio.Lock()
        async with _db_lock:
            if _db is None:
                _db = await NamedSql.open(
                    os.environ.get("DURABLE_DATABASE_URL"), "soak.sql", max_size=4,
                    name="durable-soak-app",
                )
    return _db


async def record(kind: str, key: str, task_id: int | None = None, seq: int | None = None,
                 attempt: int | None = None) -> str:
    """Record that a body starts; retried through restarts (a run id makes it idempotent)."""
    run_id = str(uuid.uuid4())
    delay = 0.05
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EFFECT_DEADLINE
    while True:
        try:
            db = await _sql()
            await db.run("record_effect", run_id, kind, key, task_id, seq, attempt,
                         os.getpid(), timeout=10)
            return run_id
        except Exception as exc:
            if not is_transient(exc) or loop.time() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def _work(low: float = 0.0, high: float = 0.05) -> None:
    """The body's own work: a kill or freeze may land here, after its record."""
    await asyncio.sleep(random.uniform(low, high))


@durable.task(queue=QUEUE, max_attempts=ATTEMPTS, retry=FAST)
async def soak_task(key: str, seconds: float = 0.0) -> dict[str, Any]:
    """Works for a moment, or ``seconds``: long ones outlive a frozen daemon's lease, so
    its attempt wakes up while another daemon runs the task (a zombie with work to write)."""
    run = await record("task", key)
    await (asyncio.sleep(seconds) if seconds else _work(0.0, 0.4))
    return {"pid": os.getpid(), "run": run, "key": key}


@durable.task(queue=CHILD_QUEUE, max_attempts=ATTEMPTS, retry=FAST)
async def soak_child(key: str, i: int) -> dict[str, Any]:
    run = await record("child", f"{key}/{i}")
    await _work(0.0, 0.1)
    return {"pid": os.getpid(), "run": run, "i": i}


@durable.task(queue=CHILD_QUEUE, max_attempts=ATTEMPTS, retry=FAST)
async def soak_doomed(key: str) -> None:
    """Fails on purpose, at once: the soak expects it to end failed."""
    await record("doomed", key)
    raise NonRetryable(f"{key} fails on purpose")


async def _business(conn: Any, task_id: int, seq: int, attempt: int) -> int:
    await conn.execute(named_queries("soak.sql")["business"], task_id, seq, attempt, os.getpid())
    await _work(0.0, 0.03)  # a kill may land inside the transaction
    return seq


async def _step(ctx: durable.Context, name: str, seconds: float = 0.0) -> Any:
    seq, attempt, task_id = ctx.position, ctx.attempt, ctx.task_id

    async def body() -> dict[str, Any]:
        run = await record("step", name, task_id, seq, attempt)
        # Long enough that faults land inside steps; a slow one outlives a lease.
        await (asyncio.sleep(seconds) if seconds else _work(0.0, 0.5))
        return {"run": run}

    # The attempt is not an argument: arguments must replay identically.
    return await ctx.step(name, body)


async def _transaction(ctx: durable.Context, name: str) -> Any:
    attempt = ctx.attempt

    async def write(conn: Any, task_id: int, seq: int) -> int:
        return await _business(conn, task_id, seq, attempt)

    # As for steps, the attempt is not an argument: it would change the digest on replay.
    return await ctx.transaction(name, write, ctx.task_id, ctx.position)


@durable.workflow(queue=QUEUE, max_attempts=ATTEMPTS, retry=FAST)
async def soak_workflow(ctx: durable.Context, key: str, plan: dict[str, Any]) -> dict[str, Any]:
    """``plan``: slow (seconds of the first step), sleep (seconds), wait (event timeout),
    fan (children), doomed (bool)."""
    runs = [await _step(ctx, "first", float(plan.get("slow", 0.0)))]
    await _transaction(ctx, "reserve")
    await ctx.sleep(float(plan["sleep"]))
    try:
        event = await ctx.wait_for_event("go", timeout=float(plan["wait"]))
    except EventTimeout:
        event = "timeout"
    child = await ctx.run(soak_child, key, 0)
    fan = await ctx.gather(*(ctx.run(soak_child, key, i) for i in range(1, int(plan["fan"]) + 1)))
    caught = None
    if plan["doomed"]:
        try:
            await ctx.run(soak_doomed, key)
        except TaskFailed as exc:
            caught = exc.type
    runs.append(await _step(ctx, "last"))
    await _transaction(ctx, "finish")
    return {
        "pid": os.getpid(),
        "attempt": ctx.attempt,
        "event": event,
        "children": [child["i"]] + [c["i"] for c in fan],
        "caught": caught,
        "runs": [r["run"] for r in runs],
    }

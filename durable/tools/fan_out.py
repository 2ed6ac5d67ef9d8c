"""Workflows fanning out into N children: `python -m durable.tools.fan_out --database-url URL
[--workflow gather] N [N...]` runs, for each N, a `durable run` daemon in a subprocess over a
scratch database (holding 20,000 finished tasks and 10,000 small logs, analyzed, as a
production database would), starts one workflow that fans out into N children, and prints
one JSON line: from the workflow's start to its result, the seconds, the daemon's CPU and
peak RSS, and per child the transactions, the blocks of durable's tables, indexes and
toast, and the rows read, from the server's statistics. `--generic` plans every statement
as Postgres does a prepared statement after its fifth execution. The daemon imports this
module for the workflows below (`--app durable.tools.fan_out`)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from typing import Any

import anyio

import durable

QUEUE = "fanout_parents"
KIDS = "fanout_kids"


@durable.task(name="fanout_leaf", queue=KIDS)
async def leaf(x: int) -> int:
    return x


@durable.workflow(name="fanout_leaf_flow", queue=KIDS)
async def leaf_flow(ctx: durable.Context, x: int) -> int:
    return x


@durable.workflow(name="fanout_gather", queue=QUEUE, max_attempts=5)
async def gather(ctx: durable.Context, n: int, flows: bool = False) -> int:
    """``ctx.gather`` of ``n`` ``ctx.run`` children (tasks, or workflows); their sum."""
    child = leaf_flow if flows else leaf
    return sum(await ctx.gather(*(ctx.run(child, i) for i in range(n))))


@durable.workflow(name="fanout_spawn", queue=QUEUE, max_attempts=5)
async def spawn(ctx: durable.Context, n: int) -> int:
    """``n`` ``ctx.spawn`` calls, then one ``ctx.gather`` of their handles."""
    handles = [await ctx.spawn(leaf, i) for i in range(n)]
    return sum(await ctx.gather(*handles))


@durable.workflow(name="fanout_spawn_many", queue=QUEUE, max_attempts=5)
async def spawn_many(ctx: durable.Context, n: int) -> int:
    """One ``ctx.spawn_many`` of ``n`` children, then one ``ctx.gather`` of their handles."""
    handles = await ctx.spawn_many(leaf, [[i] for i in range(n)])
    return sum(await ctx.gather(*handles))


@durable.workflow(name="fanout_each", queue=QUEUE, max_attempts=5)
async def each(ctx: durable.Context, n: int) -> int:
    """``n`` ``ctx.spawn`` calls, then each handle awaited in turn."""
    handles = [await ctx.spawn(leaf, i) for i in range(n)]
    total = 0
    for h in handles:
        total += await h
    return total


@durable.workflow(name="fanout_seq", queue=QUEUE, max_attempts=5)
async def seq(ctx: durable.Context, n: int) -> int:
    """``n`` ``ctx.run`` calls one after the other (an agent calling its tools in turn)."""
    total = 0
    for i in range(n):
        total += await ctx.run(leaf, i)
    return total


WORKFLOWS: dict[str, durable.Definition[Any, Any]] = {
    "gather": gather, "flows": gather, "spawn": spawn, "spawn_many": spawn_many, "each": each,
    "seq": seq,
}

HISTORY = """
insert into durable.tasks (queue, name, status, finished_at)
select 'history', 'history', 'completed', now() from generate_series(1, 20000);
insert into durable.events (task_id, branch, seq, kind, name, digest, status, attempt)
select 1000000000 + t, 0, i, 'step', 's', 'd', 'completed', 1
  from generate_series(1, 10000) t, generate_series(0, 2) i;
analyze durable.tasks;
analyze durable.events;
"""

TOTALS = """
select (select sum(heap_blks_hit + heap_blks_read + coalesce(idx_blks_hit + idx_blks_read, 0)
                   + coalesce(toast_blks_hit + toast_blks_read, 0)
                   + coalesce(tidx_blks_hit + tidx_blks_read, 0))
          from pg_statio_user_tables where schemaname = 'durable')::bigint as blocks,
       (select coalesce(toast_blks_hit + toast_blks_read, 0)
               + coalesce(tidx_blks_hit + tidx_blks_read, 0)
          from pg_statio_user_tables where schemaname = 'durable' and relname = 'tasks')::bigint
           as toast_blocks,
       (select sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))
          from pg_stat_user_tables where schemaname = 'durable')::bigint as rows,
       (select xact_commit + xact_rollback from pg_stat_database
         where datname = current_database()) as xacts
"""

OTHERS = """
select count(*) from pg_stat_activity
 where datname = current_database() and pid <> pg_backend_pid() and backend_type = 'client backend'
"""


def _proc(pid: int) -> tuple[float | None, float | None]:
    """The CPU seconds and peak RSS (MB) of process ``pid``, where /proc tells them."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{pid}/status") as f:
            peak = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
        return cpu, peak
    except (OSError, StopIteration, ValueError):
        return None, None


async def _until(check: Any) -> None:
    """Poll ``check()`` (a query on another process's doing) until it is truthy (60 s)."""
    with anyio.fail_after(60):
        while not await check():  # noqa: ASYNC110  # another process's doing: nothing to wait on
            await anyio.sleep(0.05)


async def _totals(conn: Any) -> dict[str, int]:
    """The database's running totals, once no other client is connected (a backend adds
    its statistics when it exits at the latest)."""

    async def alone() -> bool:
        return not await conn.fetchval(OTHERS)

    await _until(alone)
    row = await conn.fetchrow(TOTALS)
    return {k: int(v) for k, v in row.items()}


async def one(server: str, workflow: str, n: int, generic: bool, queues: str) -> dict[str, Any]:
    from durable.store import connect, create_database, drop_database, migrate

    name = f"durable_fanout_{secrets.token_hex(4)}"
    await create_database(server, name)
    dsn = server.rsplit("/", 1)[0] + "/" + name
    try:
        await migrate(dsn)
        seed = await connect(dsn)
        try:
            await seed.execute(HISTORY)
            if generic:
                await seed.execute(f'alter database "{name}" set plan_cache_mode = force_generic_plan')
        finally:
            await seed.close()
        conn = await connect(dsn)
        try:
            before = await _totals(conn)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("DURABLE_", "PG"))}
            env.update(DURABLE_DATABASE_URL=dsn, DURABLE_QUEUES=queues, DURABLE_LOG_LEVEL="warning")
            daemon = _daemon(env)
            try:

                async def serving() -> bool:
                    return bool(await conn.fetchval(
                        "select count(*) from durable.definitions where name = $1",
                        WORKFLOWS[workflow].name,
                    ))  # fmt: skip

                await _until(serving)
                cpu0, _ = _proc(daemon.pid)
                async with durable.connect(dsn) as client:
                    started = time.perf_counter()
                    args = (n, True) if workflow == "flows" else (n,)
                    handle = await client.start(WORKFLOWS[workflow], *args)
                    result = await handle.result(timeout=3600)
                    seconds = time.perf_counter() - started
                cpu1, peak = _proc(daemon.pid)
                log = await conn.fetchrow(
                    "select count(*), sum(pg_column_size(e.*)) from durable.events e"
                    " where task_id = $1", handle.id,
                )  # fmt: skip
                assert log is not None
            finally:
                daemon.terminate()
                daemon.wait(60)
            after = await _totals(conn)
        finally:
            await conn.close()
    finally:
        await drop_database(server, name)
    return {
        "workflow": workflow, "children": n, "generic_plans": generic,
        "verified": result == n * (n - 1) // 2,
        "seconds": round(seconds, 3),
        "daemon_cpu_us_per_child": round(1e6 * (cpu1 - cpu0) / n) if cpu0 is not None and cpu1 is not None else None,
        "daemon_peak_rss_mb": round(peak, 1) if peak is not None else None,
        **{f"{k}_per_child": round((after[k] - before[k]) / n, 2) for k in after},
        "parent_log_events": log[0], "parent_log_bytes": log[1],
    }  # fmt: skip


def _daemon(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A `durable run` process serving this module's queues (started at once)."""
    return subprocess.Popen(
        [sys.executable, "-m", "durable", "run", "--app", "durable.tools.fan_out"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m durable.tools.fan_out", description=__doc__)
    p.add_argument("--database-url", default=os.environ.get("DURABLE_DATABASE_URL"), required=False)
    p.add_argument("--workflow", choices=sorted(WORKFLOWS), default="gather")
    p.add_argument("--generic", action="store_true", help="plan every statement generically")
    p.add_argument("--queues", default=f"{QUEUE}=4,{KIDS}=50")
    p.add_argument("sizes", nargs="+", type=int, metavar="N")
    a = p.parse_args(argv)
    if not a.database_url:
        p.error("--database-url (or DURABLE_DATABASE_URL) is required: a server where it may create databases")

    async def run() -> None:
        for n in a.sizes:
            print(json.dumps(await one(a.database_url, a.workflow, n, a.generic, a.queues)), flush=True)

    anyio.run(run)


if __name__ == "__main__":
    main()

"""`durable bench retention`: history at a steady rate under a short DURABLE_RETENTION.

A producer starts tasks (and, one in ten, a two-step workflow, so that event logs come
and go too) at a fixed rate for a while; a daemon in this process drains them and prunes
what finished more than ``keep`` seconds ago. Every ``every`` seconds the workload reads
the size of `durable.tasks`, `durable.events` and each of their indexes, the dead row
versions, the backlog, and the claims made since the last sample with the buffers
their scans of the ready index read per claimed task. Sizes and buffers are counts, not
wall time: they mean the same on a loaded machine. Flat sizes and flat buffers per claim
are what retention that keeps up looks like.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anyio

import durable
from durable.settings import Settings
from durable.tools.bench_app import QUEUE, noop, ran, steps

WORKFLOW_EVERY = 10
"""One start in this many is a two-step workflow."""

SIZES = """
select c.relname::text as name, pg_relation_size(c.oid)::bigint as bytes
  from pg_class c
 where c.relnamespace = 'durable'::regnamespace and c.relkind in ('r', 'i')
   and (c.oid in ('durable.tasks'::regclass, 'durable.events'::regclass)
        or c.oid in (select indexrelid from pg_index
                      where indrelid in ('durable.tasks'::regclass, 'durable.events'::regclass)))
 order by c.relname
"""

COUNTS = """
select (select count(*) from durable.tasks)::bigint as tasks,
       (select count(*) from durable.tasks where status = 'queued')::bigint as queued,
       (select coalesce(sum(n_dead_tup), 0) from pg_stat_user_tables
         where schemaname = 'durable' and relname in ('tasks', 'events'))::bigint as dead,
       (select coalesce(sum(idx_blks_hit + idx_blks_read), 0) from pg_statio_user_indexes
         where schemaname = 'durable' and indexrelname = 'tasks_ready_idx')::bigint as ready_blocks
"""


@dataclass
class Sample:
    at: float
    """Seconds since the producer started."""
    sizes: dict[str, int]
    """Bytes of each table and index."""
    tasks: int
    queued: int
    dead: int
    claims_per_s: float
    ready_blocks_per_claim: float | None
    pruned: int


def _settings(concurrency: int, keep: float, vacuum: str) -> Settings:
    return Settings.from_env(
        {}, queues=f"{QUEUE}={concurrency}", poll_interval="1", lease="30",
        log_level="warning", retention=f"{keep}s", retention_vacuum=vacuum,
    )  # fmt: skip


def _claimed(daemon: Any) -> int:
    return sum(s.claimed for (q, _), s in daemon.metrics.series.items() if q == QUEUE)


async def _produce(dsn: str, rate: float, seconds: float, started: list[int]) -> None:
    """Start ``rate`` tasks a second for ``seconds``, in ticks of a tenth of a second."""
    tick = 0.1
    async with durable.connect(dsn, max_size=2) as client:
        t0 = time.monotonic()
        i = 0
        due = 0.0
        while (now := time.monotonic() - t0) < seconds:
            due = now * rate
            batch = int(due) - i
            if batch > 0:
                calls = list(range(i, i + batch))
                flows = [[c, 2] for c in calls if c % WORKFLOW_EVERY == 0]
                tasks = [[c] for c in calls if c % WORKFLOW_EVERY != 0]
                if tasks:
                    await client.start_many(noop, tasks)
                if flows:
                    await client.start_many(steps, flows)
                i += batch
                started[0] = i
            await anyio.sleep(max(0.0, tick - (time.monotonic() - t0 - now)))


async def _sample(conn: Any, daemon: Any, t0: float, last: dict[str, float]) -> Sample:
    sizes = {r["name"]: r["bytes"] for r in await conn.fetch(SIZES)}
    row = await conn.fetchrow(COUNTS)
    now = time.monotonic()
    claimed = _claimed(daemon)
    blocks = int(row["ready_blocks"])
    claims = claimed - last["claimed"]
    per_claim = (blocks - last["blocks"]) / claims if claims else None
    span = max(1e-9, now - last["at"])
    last.update(claimed=claimed, blocks=blocks, at=now)
    return Sample(
        at=round(now - t0, 1), sizes=sizes, tasks=int(row["tasks"]), queued=int(row["queued"]),
        dead=int(row["dead"]), claims_per_s=round(claims / span),
        ready_blocks_per_claim=None if per_claim is None else round(per_claim, 2),
        pruned=daemon.metrics.tasks_pruned,
    )


async def measure(
    dsn: str, *, rate: float, seconds: float, keep: float, every: float, concurrency: int,
    prune_interval: float | None = None, vacuum: str = "auto",
) -> tuple[list[Sample], int]:
    """Run the workload on the migrated database ``dsn``; returns the samples and how
    many starts (tasks and workflows) the producer made."""
    from durable.daemon import Daemon
    from durable.registry import registry
    from durable.store import connect

    ran.clear()
    started = [0]
    daemon = Daemon(_settings(concurrency, keep, vacuum), registry, dsn, pool_size=4)
    daemon.retention_interval = prune_interval if prune_interval is not None else keep / 3
    samples: list[Sample] = []
    conn = await connect(dsn)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            t0 = time.monotonic()
            last = {"claimed": 0.0, "blocks": 0.0, "at": t0}
            last["blocks"] = float((await conn.fetchrow(COUNTS))["ready_blocks"])  # type: ignore[index]
            producing = anyio.Event()

            async def produce() -> None:
                try:
                    await _produce(dsn, rate, seconds, started)
                finally:
                    producing.set()

            tg.start_soon(produce)
            while not producing.is_set():
                with anyio.move_on_after(every):
                    await producing.wait()
                if time.monotonic() - last["at"] >= min(1.0, every):
                    samples.append(await _sample(conn, daemon, t0, last))
            # The backlog drains: every start has run once `ran` holds them all.
            while True:
                if len(ran) >= started[0]:
                    break
                await anyio.sleep(0.1)
            daemon.stop()
    finally:
        await conn.close()
    return samples, started[0]


def figures(samples: list[Sample], rate: float, seconds: float, keep: float) -> dict[str, Any]:
    """The run's summary: each size at the first sample after the history reached its
    steady state (two retention periods in) and at the end, and their ratio."""
    settled = [s for s in samples if s.at >= 2 * keep] or samples[-1:]
    first, end = settled[0], samples[-1]
    out: dict[str, Any] = {"rate_per_s": rate, "seconds": seconds, "retention_s": keep,
                           "samples": len(samples)}
    for name in sorted(end.sizes):
        out[f"{name}_kb"] = f"{first.sizes.get(name, 0) // 1024}->{end.sizes[name] // 1024}"
    total0 = sum(first.sizes.values())
    total1 = sum(end.sizes.values())
    out["total_growth"] = round(total1 / total0, 2) if total0 else None
    per_claim = [s.ready_blocks_per_claim for s in settled if s.ready_blocks_per_claim]
    if per_claim:
        out["ready_blocks_per_claim"] = f"{per_claim[0]}->{per_claim[-1]}"
    return out


def series(samples: list[Sample]) -> list[str]:
    """One line per sample, for the text report."""
    lines = ["      t  tasks  queued    dead  claims/s  blocks/claim  pruned  tasks_kb"
             "  events_kb  indexes_kb"]
    for s in samples:
        tasks_kb = s.sizes.get("tasks", 0) // 1024
        events_kb = s.sizes.get("events", 0) // 1024
        idx_kb = sum(v for k, v in s.sizes.items() if k not in ("tasks", "events")) // 1024
        lines.append(
            f"{s.at:>7} {s.tasks:>6} {s.queued:>7} {s.dead:>7} {s.claims_per_s:>9}"
            f" {s.ready_blocks_per_claim if s.ready_blocks_per_claim is not None else '-':>13}"
            f" {s.pruned:>7} {tasks_kb:>9} {events_kb:>10} {idx_kb:>11}"
        )
    return lines


async def run(
    server: str, rate: float, seconds: float, keep: float, every: float, concurrency: int,
    vacuum: str, scratch_database: Any,
) -> tuple[str, dict[str, Any], bool, list[str]]:
    """Ingest and drain at a steady rate under a short DURABLE_RETENTION in a scratch
    database of ``server``, sampling the tables' and indexes' sizes and the claims:
    (workload, figures, verified, notes) for the bench's Result."""
    async with scratch_database(server) as dsn:
        samples, started = await measure(
            dsn, rate=rate, seconds=seconds, keep=keep, every=every, concurrency=concurrency,
            vacuum=vacuum,
        )
    return "retention", figures(samples, rate, seconds, keep), len(ran) == started, series(samples)

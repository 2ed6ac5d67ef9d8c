"""`durable bench`: throughput, latency, workflows, backlog and scale, measured end to end.

Each workload runs in a database of its own (created and dropped on the target server),
checks its own count (exactly N distinct tasks ran and the database agrees), and reports
a table or, with ``--json``, one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import anyio

import durable
from durable.settings import Settings
from durable.tools.bench_app import QUEUE, latencies, noop, probe, ran, step_sleep, steps


@dataclass
class Result:
    workload: str
    figures: dict[str, Any] = field(default_factory=dict)
    verified: bool = False
    notes: list[str] = field(default_factory=list)


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled and sys.stderr.isatty()
        self.started = time.monotonic()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        frac = min(1.0, done / self.total) if self.total else 1.0
        bar = "#" * int(frac * 30)
        rate = done / max(1e-9, time.monotonic() - self.started)
        sys.stderr.write(f"\r{self.label:<12} [{bar:<30}] {done}/{self.total} {rate:,.0f}/s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


def _database_url(server: str, name: str) -> str:
    parts = urlsplit(server)
    return urlunsplit(parts._replace(path="/" + quote(name, safe="")))


@asynccontextmanager
async def scratch_database(server: str) -> AsyncIterator[str]:
    """A fresh, migrated database on ``server``, dropped afterwards."""
    from durable.store import create_database, drop_database, migrate

    name = f"durable_bench_{secrets.token_hex(4)}"
    await create_database(server, name)
    url = _database_url(server, name)
    try:
        await migrate(url)
        yield url
    finally:
        await drop_database(server, name)


def _settings(concurrency: int) -> Settings:
    return Settings.from_env(
        {}, queues=f"{QUEUE}={concurrency}", poll_interval="1", lease="30", log_level="warning"
    )


async def _count_finished(dsn: str) -> int:
    from durable.store import connect

    conn = await connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "select count(*) from durable.tasks where queue = $1 and status = 'completed'",
                QUEUE,
            )
        )
    finally:
        await conn.close()


async def _wait_finished(dsn: str, n: int, progress: Progress, interval: float = 0.05) -> float:
    """Poll the database until n tasks completed; returns the time it happened."""
    from durable.store import connect

    conn = await connect(dsn)
    try:
        while True:
            done = int(
                await conn.fetchval(
                    "select count(*) from durable.tasks where queue = $1 and status = 'completed'",
                    QUEUE,
                )
            )
            progress.update(done)
            if done >= n:
                return time.monotonic()
            await anyio.sleep(interval)
    finally:
        await conn.close()


async def _wait_committed(daemon: Any, n: int, progress: Progress) -> float:
    """Wait until the in-process daemon has committed n completions; returns the time.

    A completion counts once its statement has committed, so this is the moment the
    database records the n-th task finished, read without querying a table the daemon is
    busy writing (a count(*) every few milliseconds would compete with it). The count is
    checked against the database once the run is over.
    """
    while True:
        done = sum(s.completed for (q, _), s in daemon.metrics.series.items() if q == QUEUE)
        progress.update(done)
        if done >= n:
            return time.monotonic()
        await anyio.sleep(0.005)


@dataclass
class Drain:
    startup: float
    """Seconds from starting the daemon until it serves (pool open and warm, LISTEN live)."""
    elapsed: float
    """Seconds from then until the n-th completion committed."""
    cpu: float
    """CPU seconds this process (the daemon) spent meanwhile, user and system."""


async def _serve(settings: Settings, dsn: str, pool_size: int, n: int, bar: Progress) -> Drain:
    """Serve the bench's queue with ``durable.serve`` and wait for the n-th committed
    completion. The drain is timed from the moment the daemon serves; its startup is
    reported on its own."""
    from durable.registry import registry

    t0 = time.monotonic()
    async with durable.serve(dsn, settings=settings, registry=registry, pool_size=pool_size) as svc:
        t1, c1 = time.monotonic(), time.process_time()
        t2 = await _wait_committed(svc.daemon, n, bar)
        c2 = time.process_time()
    return Drain(t1 - t0, t2 - t1, c2 - c1)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _bulk_enqueue(client: Any, fn: Any, calls: list[list[Any]]) -> float:
    t0 = time.monotonic()
    for i in range(0, len(calls), 5000):
        await client.start_many(fn, calls[i : i + 5000])
    return time.monotonic() - t0


async def throughput(
    server: str, n: int, concurrency: int, progress: bool, queue_limit: int | None = None
) -> Result:

    ran.clear()
    async with scratch_database(server) as dsn:
        async with durable.connect(dsn) as client:
            enqueue_s = await _bulk_enqueue(client, noop, [[i] for i in range(n)])
            if queue_limit is not None:  # a fleet-wide limit, binding or not
                await client.store.set_queue_limits(QUEUE, queue_limit, None, None)
        bar = Progress("throughput", n, progress)
        d = await _serve(_settings(concurrency), dsn, 4, n, bar)
        bar.close()
        db_count = await _count_finished(dsn)
    return Result(
        "throughput",
        {
            "tasks": n,
            "concurrency": concurrency,
            "queue_limit": queue_limit,
            "enqueue_per_s": round(n / enqueue_s),
            "drain_per_s": round(n / d.elapsed),
            "daemon_cpu_us_per_task": round(d.cpu / n * 1e6, 1),
            "startup_ms": round(d.startup * 1000),
            "rss_mb": round(_rss_mb(), 1),
        },
        verified=len(ran) == n and db_count == n,
    )


async def latency(server: str, n: int, rate: float, concurrency: int, progress: bool) -> Result:
    from durable.registry import registry

    ran.clear()
    latencies.clear()
    async with scratch_database(server) as dsn:
        bar = Progress("latency", n, progress)
        async with durable.serve(
            dsn, settings=_settings(concurrency), registry=registry, pool_size=4
        ):
            async with durable.connect(dsn, max_size=2) as client:
                start = time.monotonic()
                for i in range(n):
                    # A fixed schedule, not back-to-back: each enqueue at start + i / rate.
                    await anyio.sleep(max(0.0, start + i / rate - time.monotonic()))
                    await client.start(probe, i, time.time())
                    bar.update(i + 1)
            await _wait_finished(dsn, n, Progress("", n, False))
        bar.close()
        db_count = await _count_finished(dsn)
    return Result(
        "latency", _latency_figures(n, rate, latencies),
        verified=len(ran) == n and db_count == n,
    )


def _latency_figures(n: int, rate: float, seconds: list[float]) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in seconds)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p * len(ms)))], 2)

    return {"tasks": n, "rate_per_s": rate, "p50_ms": pct(0.50), "p95_ms": pct(0.95),
            "p99_ms": pct(0.99), "max_ms": round(ms[-1], 2),
            "mean_ms": round(statistics.mean(ms), 2)}


async def floor(server: str, n: int, rate: float) -> Result:
    """The `latency` schedule on a minimal queue with no guarantees (durable.tools.floor)."""
    from durable.tools import floor as minimal

    async with scratch_database(server) as dsn:
        seconds, done = await minimal.measure(dsn, n, rate)
    return Result(
        "floor", _latency_figures(n, rate, seconds),
        verified=len(seconds) == n and done == n,
        notes=["a minimal queue without leases, tokens, retries or fencing: the floor"
               " that `latency` is measured against"],
    )


async def workflows(
    server: str, n: int, step_count: int, concurrency: int, uneven: bool, progress: bool
) -> Result:

    ran.clear()
    step_sleep[:] = (0.0, 0.002) if uneven else (0.0, 0.0)
    async with scratch_database(server) as dsn:
        async with durable.connect(dsn) as client:
            await _bulk_enqueue(client, steps, [[i, step_count] for i in range(n)])
        bar = Progress("workflows", n, progress)
        d = await _serve(_settings(concurrency), dsn, 6, n, bar)
        bar.close()
        db_count = await _count_finished(dsn)
        from durable.store import connect

        conn = await connect(dsn)
        try:
            events = int(await conn.fetchval("select count(*) from durable.events"))
        finally:
            await conn.close()
    return Result(
        "workflows" + ("-uneven" if uneven else ""),
        {"workflows": n, "steps": step_count, "concurrency": concurrency,
         "workflows_per_s": round(n / d.elapsed), "steps_per_s": round(n * step_count / d.elapsed),
         "daemon_cpu_us_per_workflow": round(d.cpu / n * 1e6, 1),
         "startup_ms": round(d.startup * 1000)},
        verified=len(ran) == n and db_count == n and events == n * step_count,
    )


async def backlog(
    server: str, history: int, queued: int, concurrency: int, progress: bool,
    scheduled: int = 0,
) -> Result:
    """Drain ``queued`` tasks with ``history`` finished ones in the table and, ahead of them
    in claim order, ``scheduled`` ones not due until tomorrow (they stay queued)."""
    from durable.store import connect

    ran.clear()
    async with scratch_database(server) as dsn:
        conn = await connect(dsn)
        try:
            await conn.execute(
                "insert into durable.tasks (queue, name, args, status, finished_at, result)"
                " select $1, 'bench.noop', jsonb_build_array(-g), 'completed', now(), 'null'"
                " from generate_series(1, $2) g",
                QUEUE,
                history,
            )
            await conn.execute(
                "insert into durable.tasks (queue, name, args, run_at)"
                " select $1, 'bench.noop', jsonb_build_array(-g), now() + interval '1 day'"
                " from generate_series(1, $2) g",
                QUEUE,
                scheduled,
            )
            await conn.execute("vacuum analyze durable.tasks")
        finally:
            await conn.close()
        async with durable.connect(dsn) as client:
            await _bulk_enqueue(client, noop, [[i] for i in range(queued)])
        bar = Progress("backlog", queued, progress)
        d = await _serve(_settings(concurrency), dsn, 4, queued, bar)
        bar.close()
        conn = await connect(dsn)
        try:
            counts = await conn.fetchrow(
                "select count(*) filter (where status = 'completed'),"
                "       count(*) filter (where status = 'queued')"
                " from durable.tasks where queue = $1",
                QUEUE,
            )
            assert counts is not None  # an aggregate always returns its row
            db_count, waiting = counts
        finally:
            await conn.close()
    return Result(
        "backlog",
        {"history": history, "queued": queued, **({"scheduled": scheduled} if scheduled else {}),
         "concurrency": concurrency, "drain_per_s": round(queued / d.elapsed),
         "startup_ms": round(d.startup * 1000)},
        verified=len(ran) == queued and db_count == history + queued and waiting == scheduled,
    )


def _daemon(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A `durable run` process serving the bench queue (started at once; not waited on)."""
    return subprocess.Popen(
        [sys.executable, "-m", "durable", "run", "--app", "durable.tools.bench_app"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def drain_once_all_serve(dsn: str, k: int, n: int) -> float | None:
    """Tasks/s from the moment the last of ``k`` daemons made its first claim to the last
    completion, read from the database's own timestamps (no polling interval in it); None
    if fewer than ``k`` daemons claimed anything, or none was left to drain by then."""
    from durable.store import connect

    conn = await connect(dsn)
    try:
        row = await conn.fetchrow(
            "select count(*) as daemons, max(first) as ready from ("
            " select min(started_at) as first from durable.tasks where queue = $1"
            " group by worker_id) f",
            QUEUE,
        )
        assert row is not None
        if row["daemons"] < k:
            return None
        ready = row["ready"]
        end = await conn.fetchrow(
            "select count(*) filter (where finished_at <= $2) as before,"
            " max(finished_at) as last from durable.tasks where queue = $1",
            QUEUE, ready,
        )
        assert end is not None
    finally:
        await conn.close()
    before = int(end["before"])
    seconds = float((end["last"] - ready).total_seconds())
    if before >= n or seconds <= 0:
        return None
    return (n - before) / seconds


async def scale(server: str, n: int, concurrency: int, daemons: list[int], progress: bool) -> Result:
    figures: dict[str, Any] = {"tasks": n, "concurrency": concurrency}
    drains: dict[int, float | None] = {}
    ok = True
    for k in daemons:
        async with scratch_database(server) as dsn:
            async with durable.connect(dsn) as client:
                await _bulk_enqueue(client, noop, [[i] for i in range(n)])
            env = {**os.environ, "DURABLE_DATABASE_URL": dsn, "DURABLE_LOG_LEVEL": "warning",
                   "DURABLE_QUEUES": f"{QUEUE}={concurrency}"}
            bar = Progress(f"scale x{k}", n, progress)
            t0 = time.monotonic()
            procs = [_daemon(env) for _ in range(k)]
            try:
                t1 = await _wait_finished(dsn, n, bar, interval=0.1)
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    await anyio.to_thread.run_sync(p.wait)
            bar.close()
            ok = ok and await _count_finished(dsn) == n
            # Daemons start in parallel with the clock: startup is part of this figure.
            figures[f"daemons_{k}_per_s"] = round(n / (t1 - t0))
            drains[k] = await drain_once_all_serve(dsn, k, n)
    if "daemons_1_per_s" in figures and "daemons_2_per_s" in figures:
        figures["ratio_2_to_1"] = round(figures["daemons_2_per_s"] / figures["daemons_1_per_s"], 2)
    # The drain alone, as `throughput` times it: from the moment every daemon serves.
    for k, rate in drains.items():
        figures[f"drain_{k}_per_s"] = None if rate is None else round(rate)
    one, two = drains.get(1), drains.get(2)
    if one and two:
        figures["drain_ratio_2_to_1"] = round(two / one, 2)
    return Result(
        "scale", figures, verified=ok,
        notes=["daemons_K_per_s: from starting K processes (their startup included);"
               " drain_K_per_s: from the last one's first claim to the last completion"],
    )


WORKLOADS = (
    "throughput", "latency", "floor", "workflows", "backlog", "scale", "retention", "entity",
)


def render(results: list[Result], server_version: str) -> str:
    lines = [f"durable bench on PostgreSQL {server_version}"]
    for r in results:
        figures = "  ".join(f"{k}={v}" for k, v in r.figures.items())
        lines.append(f"{r.workload:<18} {figures}  verified={'yes' if r.verified else 'NO'}")
        lines += [f"    {note}" for note in r.notes]
    return "\n".join(lines)


async def run(
    server: str,
    selected: list[str],
    *,
    n: int,
    concurrency: int,
    as_json: bool,
    emit: Callable[[str], None] = print,
    **opts: Any,
) -> int:
    from durable.store import connect

    conn = await connect(server)
    try:
        version = str(await conn.fetchval("show server_version"))
    finally:
        await conn.close()
    progress = not as_json
    results: list[Result] = []
    for w in selected:
        if w == "throughput":
            results.append(
                await throughput(server, n, concurrency, progress, opts.get("queue_limit"))
            )
        elif w == "latency":
            results.append(
                await latency(server, opts["latency_n"], opts["rate"], concurrency, progress)
            )
        elif w == "floor":
            results.append(await floor(server, opts["latency_n"], opts["rate"]))
        elif w == "workflows":
            results.append(
                await workflows(server, opts["workflows_n"], opts["steps"], concurrency,
                                opts["uneven"], progress)
            )
        elif w == "backlog":
            results.append(
                await backlog(server, opts["history"], opts["queued"], concurrency, progress,
                              opts.get("scheduled", 0))
            )
        elif w == "scale":
            results.append(await scale(server, n, concurrency, [1, 2, 4], progress))
        elif w == "retention":
            from durable.tools.retention import run as retention

            name, figures, verified, notes = await retention(
                server, opts["ingest_rate"], opts["duration"], opts["keep"], opts["every"],
                concurrency, opts.get("retention_vacuum", "auto"), scratch_database,
            )  # fmt: skip
            results.append(Result(name, figures, verified=verified, notes=notes))
        elif w == "entity":
            from durable.tools.bench_entity import entity_run

            for warm in (True, False):
                args = (server, opts["entity_events"], warm, scratch_database, Progress, progress)
                results.append(Result(*await entity_run(*args)))
    if as_json:
        emit(json.dumps({"server_version": version,
                         "results": [r.__dict__ for r in results]}, indent=2))
    else:
        emit(render(results, version))
    return 0 if all(r.verified for r in results) else 1

"""Operator tools as commands: `bench`, `soak`, `demo`. Each loads its code from
`durable.tools` only when it runs, so `durable run` never imports a tool."""

from __future__ import annotations

import argparse
from typing import Any

from durable.cli.core import (
    CommandError,
    database_options,
    duration,
    positive_duration,
    run,
    settings,
    target,
    whole,
)

SOAK_DESCRIPTION = (
    "K daemon processes serve the soak's workload against an embedded Postgres in a scratch "
    "home, logging in as a role of their own: one through a TCP proxy, one with its clock an "
    "hour behind (libfaketime). Producers start tasks and workflows, cancel some of it and "
    "send the events the workflows wait for, while a fault schedule kills daemons, restarts "
    "Postgres, cuts connections, refuses logins, freezes a daemon past its lease and writes "
    "bad rows. Then everything is let back up, the work drains, and the invariants are "
    "checked against the database and an audit of every claim. Exit status 1 on any "
    "violation."
)

BENCH_WORKLOADS = [
    "throughput", "latency", "floor", "workflows", "backlog", "scale", "retention", "entity",
]


def add_commands(sub: Any) -> None:
    b = sub.add_parser(
        "bench", help="measure throughput, latency, workflows, backlog, scale and retention",
        description="Runs each workload in a scratch database it creates on the server "
        "and drops afterwards; every run checks its own count.",
    )  # fmt: skip
    database_options(b)
    b.add_argument("workloads", nargs="*", choices=[*BENCH_WORKLOADS, []],
                   help="default: throughput latency workflows; floor runs the latency "
                   "schedule on a minimal queue with no guarantees, for comparison")  # fmt: skip
    b.add_argument("--tasks", type=whole(1), default=20000, help="tasks for throughput and scale")
    b.add_argument("--concurrency", type=whole(1), default=32)
    b.add_argument("--latency-tasks", type=whole(1), default=500, help="latency and floor: tasks")
    b.add_argument("--rate", type=_rate, default=100.0,
                   help="latency and floor: enqueues per second")  # fmt: skip
    b.add_argument("--workflows", type=whole(1), default=2000)
    b.add_argument("--steps", type=whole(1), default=3)
    b.add_argument("--uneven", action="store_true", help="each step sleeps a random 0-2 ms")
    b.add_argument("--history", type=whole(0), default=1_000_000, help="backlog: finished tasks")
    b.add_argument("--queued", type=whole(0), default=100_000, help="backlog: queued tasks")
    b.add_argument("--scheduled", type=whole(0), default=0,
                   help="backlog: tasks scheduled for tomorrow, ahead of the queued ones")  # fmt: skip
    b.add_argument("--queue-limit", type=whole(1), help="throughput: set a fleet-wide "
                   "concurrency limit on the bench queue (e.g. far above --concurrency: not "
                   "binding)")  # fmt: skip
    b.add_argument("--ingest-rate", type=_rate, default=1000.0,
                   help="retention: starts per second (one in ten a two-step workflow)")  # fmt: skip
    b.add_argument("--duration", type=positive_duration, default="5m", help="retention: how long to ingest")
    b.add_argument("--keep", type=positive_duration, default="30s",
                   help="retention: the daemon's DURABLE_RETENTION (it prunes every third of it)")  # fmt: skip
    b.add_argument("--retention-vacuum", choices=["auto", "on", "off"], default="auto",
                   help="retention: the daemon's DURABLE_RETENTION_VACUUM (off: pruning alone)")  # fmt: skip
    b.add_argument("--every", type=positive_duration, default="15s", help="retention: sample interval")
    b.add_argument("--entity-events", type=whole(2), default=2000,
                   help="entity: events in the long-lived workflow's log at the end (one "
                   "wait and one step per event sent), run warm then cold")  # fmt: skip
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "soak", help="run daemons, producers and faults for a while, then check invariants",
        description=SOAK_DESCRIPTION,
    )
    p.add_argument("--duration", type=duration, default="60s",
                   help="how long to produce and inject faults (e.g. 60s, 10m; a short run "
                   "goes on until every fault kind has fired); the drain comes after")  # fmt: skip
    p.add_argument("--daemons", type=whole(3), default=3, help="daemon processes (at least 3: "
                   "one behind the proxy, one with a skewed clock)")  # fmt: skip
    p.add_argument("--lease", type=_lease, default="3s", help="the daemons' DURABLE_LEASE")
    p.add_argument("--rate", type=_soak_rate, default=10.0, help="starts per second")
    p.add_argument("--seed", type=int, help="random seed (printed; the timing is not replayed)")
    p.add_argument("--home", help="embedded server directory (default: a fresh temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the server, data and logs")
    p.add_argument("--drain-timeout", type=duration, default="180s",
                   help="how long the work may take to finish once producing stops")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_soak)

    dm = sub.add_parser("demo", help="see durable work in a few seconds (embedded server)")
    dm.set_defaults(func=cmd_demo)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _soak_rate(text: str) -> float:
    value = _rate(text)
    if value > 1000:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1000, got {text!r}")
    return value


def _lease(text: str) -> float:
    seconds = duration(text)
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"expected a duration of at least 1s, got {text!r}")
    return seconds


def cmd_bench(args: argparse.Namespace) -> int:
    s = settings(args)
    selected = list(args.workloads) or ["throughput", "latency", "workflows"]

    async def main() -> int:
        from durable import logs
        from durable.daemon import tune_gc
        from durable.tools import bench

        logs.configure("warning", "console")
        tune_gc()  # the daemons it runs in this process are tuned as `durable run` is
        where = await target(s)
        if where.url is None:
            raise CommandError("durable bench needs a database URL (it creates scratch databases)")
        return await bench.run(
            where.url, selected, n=args.tasks, concurrency=args.concurrency, as_json=args.json,
            latency_n=args.latency_tasks, rate=args.rate, workflows_n=args.workflows,
            steps=args.steps, uneven=args.uneven, history=args.history, queued=args.queued,
            scheduled=args.scheduled, queue_limit=args.queue_limit,
            ingest_rate=args.ingest_rate, duration=args.duration, keep=args.keep,
            every=args.every, retention_vacuum=args.retention_vacuum,
            entity_events=args.entity_events,
        )  # fmt: skip

    return run(main)


def cmd_soak(args: argparse.Namespace) -> int:
    from pathlib import Path

    from durable.tools import soak
    from durable.tools.soak.faults import faketime_library

    if faketime_library() is None:
        raise CommandError("durable soak runs one daemon with a skewed clock and needs "
                           "libfaketime: install it (Debian/Ubuntu: apt-get install faketime)")  # fmt: skip
    opts = soak.SoakOptions(
        duration=args.duration, daemons=args.daemons, lease=args.lease, rate=args.rate,
        seed=args.seed, home=Path(args.home) if args.home else None, keep=args.keep,
        drain_timeout=args.drain_timeout, progress=not args.quiet,
    )  # fmt: skip

    async def main() -> int:
        from durable import logs

        # Library warnings of this process (its client pool during a restart) as one line.
        logs.configure("error", "console")
        return await soak.run(opts, as_json=args.json)

    return run(main)


def cmd_demo(args: argparse.Namespace) -> int:
    from durable.tools.demo import run_demo

    return run_demo(settings(None))

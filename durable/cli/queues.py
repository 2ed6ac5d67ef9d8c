"""The fleet: queue depths and limits (`queues`, `queues set`), daemons (`workers`) and
the catalog of what they serve (`definitions`)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from durable import validation
from durable.cli.core import (
    CommandError,
    Session,
    database_options,
    emit,
    live_within,
    settings,
    whole,
    with_session,
)
from durable.errors import ConfigurationError
from durable.limits import describe_rate, parse_concurrency, parse_rate
from durable.validation import InvalidValue


def add_commands(sub: Any) -> None:
    q = sub.add_parser(
        "queues",
        help="queue depths, limits and serving daemons; `queues set` sets limits, `queues "
        "pause`/`resume` stop and restart claiming",
        description="`durable queues pause NAME` stops every daemon claiming from the queue "
        "(running tasks finish; tasks started meanwhile wait, queued); `durable queues "
        "resume NAME` lets them claim again at once. Within a queue, higher priorities run "
        "first (`durable start --priority`), then the task due longest.",
    )  # fmt: skip
    database_options(q)
    q.add_argument("action", nargs="?", choices=["list", "set", "pause", "resume"], default="list")
    q.add_argument("name", nargs="?", help="with set, pause, resume: the queue")
    q.add_argument("--concurrency", help="with set: most tasks running at once across all "
                   "daemons, or 'none'")  # fmt: skip
    q.add_argument("--rate", help="with set: most starts per period across all daemons, e.g. "
                   "20/1s, or 'none'")  # fmt: skip
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_queues)

    w = sub.add_parser(
        "workers", help="live, stopped and lost daemons",
        description="A daemon is lost once it has not heartbeaten for DURABLE_LEASE (three "
        "of its heartbeats, which come every third of its lease): give this command the "
        "lease the daemons run with.",
    )  # fmt: skip
    database_options(w)
    w.add_argument("--state", choices=["live", "lost", "stopped"])
    w.add_argument("--limit", type=whole(1), default=50)
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=cmd_workers)

    d = sub.add_parser(
        "definitions", help="the tasks and workflows the daemons publish: queues, options, "
        "versions, serving daemons, unfinished tasks per version",
        description="The catalog that starts by name resolve through. A name stays listed "
        "once published; its daemons are those heard from within DURABLE_LEASE.",
    )  # fmt: skip
    database_options(d)
    d.add_argument("--name", help="this name only")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_definitions)


def cmd_queues(args: argparse.Namespace) -> int:
    if args.action == "set":
        return cmd_queues_set(args)
    if args.action in ("pause", "resume"):
        return cmd_queues_pause(args)
    within = live_within(settings(args))

    async def go(s: Session) -> Any:
        a = s.admin
        return (await a.queue_counts(), await a.workers(1000), await a.queue_limits(),
                await a.unserved(within))  # fmt: skip

    counts, workers, limits, unserved = with_session(args, go)
    now = datetime.now(UTC)
    by_queue: dict[str, dict[str, Any]] = {}

    def entry(queue: str) -> dict[str, Any]:
        return by_queue.setdefault(queue, {"queue": queue, "oldest_ready_s": None})

    for c in counts:
        entry(c.queue)[c.status] = c.count
        if c.oldest_ready is not None:
            entry(c.queue)["oldest_ready_s"] = round((now - c.oldest_ready).total_seconds(), 1)
    for w in workers:
        if w.stopped_at is None and w.silence < within:
            for queue in w.queues:
                entry(queue)["daemons"] = entry(queue).get("daemons", 0) + 1
    for lim in limits:
        entry(lim.name)["limit"] = lim.concurrency
        entry(lim.name)["rate"] = describe_rate(lim.rate_limit, lim.rate_period)
        if lim.paused:
            entry(lim.name)["paused"] = True
    for u in unserved:  # queued names that no live daemon has the code for
        entry(u.queue)["unserved"] = list(u.names)
    rows = sorted(by_queue.values(), key=lambda r: r["queue"])
    emit(args, rows, ["queue", "queued", "running", "waiting", "completed", "failed",
                      "cancelled", "oldest_ready_s", "daemons", "limit", "rate", "paused",
                      "unserved"])  # fmt: skip
    return 0


def cmd_queues_set(args: argparse.Namespace) -> int:
    usage = "usage: durable queues set NAME [--concurrency N] [--rate N/PERIOD]"
    if not args.name:
        raise CommandError(usage, 2)
    try:
        validation.text(args.name, "NAME (the queue)")
        if args.concurrency is None and args.rate is None:
            raise CommandError(f"{usage} (give one of them, or 'none' to remove it)", 2)
        concurrency = parse_concurrency(args.concurrency)
        rate = parse_rate(args.rate)
    except (ConfigurationError, InvalidValue) as exc:
        raise CommandError(str(exc), 2) from None

    async def go(s: Session) -> Any:
        # An option left out keeps that limit: `--rate 20/1s` alone must not lift a
        # concurrency limit set before (only `--concurrency none` does).
        await s.admin.set_queue_limits(
            args.name, concurrency, rate,
            set_concurrency=args.concurrency is not None, set_rate=args.rate is not None,
        )  # fmt: skip
        return next(lim for lim in await s.admin.queue_limits() if lim.name == args.name)

    now = with_session(args, go)
    shown = describe_rate(now.rate_limit, now.rate_period) or "none"
    print(f"queue {args.name}: concurrency {now.concurrency or 'unlimited'}, rate {shown}")
    return 0


def cmd_queues_pause(args: argparse.Namespace) -> int:
    if not args.name:
        raise CommandError(f"usage: durable queues {args.action} NAME", 2)
    try:
        validation.text(args.name, "NAME (the queue)")
    except InvalidValue as exc:
        raise CommandError(str(exc), 2) from None

    async def go(s: Session) -> None:
        if args.action == "pause":
            await s.admin.pause_queue(args.name)
        else:
            await s.admin.resume_queue(args.name)

    with_session(args, go)
    if args.action == "pause":
        print(f"queue {args.name}: paused (no daemon claims from it; running tasks finish)")
    else:
        print(f"queue {args.name}: resumed")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    within = live_within(settings(args))

    async def go(s: Session) -> Any:
        return await s.admin.workers(args.limit)

    rows = []
    for w in with_session(args, go):
        state = "stopped" if w.stopped_at else ("live" if w.silence < within else "lost")
        if args.state and state != args.state:
            continue
        rows.append({
            "id": str(w.id), "host": w.host, "pid": w.pid, "state": state,
            "queues": w.queues, "names": len(w.names), "started_at": w.started_at,
            "heartbeat_s": round(w.silence, 1),
        })  # fmt: skip
    emit(args, rows, ["id", "host", "pid", "state", "queues", "names", "started_at",
                      "heartbeat_s"])  # fmt: skip
    return 0


def cmd_definitions(args: argparse.Namespace) -> int:
    within = live_within(settings(args))

    async def go(s: Session) -> Any:
        return await s.admin.definitions(within)

    rows = [r for r in with_session(args, go) if args.name is None or r["name"] == args.name]
    if getattr(args, "json", False) or not sys.stdout.isatty():
        for row in rows:
            print(json.dumps(row, default=str))
        return 0
    emit(args, table_rows(rows), ["name", "kind", "queue", "version", "served", "daemons",
                                  "in_flight", "problems"])  # fmt: skip
    return 0


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`durable definitions` on a terminal: one short line per name."""
    return [
        {
            "name": r["name"], "kind": r["kind"], "queue": r["queue"],
            "version": r["version"], "served": r["versions"],
            "daemons": [f"{d['host']}:{d['pid']}" for d in r["daemons"]],
            "in_flight": [
                f"{v}: {sum(n.values())}" for v, n in r["tasks"].items() if sum(n.values())
            ],
            "problems": "; ".join(r["problems"]) or None,
        }
        for r in rows
    ]  # fmt: skip

"""Fleet-wide limits as operators write them, and the CLI commands that set them."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from durable import validation
from durable.errors import ConfigurationError
from durable.settings import parse_duration
from durable.validation import MAX_LIMIT, MAX_PERIOD, MIN_PERIOD, PERIOD_FORM, InvalidValue


def parse_concurrency(text: str | None) -> int | None:
    """``--concurrency N``: a whole number >= 1, or ``none`` to remove the limit."""
    if text is None or text.strip().lower() in ("none", "off", "unlimited"):
        return None
    t = text.strip()
    if not t.isdigit() or not 1 <= int(t) <= MAX_LIMIT:
        raise ConfigurationError(
            f"--concurrency: expected a whole number from 1 to {MAX_LIMIT} (or 'none'), got {text!r}"
        )
    return int(t)


def parse_rate(text: str | None) -> tuple[int, float] | None:
    """``--rate N/PERIOD`` such as ``20/1s`` or ``100/1m``; ``none`` removes the limit."""
    if text is None or text.strip().lower() in ("none", "off", "unlimited"):
        return None
    count, sep, period = text.strip().partition("/")
    if not sep or not count.isdigit() or not 1 <= int(count) <= MAX_LIMIT:
        raise ConfigurationError(
            f"--rate: expected N/PERIOD with N a whole number >= 1, e.g. 20/1s or 100/1m, "
            f"got {text!r}"
        )
    try:
        seconds = parse_duration(period)
    except ValueError:
        raise ConfigurationError(
            f"--rate: the period in {text!r} must be a duration such as 1s, 500ms or 1m"
        ) from None
    if not MIN_PERIOD <= seconds <= MAX_PERIOD:
        raise ConfigurationError(f"--rate: the period in {text!r} must be {PERIOD_FORM}")
    return int(count), seconds


def describe_rate(limit: int | None, period: float | None) -> str | None:
    if limit is None or period is None:
        return None
    return f"{limit}/{period:g}s"


def add_commands(sub: Any, db_opt: Any) -> None:
    """`durable schedules ...` (its own command) — `queues set` is wired in cli.py."""
    s = sub.add_parser("schedules", help="cron schedules and their next run")
    db_opt(s)
    s.add_argument("action", nargs="?", choices=["list", "add", "remove"], default="list")
    s.add_argument("name", nargs="?", help="the schedule's name (add, remove)")
    s.add_argument("--task", help="add: the task or workflow to start (default: the name)")
    s.add_argument("--cron", help="add: five-field cron expression, e.g. '*/5 * * * *'")
    s.add_argument("--timezone", default="UTC", help="add: IANA time zone (default UTC)")
    s.add_argument("--args", help="add: JSON array of arguments")
    s.add_argument("--queue", help="add: queue (default: the task's)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_schedules)


def cmd_queues_set(args: argparse.Namespace, with_client: Any) -> int:
    from durable.cli import CommandError

    if not args.name:
        raise CommandError("usage: durable queues set NAME [--concurrency N] [--rate N/PERIOD]", 2)
    try:
        validation.text(args.name, "NAME (the queue)")
        concurrency = parse_concurrency(args.concurrency)
        rate = parse_rate(args.rate)
    except (ConfigurationError, InvalidValue) as exc:
        raise CommandError(str(exc), 2) from None

    async def go(client: Any) -> None:
        await client.store.set_queue_limits(
            args.name, concurrency, rate[0] if rate else None, rate[1] if rate else None
        )

    with_client(args, go)
    shown = describe_rate(*rate) if rate else "none"
    print(f"queue {args.name}: concurrency {concurrency or 'unlimited'}, rate {shown}")
    return 0


def cmd_schedules(args: argparse.Namespace) -> int:
    from durable.cli import CommandError, _emit, _with_client
    from durable.cron import next_run

    if args.action == "add":
        if not args.name or not args.cron:
            raise CommandError("usage: durable schedules add NAME --cron EXPR [--task T]", 2)
        try:
            validation.text(args.name, "NAME (the schedule)")
            validation.text(args.task or args.name, "--task")
            if args.queue is not None:
                validation.text(args.queue, "--queue")
            validation.text(args.cron, "--cron")
            validation.text(args.timezone, "--timezone", limit=100)
            first = next_run(args.cron, args.timezone, datetime.now(UTC))
        except (ConfigurationError, InvalidValue) as exc:
            raise CommandError(str(exc), 2) from None
        try:
            call_args = json.loads(args.args) if args.args else []
        except ValueError as exc:
            raise CommandError(f"--args is not JSON: {exc}", 2) from None
        if not isinstance(call_args, list):
            raise CommandError("--args must be a JSON array", 2)

        async def add(client: Any) -> None:
            await client.store.upsert_schedule(
                args.name,
                args.task or args.name,
                args.cron,
                args.timezone,
                json.dumps(call_args),
                "{}",
                args.queue,
                "cli",
                first,
            )

        _with_client(args, add)
        print(f"schedule {args.name}: next run {first.isoformat()}")
        return 0
    if args.action == "remove":

        async def remove(client: Any) -> bool:
            return bool(await client.store.delete_schedule(args.name))

        if not _with_client(args, remove):
            raise CommandError(f"no schedule named {args.name!r}")
        print(f"schedule {args.name} removed")
        return 0

    async def rows(client: Any) -> Any:
        return await client.store.list_schedules()

    out = [
        {
            "name": r["name"],
            "task": r["task_name"],
            "cron": r["cron"],
            "timezone": r["timezone"],
            "next_run_at": r["next_run_at"],
            "last_run_at": r["last_run_at"],
            "last_task_id": r["last_task_id"],
            "source": r["source"],
        }
        for r in _with_client(args, rows)
    ]
    _emit(
        args,
        out,
        [
            "name",
            "task",
            "cron",
            "timezone",
            "next_run_at",
            "last_run_at",
            "last_task_id",
            "source",
        ],
    )
    return 0

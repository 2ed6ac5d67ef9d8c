"""`durable schedules`: cron schedules, listed, added and removed."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from durable import validation
from durable.catalog import unknown
from durable.cli.core import CommandError, Session, database_options, emit, json_value, with_session
from durable.cron import parse
from durable.errors import ConfigurationError
from durable.validation import InvalidValue

COLUMNS = ["name", "task", "cron", "timezone", "next_run_at", "last_run_at", "last_task_id", "source"]


def add_commands(sub: Any) -> None:
    s = sub.add_parser("schedules", help="cron schedules and their next run")
    database_options(s)
    s.add_argument("action", nargs="?", choices=["list", "add", "remove"], default="list")
    s.add_argument("name", nargs="?", help="the schedule's name (add, remove)")
    s.add_argument("--task", help="add: the task or workflow to start (default: the name)")
    s.add_argument("--cron", help="add: five-field cron expression, e.g. '*/5 * * * *'")
    s.add_argument("--timezone", default="UTC", help="add: IANA time zone (default UTC)")
    s.add_argument("--args", help="add: JSON array of arguments")
    s.add_argument("--queue", help="add: queue (default: the task's)")
    s.add_argument("--allow-unknown", action="store_true",
                   help="add: a task no daemon has published yet (its runs wait for a daemon "
                   "with its code)")  # fmt: skip
    s.add_argument("--override-code", action="store_true",
                   help="add: replace a schedule declared in code (schedule=); daemons keep "
                   "this one until `durable schedules remove NAME`")  # fmt: skip
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_schedules)


def cmd_schedules(args: argparse.Namespace) -> int:
    if args.action == "add":
        return _add(args)
    if args.action == "remove":
        return _remove(args)

    async def rows(s: Session) -> list[dict[str, Any]]:
        return [{c: getattr(info, c) for c in COLUMNS} for info in await s.admin.schedules()]

    emit(args, with_session(args, rows), COLUMNS)
    return 0


def _add(args: argparse.Namespace) -> int:
    if not args.name or not args.cron:
        raise CommandError("usage: durable schedules add NAME --cron EXPR [--task T]", 2)
    try:
        validation.text(args.name, "NAME (the schedule)")
        validation.text(args.task or args.name, "--task")
        if args.queue is not None:
            validation.text(args.queue, "--queue")
        validation.text(args.cron, "--cron")
        validation.text(args.timezone, "--timezone", limit=100)
        cron = parse(args.cron, args.timezone)
    except (ConfigurationError, InvalidValue) as exc:
        raise CommandError(str(exc), 2) from None
    call_args = json_value("--args", args.args) if args.args else []
    if not isinstance(call_args, list):
        raise CommandError("--args must be a JSON array", 2)

    task = args.task or args.name

    async def add(s: Session) -> datetime:
        if (
            args.queue is None
            and not args.allow_unknown
            and await s.client.store.resolve_definition(task) is None
        ):
            # As `durable start`: a typo would otherwise start a task nobody runs, on
            # every tick, in the default queue.
            raise CommandError(str(unknown(task, "pass --queue or --allow-unknown")), 2)
        # On the database's clock, as the scheduler's: this machine's may be off.
        first = cron.next_after(s.client.store.now())
        if not await s.admin.add_schedule(
            args.name, task, args.cron, args.timezone, call_args, args.queue,
            first, replace_code=args.override_code,
        ):  # fmt: skip
            # Every daemon's start would declare the code's back over it.
            raise CommandError(
                f"schedule {args.name!r} is declared in code (schedule= on its task): change "
                "it there, or pass --override-code to replace it until `durable schedules "
                f"remove {args.name}`"
            )
        return first

    first = with_session(args, add)
    print(f"schedule {args.name}: next run {first.isoformat()}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    async def remove(s: Session) -> bool:
        return await s.admin.remove_schedule(args.name)

    if not with_session(args, remove):
        raise CommandError(f"no schedule named {args.name!r}")
    print(f"schedule {args.name} removed")
    return 0

"""Operator commands: `show`, `workers`, `check`, bulk `retry`/`cancel`, and `prune`.

Tables on a terminal and JSON lines with ``--json`` (or off a terminal), like the rest
of the CLI; commands that change many tasks count them first and ask before acting.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from durable.cli import (
    CommandError,
    _act,
    _cell,
    _client,
    _dsn,
    _emit,
    _run,
    _settings,
    _table,
    _with_client,
)
from durable.models import PruneResult
from durable.settings import parse_duration

LIVE_WITHIN = 120.0
"""A daemon heard from within this many seconds is live; silent for longer, lost."""

BATCH = 1000
"""Tasks per statement (and per transaction) of bulk retry, bulk cancel and prune."""

FINISHED = ("completed", "failed", "cancelled")
UNFINISHED = ("queued", "running", "waiting")
RETRYABLE = ("failed", "cancelled")


# -- show, workers, check ----------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    async def go(client: Any) -> Any:
        info = await client.get(args.id)
        branch = args.branch if args.branch is not None else info.branch
        return info, await client.history(args.id, branch), await client.branches(args.id), branch

    info, history, branches, branch = _with_client(args, go)
    if args.json:
        out = {k: getattr(info, k) for k in info.__dataclass_fields__}
        out["branch_shown"] = branch
        out["branches"] = branches
        out["events"] = [{k: getattr(e, k) for k in e.__dataclass_fields__} for e in history]
        print(json.dumps(out, default=str, indent=2))
        return 0
    cancel = "  (cancel requested)" if info.cancel_requested and info.status == "running" else ""
    kwargs = json.dumps(info.kwargs) if info.kwargs else ""
    print(f"task {info.id}  {info.kind} {info.name!r}  queue {info.queue}")
    print(f"status     {info.status}{cancel}")
    print(f"attempt    {info.attempt} of {info.max_attempts}")
    print(f"arguments  {json.dumps(info.args)} {kwargs}".rstrip())
    print(f"created    {_cell(info.created_at)}   started {_cell(info.started_at)}   "
          f"finished {_cell(info.finished_at)}")
    if info.parent_id:
        print(f"parent     {info.parent_id}")
    if info.status == "waiting":
        what = []
        if info.waiting_on:
            what.append(f"children {', '.join(map(str, info.waiting_on))}")
        if info.waiting_event:
            what.append(f"event {info.waiting_event!r}")
        if info.wake_at:
            what.append(f"until {_cell(info.wake_at)}")
        print(f"waiting    {'; '.join(what)}")
    if info.status == "completed":
        print(f"result     {json.dumps(info.result)}")
    if info.error:
        label = "error     " if info.status == "failed" else "last error"
        print(f"{label} {info.error.get('type')}: {info.error.get('message')}")
        if info.error.get("traceback"):
            print("traceback")
            for line in str(info.error["traceback"]).rstrip().splitlines():
                print(f"  {line}")
    if info.kind == "workflow" or history:
        others = [b for b in branches if b != branch]
        extra = f" (other branches: {', '.join(map(str, others))})" if others else ""
        print(f"\nevent log, branch {branch}{extra}")
        print(_table(timeline(info.started_at or info.created_at, history),
                     ["seq", "at", "took", "kind", "name", "attempt", "outcome"]))
    return 0


def timeline(start: datetime, history: Sequence[Any]) -> list[dict[str, Any]]:
    """The event log as rows: when each event began (from ``start``) and how long it took."""
    rows = []
    for e in history:
        outcome = e.status
        if e.kind == "child":
            outcome = f"child {e.child_id}: {e.child_status}"
        elif e.status == "failed" and e.error:
            outcome = f"failed: {e.error.get('type')}: {e.error.get('message')}"
        elif e.kind == "sleep" and e.wake_at:
            outcome = f"until {_cell(e.wake_at)}"
        elif e.status == "completed":
            outcome = f"-> {json.dumps(e.result)}"[:60]
        took = (e.finished_at - e.started_at).total_seconds() if e.finished_at else None
        rows.append({
            "seq": e.seq, "kind": e.kind, "name": e.name, "attempt": e.attempt,
            "at": f"+{_seconds((e.started_at - start).total_seconds())}",
            "took": _seconds(took) if took is not None else "...",
            "outcome": outcome,
        })  # fmt: skip
    return rows


def _seconds(s: float) -> str:
    if s < 1:
        return f"{max(s, 0) * 1000:.1f}ms"
    if s < 120:
        return f"{s:.2f}s"
    return str(timedelta(seconds=round(s)))


def cmd_workers(args: argparse.Namespace) -> int:
    async def go(client: Any) -> Any:
        return await client.store.list_workers(args.limit)

    rows = []
    for w in _with_client(args, go):
        silence = w["silence"].total_seconds()
        state = "stopped" if w["stopped_at"] else ("live" if silence < LIVE_WITHIN else "lost")
        if args.state and state != args.state:
            continue
        rows.append({
            "id": str(w["id"]), "host": w["host"], "pid": w["pid"], "state": state,
            "queues": w["queues"], "names": len(w["names"]), "started_at": w["started_at"],
            "heartbeat_s": round(silence, 1),
        })  # fmt: skip
    _emit(args, rows, ["id", "host", "pid", "state", "queues", "names", "started_at",
                       "heartbeat_s"])
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def main() -> str:
        from durable.store import PINNED_SESSION, connect, latest_version, schema_version

        dsn = settings.database_url
        if dsn is None and not settings.use_libpq_env:
            from durable.embedded import EmbeddedServer

            dsn = EmbeddedServer(settings.home).url()
            if dsn is None:
                raise CommandError("the embedded database is not running")
        with anyio.fail_after(args.timeout):
            conn = await connect(dsn, timeout=args.timeout, server_settings=PINNED_SESSION)
            try:
                version = await schema_version(conn)
            finally:
                await conn.close()
        if version != latest_version():
            raise CommandError(f"schema version {version}, expected {latest_version()}")
        return "ok"

    try:
        print(_run(main))
    except CommandError:
        raise
    except Exception as exc:
        from durable.logs import redact

        raise CommandError(f"unhealthy: {redact(f'{type(exc).__name__}: {exc}')}") from None
    return 0


# -- bulk retry and cancel -----------------------------------------------------------------


def cmd_bulk(args: argparse.Namespace, what: str) -> int:
    """`retry`/`cancel` one task by id, or every task matching the filters."""
    filters = {k: getattr(args, k) for k in ("status", "queue", "name", "since")}
    given = {k: v for k, v in filters.items() if v is not None}
    if args.id is not None:
        if given:
            raise CommandError(f"give a task id or filters ({', '.join(given)}), not both", 2)
        return _act(args, what)
    if not given:
        raise CommandError(
            f"give a task id, or filters (--status, --queue, --name, --since) to {what} "
            "every task that matches", 2,
        )  # fmt: skip
    statuses = [args.status] if args.status else (["failed"] if what == "retry" else UNFINISHED)
    since = _since(args.since)
    settings = _settings(args)
    described = " ".join(f"{k}={v}" for k, v in given.items())

    async def select() -> list[int]:
        async with _client(await _dsn(settings)) as client:
            ids: list[int] = await client.store.select_tasks(
                statuses, queue=args.queue, name=args.name, since=since,
                skip_cancel_requested=what == "cancel",
            )  # fmt: skip
            return ids

    ids = _run(select)
    if not ids:
        done_key = "retried" if what == "retry" else "cancelled"
        _report(args, {"matched": 0, done_key: 0}, f"no task matches {described}")
        return 0
    _confirm(args, f"{what} {len(ids)} task(s) matching {described}")

    async def act() -> tuple[int, int]:
        done = extra = 0
        async with _client(await _dsn(settings)) as client:
            for i in range(0, len(ids), BATCH):
                chunk = ids[i : i + BATCH]
                if what == "retry":
                    done += len(await client.store.retry_many(chunk, statuses))
                else:
                    hit = await client.store.cancel(chunk)
                    mine = set(chunk)
                    done += sum(1 for task_id, _, finished in hit
                                if task_id in mine and not finished)
                    extra += sum(1 for task_id, _, _ in hit if task_id not in mine)
                _progress(f"{what}: {min(i + BATCH, len(ids))}/{len(ids)}")
        return done, extra

    done, children = _run(act)
    _progress(None)
    if what == "retry":
        _report(args, {"matched": len(ids), "retried": done},
                f"retried {done} of {len(ids)} matching task(s)")
    else:
        _report(args, {"matched": len(ids), "cancelled": done, "children_cancelled": children},
                f"cancelled {done} of {len(ids)} matching task(s)"
                + (f" and {children} unfinished child task(s)" if children else ""))
    return 0


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise CommandError(f"--since: {exc}", 2) from None


def _confirm(args: argparse.Namespace, action: str) -> None:
    """Ask before acting on many tasks; ``--yes`` skips; off a terminal, refuse."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CommandError(
            f"refusing to {action} without confirmation (stdin is not a terminal): "
            "pass --yes", 2,
        )  # fmt: skip
    try:
        answer = input(f"{action[0].upper()}{action[1:]}? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandError("aborted; nothing was changed")


def _progress(text: str | None) -> None:
    """A progress line on a terminal's stderr, rewritten in place; None ends it."""
    if not sys.stderr.isatty():
        return
    if text is None:
        sys.stderr.write("\r\033[K")
    else:
        sys.stderr.write(f"\r\033[K{text}")
    sys.stderr.flush()


def _report(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data))
    else:
        print(text)


# -- prune ---------------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        older_than = parse_duration(args.older_than)
    except ValueError as exc:
        raise CommandError(f"--older-than: {exc}", 2) from None
    if older_than <= 0:
        raise CommandError("--older-than must be a positive duration, e.g. 7d", 2)
    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1", 2)
    settings = _settings(args)

    if not args.yes:

        async def count() -> int:
            async with _client(await _dsn(settings)) as client:
                n: int = await client.store.prune_count(older_than)
                return n

        n = _run(count)
        if n:
            _confirm(args, f"delete {n} task(s) that finished more than {args.older_than} "
                           "ago, with their event logs")

    def progress(done: PruneResult) -> None:
        _progress(f"pruned {done.tasks} task(s), {done.events} event(s)")

    async def prune() -> PruneResult | None:
        async with _client(await _dsn(settings)) as client:
            result: PruneResult | None = await client.store.prune(
                older_than, batch=args.batch_size, progress=progress
            )
            return result

    result = _run(prune)
    _progress(None)
    if result is None:
        raise CommandError("another process is pruning now (a daemon with DURABLE_RETENTION?); "
                           "try again later")
    _report(
        args,
        {"tasks": result.tasks, "events": result.events, "signals": result.signals,
         "workers": result.workers},
        f"pruned {result.tasks} task(s), {result.events} event(s), {result.signals} signal(s) "
        f"and {result.workers} stopped daemon(s) older than {args.older_than}",
    )  # fmt: skip
    return 0


# -- parsers -------------------------------------------------------------------------------


def add_commands(sub: Any, db_opt: Any) -> None:
    """Register show, retry, cancel, workers, check and prune on the `durable` parser."""
    sh = sub.add_parser("show", help="a task's status, error and event log (a timeline)")
    db_opt(sh)
    sh.add_argument("id", type=int)
    sh.add_argument("--branch", type=int, help="show this branch of the event log")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_show)

    for what, helptext, statuses, default in (
        ("retry", "run a finished task again keeping its history, or every task matching "
         "filters", RETRYABLE, "failed"),
        ("cancel", "cancel a task and its unfinished children, or every task matching "
         "filters", UNFINISHED, "queued, running and waiting"),
    ):  # fmt: skip
        a = sub.add_parser(
            what, help=helptext,
            description=f"`durable {what} ID` acts on one task. With filters instead of an "
            f"ID it acts on every matching task: it prints how many and asks first (--yes "
            f"skips the question; without a terminal, --yes is required).",
        )  # fmt: skip
        db_opt(a)
        a.add_argument("id", type=int, nargs="?", help="the task (leave out to use filters)")
        a.add_argument("--status", choices=statuses, help=f"filter (default: {default})")
        a.add_argument("--queue", help="filter: this queue only")
        a.add_argument("--name", help="filter: this task or workflow name only")
        a.add_argument("--since", help="filter: created within this long, e.g. 1h")
        a.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        a.add_argument("--json", action="store_true")
        a.set_defaults(func=lambda ns, what=what: cmd_bulk(ns, what))

    w = sub.add_parser("workers", help="live, stopped and lost daemons")
    db_opt(w)
    w.add_argument("--state", choices=["live", "lost", "stopped"])
    w.add_argument("--limit", type=int, default=50)
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=cmd_workers)

    c = sub.add_parser(
        "check", help="health probe: exit 0 if the database answers and the schema is current"
    )
    db_opt(c)
    c.add_argument("--timeout", type=float, default=5.0)
    c.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "prune", help="delete finished tasks older than a cutoff, with their event logs",
        description="Deletes tasks that finished (completed, failed or cancelled) more than "
        "--older-than ago, with their events and signals, in batches that each commit on "
        "their own. A workflow's tree goes only once every task in it has finished: no "
        "queued, running or waiting task is ever deleted, nor any part of a tree that still "
        "has one. DURABLE_RETENTION makes the daemon do this by itself.",
    )  # fmt: skip
    db_opt(p)
    p.add_argument("--older-than", required=True, help="e.g. 7d, 12h, 30m")
    p.add_argument("--batch-size", type=int, default=BATCH, help="tasks per statement")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

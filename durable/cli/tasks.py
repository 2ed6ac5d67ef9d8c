"""Commands on tasks: start, ls, retry, cancel, replay, fork, event (`show` is show.py)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from durable.catalog import unknown
from durable.cli.core import (
    CommandError,
    Session,
    confirm,
    database_options,
    duration,
    duration_text,
    emit,
    json_value,
    live_within,
    progress,
    progress_words,
    read_text,
    report,
    run,
    session,
    settings,
    whole,
    with_session,
)
from durable.errors import UnknownDefinition
from durable.models import STATUSES

BATCH = 1000
"""Tasks per statement (and per transaction) of bulk retry and cancel."""

UNFINISHED = ("queued", "running", "waiting")
RETRYABLE = ("failed", "cancelled")


def add_commands(sub: Any) -> None:
    st = sub.add_parser("start", help="start a task or workflow by name")
    database_options(st)
    st.add_argument("name")
    st.add_argument("args", nargs="?", help="JSON array of arguments (or one JSON value)")
    st.add_argument("--args-file", metavar="PATH", help="read ARGS from this file ('-': stdin), "
                    "for arguments too large for a command line")  # fmt: skip
    st.add_argument("--kwargs", help="JSON object of keyword arguments")
    st.add_argument("--queue")
    st.add_argument("--priority", type=whole(-(2**31), 2**31 - 1),
                    help="higher runs first (default 0); within a priority, the task due "
                    "longest")  # fmt: skip
    st.add_argument("--delay", type=duration, help="start after this long, e.g. 30s")
    st.add_argument("--idempotency-key")
    st.add_argument("--allow-unknown", action="store_true",
                    help="start NAME even though no daemon has published it (it waits for "
                    "a daemon with its code)")  # fmt: skip
    _label_options(st, "label the task with this tag", "label the task: name=text, or "
                   "name:=3 / name:=true for a number or boolean")  # fmt: skip
    st.add_argument("--idempotency", choices=["forever", "active"],
                    help="with --idempotency-key: the key returns its task ever (forever), or "
                    "only while that task is unfinished (active)")  # fmt: skip
    st.add_argument("--deadline", type=duration,
                    help="the whole run must be done within this long, e.g. 1h (else it "
                    "fails with DeadlineExceeded)")  # fmt: skip
    st.add_argument("--debounce", type=duration,
                    help="run this long after the last start of its debounce key; a start "
                    "while one is queued replaces its arguments")  # fmt: skip
    st.add_argument("--debounce-key", help="with --debounce (default: the name)")
    st.add_argument("--max-delay", type=duration,
                    help="with --debounce: never later than this long after the first start")
    st.add_argument("--wait", action="store_true", help="wait for the result and print it")
    st.add_argument("--timeout", type=duration, help="with --wait: give up after this long")
    st.set_defaults(func=cmd_start)

    ls = sub.add_parser("ls", help="list tasks")
    database_options(ls)
    ls.add_argument("--status", choices=list(STATUSES))
    ls.add_argument("--queue")
    ls.add_argument("--name")
    ls.add_argument("--since", type=duration_text, help="created within this long, e.g. 1h")
    ls.add_argument("--limit", type=whole(1), default=50)
    _label_options(ls, "only tasks with this tag", "only tasks with this attribute: "
                   "name=text, or name:=3 / name:=true")  # fmt: skip
    ls.add_argument("--idempotency-key", help="only the task started with this key")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

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
        database_options(a)
        a.add_argument("id", type=int, nargs="?", help="the task (leave out to use filters)")
        a.add_argument("--status", choices=statuses, help=f"filter (default: {default})")
        a.add_argument("--queue", help="filter: this queue only")
        a.add_argument("--name", help="filter: this task or workflow name only")
        a.add_argument("--since", type=duration_text, help="filter: created within this long, e.g. 1h")
        a.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        a.add_argument("--json", action="store_true")
        a.set_defaults(func=cmd_retry if what == "retry" else cmd_cancel)

    r = sub.add_parser("replay", help="run a finished workflow again from nothing, on a new branch")
    database_options(r)
    r.add_argument("id", type=int)
    r.set_defaults(func=cmd_replay)

    f = sub.add_parser("fork", help="run a finished workflow again from position N on a new branch")
    database_options(f)
    f.add_argument("id", type=int)
    f.add_argument("--at", type=whole(0), required=True, help="keep events 0..N-1, re-run from N")
    f.set_defaults(func=cmd_fork)

    e = sub.add_parser("event", help="send an event to a workflow")
    database_options(e)
    e.add_argument("id", type=int)
    e.add_argument("name")
    e.add_argument("payload", nargs="?", help="JSON payload")
    e.add_argument("--idempotency-key", help="deliver once per key and task, however often sent")
    e.set_defaults(func=cmd_event)


def _label_options(p: argparse.ArgumentParser, tag_help: str, attr_help: str) -> None:
    p.add_argument("--tag", action="append", metavar="TAG", help=f"{tag_help} (repeatable)")
    p.add_argument("--attr", action="append", metavar="NAME=VALUE",
                   help=f"{attr_help} (repeatable)")  # fmt: skip


def _labels(args: argparse.Namespace) -> tuple[list[str] | None, dict[str, Any] | None]:
    from durable.validation import attribute_pair, labels

    attrs = dict(attribute_pair(a) for a in args.attr) if args.attr else None
    return labels(args.tag, attrs)


# -- start, ls, event -----------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    if args.args is not None and args.args_file is not None:
        raise CommandError("give ARGS or --args-file, not both", 2)
    if args.args_file is not None:
        call_args = json_value("--args-file", read_text("--args-file", args.args_file))
    else:
        call_args = [] if args.args is None else json_value("ARGS", args.args)
    if not isinstance(call_args, list):
        call_args = [call_args]
    kwargs = {} if args.kwargs is None else json_value("--kwargs", args.kwargs)
    if not isinstance(kwargs, dict):
        raise CommandError("--kwargs must be a JSON object", 2)

    tags, attributes = _labels(args)

    async def go(s: Session) -> None:
        try:
            handle = await s.client.start(
                args.name, *call_args, queue=args.queue, priority=args.priority,
                delay=args.delay, idempotency_key=args.idempotency_key,
                idempotency=args.idempotency, allow_unknown=args.allow_unknown, tags=tags,
                attributes=attributes, deadline=args.deadline, debounce=args.debounce,
                debounce_key=args.debounce_key, max_delay=args.max_delay, **kwargs,
            )  # fmt: skip
        except UnknownDefinition:
            refused = unknown(args.name, "pass --queue or --allow-unknown")
            raise CommandError(str(refused), 2) from None
        print(handle.id, flush=True)
        if args.wait:
            try:
                print(json.dumps(await handle.result(timeout=args.timeout)))
            except TimeoutError:
                status = (await s.client.get(handle.id)).status
                raise CommandError(
                    f"task {handle.id} did not finish within {args.timeout:g}s (it is {status})"
                ) from None

    with_session(args, go)
    return 0


def _since(text: str | None) -> datetime | None:
    return None if text is None else datetime.now(UTC) - timedelta(seconds=duration(text))


def cmd_ls(args: argparse.Namespace) -> int:
    tags, attributes = _labels(args)
    columns = ["id", "queue", "name", "kind", "status", "attempt", "created_at", "finished_at"]
    if tags or attributes or args.idempotency_key is not None:
        from durable.models import TaskFilter

        wanted = TaskFilter(
            statuses=(args.status,) if args.status else None, queue=args.queue,
            name=args.name, since=_since(args.since), idempotency_key=args.idempotency_key,
            tags=tuple(tags) if tags else None, attributes=attributes,
        )  # fmt: skip

        async def search(s: Session) -> list[dict[str, Any]]:
            found = await s.admin.search_tasks(wanted, limit=args.limit)
            return [vars(t) for t in found]

        emit(args, with_session(args, search), [*columns, "tags"])
        return 0

    async def go(s: Session) -> list[dict[str, Any]]:
        found = await s.admin.tasks(
            status=args.status, queue=args.queue, name=args.name, since=_since(args.since),
            limit=args.limit,
        )  # fmt: skip
        rows = [{**vars(t), "progress": progress_words(t.progress)} for t in found]
        if any(t.version is not None and t.status == "queued" for t in found):
            # A versioned task waits for a daemon with its version's code: say so when
            # no live one has it.
            live = await s.admin.live_versions(live_within(settings(args)))
            for row in rows:
                if row["version"] is not None and row["status"] == "queued" and (
                    (row["name"], row["version"]) not in live
                ):
                    row["waiting_for"] = f"a daemon with version {row['version']}"
        return rows

    rows = with_session(args, go)
    columns = ["id", "queue", "name", "kind", "status", "attempt", "created_at", "finished_at"]
    if any(r["version"] is not None for r in rows):
        columns[3:3] = ["version"]
    if any("waiting_for" in r for r in rows):
        columns.append("waiting_for")
    columns.append("progress")
    emit(args, rows, columns)
    return 0


def cmd_event(args: argparse.Namespace) -> int:
    payload = None if args.payload is None else json_value("PAYLOAD", args.payload)

    async def go(s: Session) -> bool:
        return await s.client.send_event(
            args.id, args.name, payload, idempotency_key=args.idempotency_key
        )

    if not with_session(args, go):
        raise CommandError(f"task {args.id} does not exist or has finished; event not sent")
    print(f"event {args.name!r} sent to task {args.id}")
    return 0


# -- retry, cancel, replay, fork -------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    async def go(s: Session) -> int:
        return await s.client.replay(args.id)

    print(f"task {args.id} queued again (replay), branch {with_session(args, go)}")
    return 0


def cmd_fork(args: argparse.Namespace) -> int:
    async def go(s: Session) -> int:
        info = await s.client.get(args.id)
        if info.kind != "workflow":
            raise CommandError(
                f"task {args.id} is a plain task, not a workflow: it has no event log to fork "
                "(`durable retry` runs it again)"
            )
        # The position after the last event (a retry or a fork may leave a gap where it
        # dropped a child to run again), as durable.restart counts it.
        log = await s.client.history(args.id, info.branch)
        events = log[-1].seq + 1 if log else 0
        if args.at > events:
            raise CommandError(
                f"--at {args.at} is past the end of task {args.id}'s event log (branch "
                f"{info.branch} has {events} event(s)): give 0 to {events}", 2,
            )  # fmt: skip
        return await s.client.fork(args.id, args.at)

    print(f"task {args.id} queued again (fork), branch {with_session(args, go)}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    if args.id is None:
        return _bulk(args, "retry")
    _no_filters(args)

    async def go(s: Session) -> int:
        return await s.client.retry(args.id)

    print(f"task {args.id} queued again (retry), branch {with_session(args, go)}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    if args.id is None:
        return _bulk(args, "cancel")
    _no_filters(args)

    async def go(s: Session) -> Any:
        return await s.client.cancel(args.id)

    out = with_session(args, go)
    if out.finished is not None:
        raise CommandError(f"task {args.id} had already finished ({out.finished})")
    if not out:
        raise CommandError(f"task {args.id} does not exist")
    print(f"cancelled {len(out.cancelled)} task(s): {', '.join(map(str, out.cancelled))}")
    return 0


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    filters = {k: getattr(args, k) for k in ("status", "queue", "name", "since")}
    return {k: v for k, v in filters.items() if v is not None}


def _no_filters(args: argparse.Namespace) -> None:
    given = _filters(args)
    if given:
        raise CommandError(f"give a task id or filters ({', '.join(given)}), not both", 2)


def _bulk(args: argparse.Namespace, what: str) -> int:
    """`retry`/`cancel` every task matching the filters, counted and confirmed first."""
    given = _filters(args)
    if not given:
        raise CommandError(
            f"give a task id, or filters (--status, --queue, --name, --since) to {what} "
            "every task that matches", 2,
        )  # fmt: skip
    statuses = [args.status] if args.status else (["failed"] if what == "retry" else UNFINISHED)
    described = " ".join(f"{k}={v}" for k, v in given.items())

    async def select(s: Session) -> list[int]:
        return await s.admin.select(
            statuses, queue=args.queue, name=args.name, since=_since(args.since),
            skip_cancel_requested=what == "cancel",
        )  # fmt: skip

    ids = with_session(args, select)
    if not ids:
        done_key = "retried" if what == "retry" else "cancelled"
        report(args, {"matched": 0, done_key: 0}, f"no task matches {described}")
        return 0
    confirm(args, f"{what} {len(ids)} task(s) matching {described}")

    async def act() -> tuple[int, int]:
        done = extra = 0
        async with session(args) as s:
            for i in range(0, len(ids), BATCH):
                chunk = ids[i : i + BATCH]
                if what == "retry":
                    done += await s.admin.retry_many(chunk, statuses)
                else:
                    cancelled, children = await s.admin.cancel_many(chunk)
                    done += cancelled
                    extra += children
                progress(f"{what}: {min(i + BATCH, len(ids))}/{len(ids)}")
        return done, extra

    done, children = run(act)
    progress(None)
    if what == "retry":
        report(args, {"matched": len(ids), "retried": done},
               f"retried {done} of {len(ids)} matching task(s)")  # fmt: skip
    else:
        report(args, {"matched": len(ids), "cancelled": done, "children_cancelled": children},
               f"cancelled {done} of {len(ids)} matching task(s)"
               + (f" and {children} unfinished child task(s)" if children else ""))  # fmt: skip
    return 0

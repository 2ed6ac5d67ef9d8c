"""`durable show`: a task's status, error, progress and event log, as a timeline."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from durable.cli.core import (
    Session,
    cell,
    database_options,
    progress_words,
    table,
    whole,
    with_session,
)
from durable.models import HistoryEntry

SHOWN = 2000
"""Characters of an argument, result or traceback `show` prints before cutting."""

SHOWN_IDS = 10
"""Ids of the children a waiting workflow waits on that `show` prints before counting."""

SHOWN_EVENTS = 20
"""Events of a long log `show` prints from each end (the first and the latest) before
counting the ones between: a wide fan-out or a long-lived entity logs thousands."""


def add_commands(sub: Any) -> None:
    sh = sub.add_parser("show", help="a task's status, error and event log (a timeline)")
    database_options(sh)
    sh.add_argument("id", type=int)
    sh.add_argument("--branch", type=whole(0), help="show this branch of the event log")
    sh.add_argument("--full", action="store_true",
                    help=f"print arguments, results and tracebacks whole (else cut at {SHOWN} "
                    f"characters), every child waited on (else the first {SHOWN_IDS}) and every event "
                    f"of the log (else the first and the last {SHOWN_EVENTS})")  # fmt: skip
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_show)


def children(ids: Sequence[int], full: bool) -> str:
    """The children a workflow waits on: all of them, or the first SHOWN_IDS and a count
    (a fan-out waits on thousands)."""
    if full or len(ids) <= SHOWN_IDS:
        return f"children {', '.join(map(str, ids))}"
    first = ", ".join(map(str, ids[:SHOWN_IDS]))
    more = len(ids) - SHOWN_IDS
    return f"{len(ids):,} children: {first} and {more:,} more (--full lists all)"


def cut(text: str, full: bool) -> str:
    """``text``, or its first SHOWN characters and how much was left out."""
    if full or len(text) <= SHOWN:
        return text
    return f"{text[:SHOWN]}... ({len(text) - SHOWN:,} more characters; --full prints all)"


def cmd_show(args: argparse.Namespace) -> int:
    async def go(s: Session) -> Any:
        info = await s.client.get(args.id)
        branch = args.branch if args.branch is not None else info.branch
        history = await s.client.history(args.id, branch)
        recorded = await s.admin.recorded(args.id, branch) if args.json else []
        chain = await s.client.chain(args.id)
        progress = await s.admin.progress(args.id)
        return info, history, await s.client.branches(args.id), branch, recorded, chain, progress

    info, history, branches, branch, recorded, (previous, following), progress = with_session(
        args, go
    )
    if args.json:
        from durable.verify import export

        out = {k: getattr(info, k) for k in info.__dataclass_fields__}
        out["continued_from"], out["continued_as"] = previous, following
        out["progress"] = vars(progress) if progress is not None else None
        out["branch_shown"] = branch
        out["branches"] = branches
        out["events"] = [vars(e) for e in history]
        # A workflow's export is also a history `durable verify --file` replays.
        print(json.dumps(export(out, branch, recorded) if info.kind == "workflow" else out,
                         default=str, indent=2))  # fmt: skip
        return 0
    full = args.full
    cancel = "  (cancel requested)" if info.cancel_requested and info.status == "running" else ""
    kwargs = json.dumps(info.kwargs) if info.kwargs else ""
    print(f"task {info.id}  {info.kind} {info.name!r}  queue {info.queue}")
    print(f"status     {info.status}{cancel}")
    print(f"attempt    {info.attempt} of {info.max_attempts}")
    if info.deadline is not None:
        print(f"deadline   {cell(info.deadline)}")
    print(f"arguments  {cut(f'{json.dumps(info.args)} {kwargs}'.rstrip(), full)}")
    print(f"created    {cell(info.created_at)}   started {cell(info.started_at)}   "
          f"finished {cell(info.finished_at)}")  # fmt: skip
    if info.parent_id:
        print(f"parent     {info.parent_id}")
    if previous is not None or following is not None:
        # A chain of runs (ctx.continue_as_new).
        print(f"chain      previous {previous or '-'}   next {following or '-'}")
    if progress is not None:
        print(f"progress   {cut(progress_words(progress) or '', full)}   (at {cell(progress.updated_at)})")
    if info.status == "waiting":
        what = []
        if info.waiting_on:
            what.append(children(info.waiting_on, full))
        if info.waiting_event:
            what.append(f"event {info.waiting_event!r}")
        if info.wake_at:
            what.append(f"until {cell(info.wake_at)}")
        print(f"waiting    {'; '.join(what)}")
    if info.status == "completed":
        print(f"result     {cut(json.dumps(info.result), full)}")
    if info.error:
        label = "error     " if info.status == "failed" else "last error"
        print(f"{label} {info.error.get('type')}: {cut(str(info.error.get('message')), full)}")
        if info.error.get("traceback"):
            print("traceback")
            for line in cut(str(info.error["traceback"]), full).rstrip().splitlines():
                print(f"  {line}")
    if info.kind == "workflow" or history:
        others = [b for b in branches if b != branch]
        extra = f" (other branches: {', '.join(map(str, others))})" if others else ""
        print(f"\nevent log, branch {branch}{extra}")
        rows = timeline(info.started_at or info.created_at, history)
        print(table(rows if full else ends(rows, SHOWN_EVENTS),
                    ["seq", "at", "took", "kind", "name", "attempt", "outcome"]))  # fmt: skip
    return 0


def timeline(start: datetime, history: Sequence[HistoryEntry]) -> list[dict[str, Any]]:
    """The event log as rows: when each event began (from ``start``) and how long it took."""
    rows = []
    for e in history:
        outcome = e.status
        if e.kind == "child":
            outcome = f"child {e.child_id}: {e.child_status}"
        elif e.status == "failed" and e.error:
            tried = f" (try {e.error['try']} of {e.error.get('tries')})" if "try" in e.error else ""
            outcome = f"failed{tried}: {e.error.get('type')}: {e.error.get('message')}"
        elif e.kind == "sleep" and e.wake_at:
            outcome = f"until {cell(e.wake_at)}"
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


def ends(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first and the last ``n`` rows, and one between them counting the rest."""
    if len(rows) <= 2 * n + 1:
        return rows
    skipped = len(rows) - 2 * n
    gap = dict.fromkeys(rows[0], "") | {
        "seq": "...", "outcome": f"{skipped:,} more events (--full prints all)"
    }
    return [*rows[:n], gap, *rows[-n:]]


def _seconds(s: float) -> str:
    if s < 1:
        return f"{max(s, 0) * 1000:.1f}ms"
    if s < 120:
        return f"{s:.2f}s"
    return str(timedelta(seconds=round(s)))

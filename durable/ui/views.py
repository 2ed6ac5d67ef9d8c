"""What the dashboard's pages show, computed without a database: the task list's filter
read from a query string, the timeline's bars, the charts' bars, durations and cuts.
Pure functions over the store's records, unit-tested in tests/unit/test_ui_views.py."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from durable.models import STATUSES, Finished, HistoryEntry, TaskFilter
from durable.validation import InvalidValue, attribute_pair, labels
from durable.values import parse_duration

BUCKETS = 12
"""Five-minute buckets in the last hour's charts (sql/dashboard.sql finished_last_hour)."""
SHORT = 400
"""Characters of an argument, result or traceback shown before "show all"."""
PAGE = 50
"""Rows on a page of the task list."""

_ID = re.compile(r"\d{1,18}")


class FilterError(InvalidValue):
    """A task-list filter that cannot be read; the message names the field."""


def _when(text: str, field: str, now: datetime) -> datetime:
    """`1h` (that long ago) or an ISO date and time (UTC unless it says otherwise)."""
    try:
        return now - timedelta(seconds=parse_duration(text))
    except (ValueError, OverflowError):
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(
            f"{field}: expected a duration ago such as 15m, 1h or 7d, or a date and time "
            f"such as 2026-01-31T12:00, got {text!r}"
        ) from None
    when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    try:
        when.astimezone(UTC)  # as the database will compare it
    except OverflowError:
        raise FilterError(f"{field}: {text!r} is out of the calendar's range in UTC") from None
    return when


def _id(text: str, field: str) -> int:
    if not _ID.fullmatch(text) or int(text) == 0:
        raise FilterError(f"{field}: expected a task id (a whole number from 1), got {text!r}")
    return int(text)


def task_filter(params: Mapping[str, str], now: datetime) -> tuple[TaskFilter, int | None]:
    """The task list's filter and keyset position (`before`: the last id of the page
    before) from its query string; FilterError names the field it cannot read."""
    got = {k: v.strip() for k, v in params.items() if isinstance(v, str) and v.strip()}
    statuses: tuple[str, ...] | None = None
    if "status" in got:
        statuses = tuple(s.strip() for s in got["status"].split(",") if s.strip())
        bad = [s for s in statuses if s not in STATUSES]
        if bad:
            raise FilterError(f"status: expected some of {', '.join(STATUSES)}, got {bad[0]!r}")
    tags: list[str] | None = None
    attributes: dict[str, Any] | None = None
    if "tag" in got:
        tags = [t.strip() for t in got["tag"].split(",") if t.strip()]
    try:
        if "attr" in got:
            attributes = dict(attribute_pair(item, "attr") for item in got["attr"].split())
        tags, attributes = labels(tags, attributes)
    except InvalidValue as exc:
        raise FilterError(str(exc)) from None
    for field in ("queue", "name", "key"):
        if field in got and len(got[field]) > 2000:
            raise FilterError(f"{field}: at most 2000 characters")
        if field in got and "\0" in got[field]:
            raise FilterError(f"{field}: must not contain NUL characters")
    f = TaskFilter(
        statuses=statuses or None,
        queue=got.get("queue"),
        name=got.get("name"),
        since=_when(got["since"], "since", now) if "since" in got else None,
        until=_when(got["until"], "until", now) if "until" in got else None,
        idempotency_key=got.get("key"),
        task_id=_id(got["id"], "id") if "id" in got else None,
        tags=tuple(tags) if tags else None,
        attributes=attributes,
    )
    before = _id(got["before"], "before") if "before" in got else None
    return f, before


def filter_query(params: Mapping[str, str], **changes: str | None) -> str:
    """The query string of the task list with ``changes`` (None drops a key)."""
    from urllib.parse import urlencode

    kept = {k: v for k, v in params.items() if v}
    for key, value in changes.items():
        if value is None:
            kept.pop(key, None)
        else:
            kept[key] = value
    return urlencode(kept)


# -- the timeline -------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """One durable call of a workflow on the timeline: where its bar starts and how wide
    it is, as fractions of the axis, and the outcome that colours it."""

    seq: int
    kind: str
    name: str
    outcome: str
    """ok, failed, pending (running or waiting) or cancelled (a child's)."""
    x: float
    width: float
    started_at: datetime
    ended_at: datetime | None
    child_id: int | None
    label: str


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


MIN_WIDTH = 0.004
"""The narrowest bar, as a fraction of the axis: an instant call stays visible."""


def duration_text(seconds: float) -> str:
    """``seconds`` as people read it: 850ms, 4.2s, 3m 20s, 2h 5m, 3d 4h."""
    if not math.isfinite(seconds):
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60)}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m"
    return f"{int(seconds // 86400)}d {int(seconds % 86400 // 3600)}h"


def _outcome(entry: HistoryEntry) -> str:
    if entry.kind == "child" and entry.child_status == "cancelled":
        return "cancelled"
    return {"completed": "ok", "failed": "failed"}.get(entry.status, "pending")


def timeline(
    entries: Sequence[HistoryEntry], start: datetime, end: datetime | None, now: datetime
) -> tuple[list[Bar], list[Tick]]:
    """Bars for a workflow's event log on an axis from ``start`` (the task's creation) to
    ``end`` (its finish; None while it runs: now), and about five labelled ticks.

    A pending call runs to the axis's end; a sleep or an event wait that has not ended
    shows until its wake time when that is later."""
    last = end or now
    for e in entries:
        for t in (e.finished_at, e.wake_at if e.status == "pending" else None):
            if t is not None and t > last:
                last = t
    span = max((last - start).total_seconds(), 0.001)
    bars = []
    for e in entries:
        ended = e.finished_at
        if e.kind == "sleep" and e.status == "completed" and e.wake_at is not None:
            # A sleep's event is written when it starts; it lasted until its wake time.
            ended = max(ended or e.wake_at, e.wake_at)
        if ended is None and e.status == "pending":
            ended = max(end or now, e.wake_at) if e.wake_at is not None else (end or now)
        begin = (e.started_at - start).total_seconds() / span
        stop = ((ended or e.started_at) - start).total_seconds() / span
        x = min(max(begin, 0.0), 1.0)
        width = max(min(stop, 1.0) - x, MIN_WIDTH)
        taken = (ended - e.started_at).total_seconds() if ended is not None else 0.0
        bars.append(
            Bar(
                seq=e.seq, kind=e.kind, name=e.name, outcome=_outcome(e), x=x,
                width=min(width, 1.0 - x) if x < 1.0 else MIN_WIDTH, started_at=e.started_at,
                ended_at=e.finished_at, child_id=e.child_id,
                label=f"{e.kind} {e.name}: {_outcome(e)}, {duration_text(taken)}",
            )
        )
    ticks = [Tick(i / 4, "+" + duration_text(span * i / 4)) for i in range(5)]
    return bars, ticks


# -- the overview's charts --------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One bar of a small chart: x and height as fractions, and the count it shows."""

    x: float
    height: float
    count: int


@dataclass(frozen=True)
class Chart:
    completed: list[Column]
    failed: list[Column]
    total_completed: int
    total_failed: int


def charts(finished: Sequence[Finished]) -> dict[str, Chart]:
    """Per queue, completions and failures in each five-minute bucket of the last hour,
    oldest first, scaled to the queue's busiest bucket."""
    counts: dict[str, dict[str, list[int]]] = {}
    for f in finished:
        per = counts.setdefault(f.queue, {"completed": [0] * BUCKETS, "failed": [0] * BUCKETS})
        if f.status in per and 0 <= f.bucket < BUCKETS:
            per[f.status][BUCKETS - 1 - f.bucket] += f.count
    out = {}
    for queue, per in counts.items():
        top = max(max(per["completed"]), max(per["failed"]), 1)
        out[queue] = Chart(
            completed=[Column(i / BUCKETS, n / top, n) for i, n in enumerate(per["completed"])],
            failed=[Column(i / BUCKETS, n / top, n) for i, n in enumerate(per["failed"])],
            total_completed=sum(per["completed"]),
            total_failed=sum(per["failed"]),
        )
    return out


# -- values -----------------------------------------------------------------------------------


def shown_json(value: Any) -> str:
    """``value`` as indented JSON for a page."""
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def cut(text: str, limit: int = SHORT) -> tuple[str, bool]:
    """``text``'s first ``limit`` characters, and whether anything was left out."""
    return (text, False) if len(text) <= limit else (text[:limit], True)

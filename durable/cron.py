"""Standard five-field cron expressions, in a time zone (pure functions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from durable.errors import ConfigurationError

_MONTHS = {
    m: i
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
    )
}
_DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_LONGEST = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
"""The most days each month has (February 29 comes every four years, mostly)."""
_SEARCH_YEARS = 41
"""The longest wait between two ticks: Feb 29 on one day of the week (``0 0 29 2 */7``, both
fields then count) comes again within 28 years, 40 across 2100, which has none."""
_SEARCH_DAYS = 366 * _SEARCH_YEARS
_MARGIN = timedelta(hours=3)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)


class CronError(ConfigurationError, ValueError):
    """A cron expression or time zone is malformed."""


def _value(text: str, names: dict[str, int], field: str, expr: str) -> int:
    text = text.lower()
    if text in names:
        return names[text]
    if not (text.isascii() and text.isdigit()):  # int() refuses some str.isdigit() text: "²"
        raise CronError(f"cron {expr!r}: {field} {text!r} is not a number")
    return int(text)


def _parse_field(
    text: str, field: str, lo: int, hi: int, names: dict[str, int], expr: str
) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, _, step_text = part.partition("/")
            if not (step_text.isascii() and step_text.isdigit()) or int(step_text) < 1:
                raise CronError(f"cron {expr!r}: {field} step {step_text!r} must be >= 1")
            step = int(step_text)
        if part == "*":
            start, end = lo, hi
        elif "-" in part:
            a, _, b = part.partition("-")
            start, end = _value(a, names, field, expr), _value(b, names, field, expr)
        else:
            start = _value(part, names, field, expr)
            end = hi if step > 1 else start
        if not (lo <= start <= hi and lo <= end <= hi) or start > end:
            raise CronError(f"cron {expr!r}: {field} {part!r} is outside {lo}-{hi}")
        out.update(range(start, end + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression: ``minute hour day-of-month month day-of-week``."""

    expr: str
    timezone: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool
    any_hour: bool = False
    """``any_*``: the field begins with ``*`` (``*`` or ``*/n``), as Vixie cron reads it."""

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def _day_matches(self, d: datetime) -> bool:
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        # Vixie cron: when both day fields are restricted, either one matching is enough; a
        # field beginning with `*` (`*/2` too) restricts nothing on its own, so both must.
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def _instants(self, wall: datetime) -> tuple[datetime, ...]:
        """The UTC instants of a wall time that is a tick. In the spring's gap, for an hour
        field of ``*`` (or ``*/n``) none (its ticks are the real hours), else the instant
        the clock jumped (a daily 02:30 runs at 03:00 that day, as cron runs the fixed-time
        jobs of a skipped hour after it). In the autumn's repeated hour both passes for
        ``*`` (or ``*/n``), else the first only (a tick at a fixed time runs once a day)."""
        zone = self.zone
        first = wall.replace(tzinfo=zone).astimezone(UTC)
        if first.astimezone(zone).replace(tzinfo=None) != wall:
            return () if self.any_hour else (_jump(wall, zone),)
        if self.any_hour:
            second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
            if second != first:
                return (first, second)
        return (first,)

    def next_after(self, after: datetime) -> datetime:
        """The first tick strictly after ``after`` (an aware datetime), in UTC."""
        if after.tzinfo is None:
            raise ValueError("cron needs an aware datetime")
        # Wall times from a little before: a tick in the repeated hour's second pass has an
        # earlier wall time than ``after``'s first pass (no zone moves its clock by 3h).
        start = after.astimezone(self.zone).replace(tzinfo=None) - _MARGIN
        day = start.replace(hour=0, minute=0, second=0, microsecond=0)
        for _ in range(_SEARCH_DAYS):
            if day.month in self.months and self._day_matches(day):
                best: datetime | None = None
                for hour in sorted(self.hours):
                    if day.replace(hour=hour, minute=59) < start:
                        continue  # the whole hour is before the search starts
                    for minute in sorted(self.minutes):
                        wall = day.replace(hour=hour, minute=minute)
                        if wall < start:
                            continue
                        instants = self._instants(wall)
                        # A later wall time's instants are later than this one's first.
                        if instants and best is not None and instants[0] >= best:
                            return best
                        for instant in instants:
                            if instant > after and (best is None or instant < best):
                                best = instant
                if best is not None:
                    return best
            day += timedelta(days=1)
        raise CronError(f"cron {self.expr!r} has no tick in the next {_SEARCH_YEARS} years")

    def previous_at_or_before(self, when: datetime) -> datetime | None:
        """The last tick at or before ``when``, in UTC (None if none in the search's years)."""
        end = when.astimezone(self.zone).replace(tzinfo=None) + _MARGIN
        day = end.replace(hour=0, minute=0, second=0, microsecond=0)
        for _ in range(_SEARCH_DAYS):
            if day.month in self.months and self._day_matches(day):
                best: datetime | None = None
                for hour in sorted(self.hours, reverse=True):
                    if day.replace(hour=hour, minute=0) > end:
                        continue  # the whole hour is after the search ends
                    for minute in sorted(self.minutes, reverse=True):
                        wall = day.replace(hour=hour, minute=minute)
                        if wall > end:
                            continue
                        instants = self._instants(wall)
                        # An earlier wall time's instants are earlier than this one's last.
                        if instants and best is not None and instants[-1] <= best:
                            return best
                        for instant in instants:
                            if instant <= when and (best is None or instant > best):
                                best = instant
                if best is not None:
                    return best
            day -= timedelta(days=1)
        return None

    def latest_at_or_before(self, when: datetime, since: datetime) -> datetime | None:
        """The last tick in (since, when], or None: the missed tick to run once."""
        tick = self.previous_at_or_before(when)
        return tick if tick is not None and tick > since else None


def _jump(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant the clock jumped over ``wall``, a wall time that does not exist, in UTC."""
    # Read by the later offset, ``wall`` is before the jump; by the earlier, after it.
    # Transitions fall on whole seconds: search them between the two.
    ends = sorted(wall.replace(tzinfo=zone, fold=f).astimezone(UTC) for f in (0, 1))
    offset = ends[1].astimezone(zone).utcoffset()
    lo, hi = math.ceil(ends[0].timestamp()), math.floor(ends[1].timestamp())
    while lo < hi:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).utcoffset() == offset:
            hi = mid
        else:
            lo = mid + 1
    return datetime.fromtimestamp(lo, UTC)


def parse(expr: str, timezone: str = "UTC") -> Cron:
    """Parse ``expr`` (five fields, or @hourly/@daily/...) in ``timezone``."""
    if not isinstance(expr, str) or not expr.strip():
        raise CronError("a cron expression must be a non-empty string")
    text = _ALIASES.get(expr.strip().lower(), expr.strip())
    parts = text.split()
    if len(parts) != 5:
        raise CronError(
            f"cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(parts)}"
        )
    if not isinstance(timezone, str):
        raise CronError(f"a time zone must be a name such as 'Europe/Paris', got {timezone!r}")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise CronError(f"unknown time zone {timezone!r}") from None
    sets = [
        _parse_field(p, f, lo, hi, names, expr)
        for p, (f, lo, hi, names) in zip(parts, _FIELDS, strict=True)
    ]
    weekdays = frozenset(d % 7 for d in sets[4])
    if parts[4].startswith("*") and not any(d <= _LONGEST[m] for m in sets[3] for d in sets[2]):
        # The day of the month must match: a date no month has would never run.
        raise CronError(
            f"cron {expr!r}: day of month {parts[2]!r} never falls in month {parts[3]!r}"
        )
    return Cron(
        expr=expr,
        timezone=timezone,
        minutes=sets[0],
        hours=sets[1],
        days=sets[2],
        months=sets[3],
        weekdays=weekdays,
        any_day=parts[2].startswith("*"),
        any_weekday=parts[4].startswith("*"),
        any_hour=parts[1].startswith("*"),
    )


def next_run(expr: str, timezone: str, after: datetime) -> datetime:
    """The first tick of ``expr`` in ``timezone`` after ``after``."""
    return parse(expr, timezone).next_after(after)

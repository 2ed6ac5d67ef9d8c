"""What a cron expression means where cron users have expectations: the spring DST gap,
the repeated hour of autumn, and Vixie's rule for the two day fields (pure)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from functools import cache
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from durable.cron import Cron, CronError, parse


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def chain(c: Cron, start: datetime, end: datetime) -> list[datetime]:
    """Every tick in (start, end], by next_after."""
    out: list[datetime] = []
    t = c.next_after(start)
    while t <= end:
        out.append(t)
        t = c.next_after(t)
    return out


def local(c: Cron, t: datetime) -> str:
    return t.astimezone(c.zone).strftime("%Y-%m-%d %H:%M %Z")


# -- the spring gap ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, zone, day, jump",
    [
        # 02:00 -> 03:00, at 01:00 UTC.
        ("30 2 * * *", "Europe/Berlin", at(2026, 3, 29), at(2026, 3, 29, 1)),
        ("30 2 * * *", "Europe/Berlin", at(2027, 3, 28), at(2027, 3, 28, 1)),
        ("0 2 * * *", "Europe/Berlin", at(2030, 3, 31), at(2030, 3, 31, 1)),
        # 02:00 EST -> 03:00 EDT, at 07:00 UTC.
        ("30 2 * * *", "America/New_York", at(2026, 3, 8), at(2026, 3, 8, 7)),
        ("59 2 * * *", "America/New_York", at(2027, 3, 14), at(2027, 3, 14, 7)),
        ("30 2 * * *", "America/New_York", at(2029, 3, 11), at(2029, 3, 11, 7)),
        # Havana skips midnight: 00:00 CST -> 01:00 CDT, at 05:00 UTC.
        ("0 0 * * *", "America/Havana", at(2026, 3, 8), at(2026, 3, 8, 5)),
        ("30 0 * * *", "America/Havana", at(2028, 3, 12), at(2028, 3, 12, 5)),
        # Santiago skips midnight too, in September: 00:00 -04 -> 01:00 -03, at 04:00 UTC.
        ("0 0 * * *", "America/Santiago", at(2026, 9, 6), at(2026, 9, 6, 4)),
        # Lord Howe moves by half an hour: 02:00 -> 02:30 +11, at 15:30 UTC the day before.
        ("15 2 * * *", "Australia/Lord_Howe", at(2026, 10, 3), at(2026, 10, 3, 15, 30)),
        ("0 2 * * *", "Australia/Lord_Howe", at(2027, 10, 2), at(2027, 10, 2, 15, 30)),
        # Troll moves by two hours: 01:00 +00 -> 03:00 +02.
        ("30 2 * * *", "Antarctica/Troll", at(2026, 3, 29), at(2026, 3, 29, 1)),
        # Chatham: 02:45 -> 03:45 +13:45.
        ("0 3 * * *", "Pacific/Chatham", at(2026, 9, 26), at(2026, 9, 26, 14)),
    ],
)
def test_a_fixed_time_the_spring_gap_skips_runs_once_when_the_clock_jumps(
    expr: str, zone: str, day: datetime, jump: datetime
) -> None:
    c = parse(expr, zone)
    ticks = chain(c, day - timedelta(days=2), day + timedelta(days=2))
    # One tick a day; on the day of the change, the instant the clock jumped.
    assert jump in ticks, [local(c, t) for t in ticks]
    assert len(ticks) >= 4 and all(b - a >= timedelta(hours=22) for a, b in pairwise(ticks))
    # Read back by the catch-up's search: the same tick, not the day before's.
    assert c.previous_at_or_before(jump) == jump
    assert c.previous_at_or_before(jump + timedelta(hours=5)) == jump
    assert c.latest_at_or_before(jump + timedelta(minutes=1), jump - timedelta(hours=1)) == jump
    assert c.next_after(jump - timedelta(microseconds=1)) == jump


def test_the_jumped_tick_runs_once_even_where_it_is_a_tick_of_its_own() -> None:
    c = parse("0 2,3 * * *", "America/New_York")
    ticks = chain(c, at(2027, 3, 13, 12), at(2027, 3, 15, 12))
    assert [local(c, t) for t in ticks] == [
        "2027-03-14 03:00 EDT", "2027-03-15 02:00 EDT", "2027-03-15 03:00 EDT"
    ]
    c = parse("*/15 2 * * *", "Europe/Berlin")  # four a day; the missing hour's once
    ticks = chain(c, at(2027, 3, 27, 12), at(2027, 3, 28, 12))
    assert [local(c, t) for t in ticks] == ["2027-03-28 03:00 CEST"]
    assert c.previous_at_or_before(at(2027, 3, 28, 1, 10)) == at(2027, 3, 28, 1)


@pytest.mark.parametrize(
    "expr, zone, start, end, step",
    [
        # Every minute: 01:59 EST then 03:00 EDT, one real minute later.
        ("* * * * *", "America/New_York", at(2027, 3, 14, 6, 50), at(2027, 3, 14, 7, 10), 1),
        ("* * * * *", "America/Havana", at(2026, 3, 8, 4, 50), at(2026, 3, 8, 5, 10), 1),
        ("* * * * *", "Australia/Lord_Howe", at(2026, 10, 3, 15, 20), at(2026, 10, 3, 15, 40), 1),
        ("0 * * * *", "Europe/Berlin", at(2027, 3, 27, 20), at(2027, 3, 28, 6), 60),
        ("*/15 * * * *", "Australia/Lord_Howe", at(2026, 10, 3, 14), at(2026, 10, 3, 17), 15),
    ],
)
def test_wildcard_hours_tick_every_real_interval_across_the_gap(
    expr: str, zone: str, start: datetime, end: datetime, step: int
) -> None:
    c = parse(expr, zone)
    ticks = chain(c, start, end)
    assert {b - a for a, b in pairwise(ticks)} == {timedelta(minutes=step)}, [
        local(c, t) for t in ticks
    ]


def test_a_stepped_hour_has_nothing_to_make_up() -> None:
    c = parse("0 */2 * * *", "America/New_York")  # 02:00 does not exist that day
    ticks = chain(c, at(2027, 3, 14, 4), at(2027, 3, 14, 10))
    assert [local(c, t) for t in ticks] == [
        "2027-03-14 00:00 EST", "2027-03-14 04:00 EDT", "2027-03-14 06:00 EDT"
    ]


# -- the repeated hour ---------------------------------------------------------------


@pytest.mark.parametrize(
    "zone, day, repeated",
    [
        ("America/New_York", date(2026, 11, 1), 1),
        ("America/New_York", date(2028, 11, 5), 1),
        ("Europe/Berlin", date(2027, 10, 31), 2),
        ("America/Havana", date(2026, 11, 1), 0),
        ("America/Santiago", date(2026, 4, 4), 23),
        ("Australia/Lord_Howe", date(2027, 4, 4), 1),  # 01:30-01:59, half an hour
    ],
)
def test_the_repeated_hour_runs_a_fixed_time_once_and_wildcards_every_real_hour(
    zone: str, day: date, repeated: int
) -> None:
    start = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(zone)) - timedelta(days=1)
    end = start + timedelta(days=3)
    fixed = parse(f"45 {repeated} * * *", zone)
    ticks = chain(fixed, start, end)
    assert len(ticks) == 3, [local(fixed, t) for t in ticks]
    assert all(b - a >= timedelta(hours=23) for a, b in pairwise(ticks))
    hourly = parse("45 * * * *", zone)
    ticks = chain(hourly, start, end)
    assert {b - a for a, b in pairwise(ticks)} <= {timedelta(hours=1), timedelta(minutes=30)}
    walls = [t.astimezone(ZoneInfo(zone)).replace(tzinfo=None) for t in ticks]
    assert len(walls) - len(set(walls)) == 1  # the repeated :45, in both passes


# -- every zone and year against a minute-by-minute walk ------------------------------


def walk(c: Cron, start: datetime, end: datetime) -> list[datetime]:
    """The ticks by the rule, read off every real minute in (start, end]: a matching wall
    time ticks (in a repeated hour, the first pass only unless the hour field is `*`); a
    fixed hour's matching wall times the clock jumped over tick once, at the jump."""
    zone = c.zone
    out: list[datetime] = []
    t = start.replace(second=0, microsecond=0)
    wall = t.astimezone(zone)
    while t < end:
        t += timedelta(minutes=1)
        prev, wall = wall, t.astimezone(zone)
        skipped = prev.replace(tzinfo=None) + timedelta(minutes=1)
        jumped = False
        while skipped < wall.replace(tzinfo=None):
            jumped = jumped or (not c.any_hour and matches(c, skipped))
            skipped += timedelta(minutes=1)
        here = matches(c, wall.replace(tzinfo=None)) and (c.any_hour or wall.fold == 0)
        if jumped or here:
            out.append(t)
    return out


def matches(c: Cron, wall: datetime) -> bool:
    return (
        wall.minute in c.minutes
        and wall.hour in c.hours
        and wall.month in c.months
        and vixie_day(c.expr, wall.date())
    )


@cache
def parsed(expr: str) -> Cron:
    return parse(expr)


def vixie_day(expr: str, d: date) -> bool:
    """Vixie cron's day test, from the expression's text."""
    _, _, dom_text, _, dow_text = expr.split()
    c = parsed(expr)
    dom, dow = d.day in c.days, (d.isoweekday() % 7) in c.weekdays
    if dom_text.startswith("*") or dow_text.startswith("*"):
        return dom and dow
    return dom or dow


SWEEP = ["30 2 * * *", "0 0 * * *", "* 2 * * *", "*/20 * * * *", "15 1-3 * * *", "0 */3 * * *"]
ZONES = [
    "Europe/Berlin", "America/New_York", "America/Havana", "America/Santiago",
    "Australia/Lord_Howe", "Antarctica/Troll", "Pacific/Chatham",
]  # fmt: skip


def transitions(zone: str, year: int) -> list[datetime]:
    z = ZoneInfo(zone)
    t, out = at(year, 1, 1), []
    offset = t.astimezone(z).utcoffset()
    while t.year == year:
        t += timedelta(minutes=30)
        if t.astimezone(z).utcoffset() != offset:
            offset = t.astimezone(z).utcoffset()
            out.append(t)
    return out


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("year", [2026, 2028, 2031])
def test_ticks_across_each_change_are_those_of_a_minute_by_minute_walk(
    zone: str, year: int
) -> None:
    changes = transitions(zone, year)
    assert len(changes) == 2, (zone, year, changes)
    for change in changes:
        start, end = change - timedelta(hours=8), change + timedelta(hours=8)
        for expr in SWEEP:
            c = parse(expr, zone)
            expected = walk(c, start, end)
            assert chain(c, start, end) == expected, (expr, [local(c, t) for t in expected])
            for a, b in pairwise(expected):
                assert c.previous_at_or_before(b - timedelta(microseconds=1)) == a
                assert c.latest_at_or_before(b, a) == b


# -- the day fields -------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, first_days",
    [
        # Both restricted: either. June 2026: Monday the 1st, then Mondays, then July 1st.
        ("0 0 1 * 1", ["06-01", "06-08", "06-15", "06-22", "06-29", "07-01", "07-06"]),
        # A day of the month `*/2` restricts nothing alone: odd-dated Mondays.
        ("0 0 */2 * 1", ["06-01", "06-15", "06-29", "07-13", "07-27", "08-03", "08-17"]),
        # A day of the week `*/2` (Sun, Tue, Thu, Sat) likewise: 1sts on those days.
        ("0 0 1 * */2", ["08-01", "09-01", "10-01", "11-01", "12-01", "04-01", "05-01"]),
        ("0 0 * * 1", ["06-01", "06-08", "06-15", "06-22", "06-29", "07-06", "07-13"]),
        ("0 0 * * *", ["06-01", "06-02", "06-03", "06-04", "06-05", "06-06", "06-07"]),
        # 1, 11, 21, 31 that fall on Sunday, Wednesday or Saturday.
        ("0 0 */10 * */3", ["06-21", "07-01", "07-11", "08-01", "10-11", "10-21", "10-31"]),
    ],
)
def test_the_day_fields_follow_vixie_cron(expr: str, first_days: list[str]) -> None:
    c = parse(expr)
    ticks = chain(c, at(2026, 5, 31, 12), at(2027, 12, 31))
    assert [t.strftime("%m-%d") for t in ticks[:7]] == first_days
    # Every day of the years after, against Vixie's test.
    days = [at(2026, 6, 1) + timedelta(days=i) for i in range(366 * 2)]
    assert ticks == [d for d in days if d <= at(2027, 12, 31) and vixie_day(expr, d.date())]


def test_rare_ticks_both_day_fields_must_match_are_found() -> None:
    # Feb 29 on a Sunday: 28 years apart, 40 across 2100 (no Feb 29).
    c = parse("0 0 29 2 */7")
    assert c.next_after(at(2026, 1, 1)) == at(2032, 2, 29)
    assert c.next_after(at(2032, 3, 1)) == at(2060, 2, 29)
    assert c.next_after(at(2088, 3, 1)) == at(2128, 2, 29)
    assert c.previous_at_or_before(at(2128, 2, 28)) == at(2088, 2, 29)


@pytest.mark.parametrize("expr", ["0 0 30 2 */2", "0 0 31 4 */1", "0 0 30 2 *"])
def test_a_date_no_month_has_is_refused_when_the_day_of_the_week_does_not_help(
    expr: str,
) -> None:
    with pytest.raises(CronError, match="never falls"):
        parse(expr)
    assert parse(expr.rsplit(" ", 1)[0] + " mon").next_after(at(2026, 1, 1)) > at(2026, 1, 1)

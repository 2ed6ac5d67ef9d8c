"""Cron expressions and key/limit validation (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

import durable
from durable.cron import CronError, parse
from durable.errors import ConfigurationError
from durable.limits import parse_concurrency, parse_rate
from durable.registry import Definition


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_every_fifteen_minutes_on_weekdays_in_paris() -> None:
    c = parse("*/15 9-17 * * mon-fri", "Europe/Paris")
    assert c.next_after(at(2026, 11, 22, 3)) == at(2026, 11, 23, 8, 0)  # Monday 09:00 CET
    assert c.next_after(at(2026, 11, 23, 8, 0)) == at(2026, 11, 23, 8, 15)
    assert c.next_after(at(2026, 11, 23, 16, 45)) == at(2026, 11, 24, 8, 0)


def test_day_fields_either_matches_and_names() -> None:
    c = parse("0 12 1 * sun")
    # 2026-11-01 is a Sunday and the 1st; the next match is Sunday 2026-11-08.
    assert c.next_after(at(2026, 11, 1, 12)) == at(2026, 11, 8, 12)
    assert parse("0 0 29 feb *").next_after(at(2026, 1, 1)) == at(2028, 2, 29)
    assert parse("@hourly").next_after(at(2026, 1, 1, 0, 30)) == at(2026, 1, 1, 1)
    assert parse("0 0 * * 7").next_after(at(2026, 11, 21)) == at(2026, 11, 22)  # 7 is Sunday


def test_dst_gap_runs_once_when_the_clock_jumps() -> None:
    c = parse("30 2 * * *", "Europe/Paris")
    # 2027-03-28 02:30 does not exist in Paris: that day's run is at 03:00 CEST, when the
    # clock jumped, and the next day's at 02:30 again.
    assert c.next_after(at(2027, 3, 27, 12)) == at(2027, 3, 28, 1)
    assert c.next_after(at(2027, 3, 28, 1)) == at(2027, 3, 29, 0, 30)


def test_latest_missed_tick() -> None:
    c = parse("* * * * *")
    assert c.latest_at_or_before(at(2026, 1, 1, 0, 10, 30), at(2026, 1, 1)) == at(2026, 1, 1, 0, 10)
    assert c.latest_at_or_before(at(2026, 1, 1, 0, 0, 30), at(2026, 1, 1)) is None
    assert parse("0 3 * * *").latest_at_or_before(at(2026, 1, 1), at(2025, 1, 1)) == at(
        2025, 12, 31, 3
    )


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "* * * *",
        "* * * * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "*/0 * * * *",
        "5-1 * * * *",
        "a * * * *",
        "* * * * funday",
    ],
)
def test_malformed_expressions(expr: str) -> None:
    with pytest.raises(CronError):
        parse(expr)


def test_unknown_time_zone() -> None:
    with pytest.raises(CronError, match="time zone"):
        parse("* * * * *", "Nowhere/Special")


def test_limits_parse() -> None:
    assert parse_concurrency("3") == 3
    assert parse_concurrency("none") is None
    assert parse_rate("20/1s") == (20, 1.0)
    assert parse_rate("100/1m") == (100, 60.0)
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(ConfigurationError):
            parse_concurrency(bad)
    for bad in ("20", "0/1s", "20/0s", "20/x", "-1/1s"):
        with pytest.raises(ConfigurationError):
            parse_rate(bad)


def test_definition_key_options_are_validated() -> None:
    async def fn(customer: str) -> None:
        return None

    with pytest.raises(ConfigurationError, match="need a concurrency_key"):
        durable.registry._validated(Definition(name="k1", fn=fn, key_limit=1))
    with pytest.raises(ConfigurationError, match="key_limit must be"):
        durable.registry._validated(
            Definition(name="k2", fn=fn, concurrency_key=lambda c: c, key_limit=0)
        )
    with pytest.raises(CronError):
        durable.registry._validated(Definition(name="k3", fn=fn, schedule="* * *"))
    d: Definition[..., None] = Definition(
        name="k4", fn=fn, concurrency_key=lambda customer: customer.upper()
    )
    assert d.key_for(["acme"], {}) == "ACME"
    with pytest.raises(ConfigurationError, match="concurrency_key failed"):
        d.key_for([], {})

"""What durable accepts as names, limits and periods, checked where a value comes in.

The command line, the client, the store's writes of queues and schedules and the SQL
functions hold the same bounds, so a value that would crash a daemon later (a 201-character
queue, a rate period past the end of time) is refused at once, in one line that names the
field and the allowed form.
"""

from __future__ import annotations

import math
from typing import Final

from durable.errors import DurableError

MAX_NAME: Final = 200
"""Longest task, queue, schedule and event name, in characters (as durable.label holds)."""

MAX_LIMIT: Final = 1_000_000
"""Largest fleet-wide concurrency or rate limit."""

MIN_PERIOD: Final = 0.001
MAX_PERIOD: Final = 365 * 86400.0
"""Bounds of a rate limit's period, in seconds: past a year, `now() - period` leaves the
range of a timestamp in the claim."""

PERIOD_FORM: Final = "a duration from 1ms to 365d"


class InvalidValue(DurableError, ValueError):
    """A value given to durable is outside what it accepts; the message names the field
    and the form it must take."""


def shown(value: object) -> str:
    """`value` for an error message: on one line, and short whatever it holds."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def text(value: object, field: str, *, limit: int | None = MAX_NAME) -> str:
    """`value` if it is text Postgres can store (no NUL, no lone surrogate) of 1 to
    `limit` characters."""
    if not isinstance(value, str) or not value or (limit is not None and len(value) > limit):
        size = f"1 to {limit}" if limit is not None else "at least 1"
        got = f"{len(value)} characters" if isinstance(value, str) and value else shown(value)
        raise InvalidValue(f"{field} must be a string of {size} characters, got {got}")
    if "\0" in value:
        raise InvalidValue(f"{field} must not contain NUL characters (Postgres text cannot hold them)")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidValue(f"{field} must be valid Unicode: it holds a lone surrogate") from None
    return value


def whole(value: object, field: str, low: int, high: int) -> int:
    """`value` if it is an int (not a bool) from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidValue(f"{field} must be a whole number from {low} to {high}, got {shown(value)}")
    return value


def period(value: object, field: str) -> float:
    """`value` as seconds if it is a finite number from MIN_PERIOD to MAX_PERIOD."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not MIN_PERIOD <= value <= MAX_PERIOD
    ):
        raise InvalidValue(f"{field} must be {PERIOD_FORM} (in seconds), got {shown(value)}")
    return float(value)


def queue_limits(
    queue: object, concurrency: object, rate_limit: object, rate_period: object
) -> None:
    """The arguments of a queue's fleet-wide limits (`durable queues set`)."""
    text(queue, "queue")
    if concurrency is not None:
        whole(concurrency, "concurrency", 1, MAX_LIMIT)
    if (rate_limit is None) != (rate_period is None):
        raise InvalidValue("rate: give a limit and its period together, or neither")
    if rate_limit is not None:
        whole(rate_limit, "rate", 1, MAX_LIMIT)
        period(rate_period, "rate period")


def schedule(
    name: object, task_name: object, cron: object, timezone: object, queue: object
) -> None:
    """A cron schedule's fields; the expression and time zone as the scheduler reads them."""
    from durable.cron import CronError, parse

    text(name, "schedule name")
    text(task_name, "task name")
    if queue is not None:
        text(queue, "queue")
    text(cron, "cron", limit=MAX_NAME)
    text(timezone, "timezone", limit=100)
    try:
        parse(str(cron), str(timezone))
    except CronError as exc:
        raise InvalidValue(str(exc)) from None


MAX_TAGS: Final = 20
MAX_TAG: Final = 100
MAX_ATTRIBUTES: Final = 20
MAX_ATTRIBUTE_TEXT: Final = 500
"""Bounds of a task's tags and attributes (durable.tag in schema.sql holds the same)."""


def labels(
    tags: object, attributes: object
) -> tuple[list[str] | None, dict[str, str | int | float | bool] | None]:
    """A task's tags (a list of 1-to-100-character strings, at most 20, kept as a sorted
    set) and attributes (a dict of at most 20 names of 1 to 100 characters to a string of
    at most 500 characters, a number or a boolean); None for none."""
    kept_tags: list[str] | None = None
    if tags is not None:
        if isinstance(tags, str) or not isinstance(tags, list | tuple | set | frozenset):
            raise InvalidValue(f"tags must be a list of strings, got {shown(tags)}")
        for tag in tags:
            text(tag, "a tag", limit=MAX_TAG)
        kept_tags = sorted(set(tags)) or None
        if kept_tags is not None and len(kept_tags) > MAX_TAGS:
            raise InvalidValue(f"tags: at most {MAX_TAGS} a task, got {len(kept_tags)}")
    kept: dict[str, str | int | float | bool] | None = None
    if attributes is not None:
        if not isinstance(attributes, dict):
            raise InvalidValue(f"attributes must be a dict of name to value, got {shown(attributes)}")
        if len(attributes) > MAX_ATTRIBUTES:
            raise InvalidValue(f"attributes: at most {MAX_ATTRIBUTES} a task, got {len(attributes)}")
        for key, value in attributes.items():
            text(key, "an attribute name", limit=MAX_TAG)
            if isinstance(value, str):
                if value:  # an empty string is a value like any other
                    text(value, f"attribute {key!r}", limit=MAX_ATTRIBUTE_TEXT)
            elif isinstance(value, float) and not math.isfinite(value):
                raise InvalidValue(f"attribute {key!r} must be a finite number, got {shown(value)}")
            elif not isinstance(value, bool | int | float):
                raise InvalidValue(
                    f"attribute {key!r} must be a string (at most {MAX_ATTRIBUTE_TEXT} "
                    f"characters), a number or a boolean, got {shown(value)}"
                )
        kept = dict(attributes) or None
    return kept_tags, kept


def attribute_pair(item: str, field: str = "--attr") -> tuple[str, str | int | float | bool]:
    """``name=text`` (a string value) or ``name:=JSON`` (a number or boolean, e.g.
    ``tries:=3``, ``paid:=true``) as (name, value)."""
    import json

    name, typed, value = item.partition(":=")
    if typed:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, bool | int | float) and name:
            return name, parsed
        raise InvalidValue(f"{field}: expected name:=NUMBER or name:=true/false, got {shown(item)}")
    name, equals, value = item.partition("=")
    if not equals or not name:
        raise InvalidValue(f"{field}: expected name=value or name:=JSON, got {shown(item)}")
    return name, value


# -- what a caller passes to start ----------------------------------------------------


MAX_KEY_BYTES = 2000
"""Longest idempotency key, in UTF-8 bytes (a btree entry holds about 2700)."""


def idempotency_key(value: object) -> None:
    text(value, "idempotency_key", limit=None)
    # Its unique index holds at most ~2700 bytes an entry.
    assert isinstance(value, str)
    if len(value.encode()) > MAX_KEY_BYTES:
        raise InvalidValue(f"idempotency_key must be at most {MAX_KEY_BYTES} bytes")


def seconds(value: object, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value < 10 * 365 * 86400
    ):
        raise InvalidValue(f"{what} must be a number of seconds from 0 to 10 years, got {shown(value)}")
    return float(value)


def debounce(
    name: str, debounce: object, key: object, max_delay: object
) -> tuple[float, str, float | None]:
    if debounce is None:
        raise InvalidValue("debounce_key and max_delay need debounce=seconds")
    secs = seconds(debounce, "debounce")
    limit = None if max_delay is None else seconds(max_delay, "max_delay")
    if limit is not None and limit < secs:
        raise InvalidValue(f"max_delay ({limit:g}s) must be at least debounce ({secs:g}s)")
    key_text = name if key is None else text(key, "debounce_key", limit=None)
    if len(key_text.encode()) > MAX_KEY_BYTES:
        raise InvalidValue(f"debounce_key must be at most {MAX_KEY_BYTES} bytes")
    return secs, key_text, limit


def task_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        raise InvalidValue(f"a task id is a whole number from 1 to 2**63-1, got {shown(value)}")
    return value

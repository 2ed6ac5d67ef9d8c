"""Fleet-wide queue limits as operators write them (`durable queues set`)."""

from __future__ import annotations

from durable.errors import ConfigurationError
from durable.settings import parse_duration
from durable.validation import MAX_LIMIT, MAX_PERIOD, MIN_PERIOD, PERIOD_FORM


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

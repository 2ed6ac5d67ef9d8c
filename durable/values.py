"""How each setting's value is read: a parser per kind of value, ``(variable or flag name,
raw value) -> value``, failing with one line that names the variable, the form expected and
what was given. durable.options pairs them with the settings."""

from __future__ import annotations

import ipaddress
import keyword
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final, NoReturn
from urllib.parse import urlsplit

from durable.errors import ConfigurationError
from durable.logs import FORMATS, LEVELS, redact

MAX_CONCURRENCY: Final = 100_000
MAX_QUEUE_NAME: Final = 200
LIBPQ_VARIABLES: Final = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE")

_URL_FORM = "a URL postgresql://[user[:password]@][host][:port][/dbname] (or postgres://)"
_QUEUES_FORM = f"name=N[,name=N...] with N a whole number from 1 to {MAX_CONCURRENCY}"
_WHOLE_FORM = f"a whole number from 1 to {MAX_CONCURRENCY}"
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_WHOLE_RE = re.compile(r"\d+")



def parse_duration(text: str) -> float:
    """Seconds in `text`: a number of seconds (5, 0.5) or a number with ms, s, m, h or d."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    number, unit = match.groups()
    value = float(number)
    unit = (unit or "s").lower()
    seconds = value / 1000 if unit == "ms" else value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if not math.isfinite(seconds):
        raise ValueError(f"duration out of range: {text!r}")
    return seconds



def _fail(name: str, expected: str, shown: str, detail: str = "") -> NoReturn:
    # repr() keeps the message on one line whatever the value holds.
    message = f"{name}: expected {expected}, got {shown!r}"
    raise ConfigurationError(f"{message} ({detail})" if detail else message)


def _shown(raw: object) -> str:
    return redact(raw if isinstance(raw, str) else repr(raw))


def masked_url(text: str) -> str:
    masked = redact(text)
    head, at, tail = masked.rpartition("@")
    _scheme, separator, userinfo = head.partition("://")
    if at and "***" not in head and ":" in (userinfo if separator else head):
        # Not shaped like scheme://user:password@host, yet it may hold a password:
        # show only what follows the credentials.
        masked = "***@" + tail
    return masked


def url(name: str, raw: object) -> str:
    if not isinstance(raw, str):
        _fail(name, _URL_FORM, _shown(raw))
    text = raw.strip()
    scheme, separator, _rest = text.partition("://")
    valid = bool(separator) and scheme.lower() in ("postgres", "postgresql")
    if valid:
        try:
            urlsplit(text)
        except ValueError:  # e.g. an unclosed [ipv6] bracket
            valid = False
    if not valid:
        _fail(name, _URL_FORM, masked_url(text))
    return text


def read_url_file(name: str, raw: object) -> str:
    path = raw if isinstance(raw, str | Path) else None
    if path is None or "\0" in str(path):
        _fail(name, "the path of a file holding a postgresql:// URL", _shown(raw))
    try:
        with open(Path(path).expanduser(), encoding="utf-8") as f:
            text = f.read(65536).strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigurationError(f"{name}: cannot read {str(path)!r}: {reason}") from None
    if not text:
        raise ConfigurationError(f"{name}: {str(path)!r} is empty; expected {_URL_FORM}")
    return text


def _whole(raw: object) -> int | None:
    """`raw` as an int in 1..MAX_CONCURRENCY, or None if it is not one."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        text = raw.strip()
        # Digits only: int() would also take "+5", "5_000" and non-ASCII digits.
        if not _WHOLE_RE.fullmatch(text) or len(text) > 7:
            return None
        raw = int(text)
    if isinstance(raw, int) and 1 <= raw <= MAX_CONCURRENCY:
        return raw
    return None


def concurrency(name: str, raw: object) -> int:
    value = _whole(raw)
    if value is None:
        _fail(name, _WHOLE_FORM, _shown(raw))
    return value


def _queue_items(name: str, raw: object) -> list[tuple[object, object]]:
    """`raw` as (name, limit) pairs, limit None for a bare name; not validated yet."""
    if isinstance(raw, Mapping):
        return list(raw.items())
    elements = [raw] if isinstance(raw, str) else raw
    if not isinstance(elements, list | tuple):
        _fail(name, _QUEUES_FORM, _shown(raw))
    items: list[tuple[object, object]] = []
    for element in elements:
        if isinstance(element, tuple) and len(element) == 2:
            items.append((element[0], element[1]))
        elif isinstance(element, str):
            for part in element.split(","):
                queue, equals, limit = part.partition("=")
                items.append((queue, limit if equals else None))
        else:
            _fail(name, _QUEUES_FORM, _shown(raw))
    return items


def queues(name: str, raw: object) -> tuple[tuple[str, int | None], ...]:
    result: list[tuple[str, int | None]] = []
    for queue, raw_limit in _queue_items(name, raw):
        queue = queue.strip() if isinstance(queue, str) else queue
        if (
            not isinstance(queue, str)
            or not 1 <= len(queue) <= MAX_QUEUE_NAME
            or ("=" in queue or "," in queue)
        ):
            _fail(
                name,
                _QUEUES_FORM,
                _shown(raw),
                f"a queue name is 1 to {MAX_QUEUE_NAME} characters without '=' or ','",
            )
        limit = None if raw_limit is None else _whole(raw_limit)
        if raw_limit is not None and limit is None:
            _fail(name, _QUEUES_FORM, _shown(raw))
        if any(queue == seen for seen, _limit in result):
            _fail(name, _QUEUES_FORM, _shown(raw), f"queue {queue!r} is given twice")
        result.append((queue, limit))
    if not result:
        _fail(name, _QUEUES_FORM, _shown(raw))
    return tuple(result)


def _duration(name: str, raw: object, minimum: float, inclusive: bool, expected: str) -> float:
    seconds: float | None = None
    if isinstance(raw, str):
        try:
            seconds = parse_duration(raw)
        except ValueError:
            seconds = None
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        seconds = float(raw)
    if (
        seconds is None
        or not math.isfinite(seconds)
        or seconds < minimum
        or (seconds == minimum and not inclusive)
    ):
        _fail(name, expected, _shown(raw))
    return seconds


def poll_interval(name: str, raw: object) -> float:
    return _duration(name, raw, 0.0, False, "a positive duration such as 5, 0.5, 500ms, 2s or 1m")


def lease(name: str, raw: object) -> float:
    return _duration(name, raw, 1.0, True, "a duration of at least 1s such as 30, 30s or 1m")


def claim_ahead(name: str, raw: object) -> int | None:
    expected = f"auto or a whole number from 0 to {MAX_CONCURRENCY}"
    if isinstance(raw, int) and not isinstance(raw, bool):
        text = str(raw)
    elif isinstance(raw, str):
        text = raw.strip().lower()
    else:
        _fail(name, expected, _shown(raw))
    if text == "auto":
        return None
    if not _WHOLE_RE.fullmatch(text) or int(text) > MAX_CONCURRENCY:
        _fail(name, expected, _shown(raw))
    return int(text)


MAX_WORKFLOW_CACHE: Final = 1_000_000
MAX_HISTORY_WARNING: Final = 1_000_000_000


def _count(name: str, raw: object, low: int, high: int, expected: str) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        text = str(raw)
    elif isinstance(raw, str):
        text = raw.strip()
    else:
        _fail(name, expected, _shown(raw))
    if not _WHOLE_RE.fullmatch(text) or not low <= int(text) <= high:
        _fail(name, expected, _shown(raw))
    return int(text)


def workflow_cache(name: str, raw: object) -> int:
    return _count(
        name, raw, 0, MAX_WORKFLOW_CACHE, f"a whole number from 0 to {MAX_WORKFLOW_CACHE}"
    )


def history_warning(name: str, raw: object) -> int | None:
    expected = f"off or a whole number from 1 to {MAX_HISTORY_WARNING}"
    if isinstance(raw, str) and raw.strip().lower() == "off":
        return None
    return _count(name, raw, 1, MAX_HISTORY_WARNING, expected)


def shutdown_grace(name: str, raw: object) -> float:
    return _duration(name, raw, 0.0, True, "a duration such as 30, 30s or 1m (0 to cancel at once)")


def _choice(name: str, raw: object, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower() if isinstance(raw, str) else ""
    if value not in choices:
        _fail(name, f"one of {', '.join(choices)}", _shown(raw))
    return value


def log_level(name: str, raw: object) -> str:
    return _choice(name, raw, LEVELS)


def log_format(name: str, raw: object) -> str:
    return _choice(name, raw, FORMATS)


def apps(name: str, raw: object) -> tuple[str, ...]:
    expected = "comma-separated module names such as shop.tasks,shop.workflows"
    elements = [raw] if isinstance(raw, str) else raw
    if not isinstance(elements, list | tuple) or not all(isinstance(e, str) for e in elements):
        _fail(name, expected, _shown(raw))
    modules: list[str] = []
    for element in elements:
        for part in element.split(","):
            module = part.strip()
            if not all(
                word.isidentifier() and not keyword.iskeyword(word) for word in module.split(".")
            ):
                _fail(name, expected, _shown(raw))
            if module not in modules:
                modules.append(module)
    if not modules:
        _fail(name, expected, _shown(raw))
    return tuple(modules)


_HTTP_FORM = "host:port such as 127.0.0.1:9090, 0.0.0.0:9090, [::1]:9090 or :9090"
_HOST_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*")


def http(name: str, raw: object) -> tuple[str, int]:
    text = raw.strip() if isinstance(raw, str) else ""
    host, colon, port = text.rpartition(":")
    if (
        not colon
        or not _HOST_RE.fullmatch(host)
        or not _WHOLE_RE.fullmatch(port)
        or len(port) > 5
        or int(port) > 65535
    ):
        _fail(name, _HTTP_FORM, _shown(raw))
    return host.strip("[]"), int(port)


_HOST_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?")


def host_names(name: str, raw: object) -> tuple[str, ...]:
    """Host names or addresses, as a request's Host header gives them (no port)."""
    expected = "comma-separated host names or addresses such as dash.example.com,10.0.0.5"
    elements = [raw] if isinstance(raw, str) else raw
    if not isinstance(elements, list | tuple) or not all(isinstance(e, str) for e in elements):
        _fail(name, expected, _shown(raw))
    names: list[str] = []
    for element in elements:
        for part in element.split(","):
            host = part.strip().lower()
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError:
                if len(host) > 253 or not _HOST_NAME_RE.fullmatch(host):
                    _fail(name, expected, _shown(raw))
                host = host.rstrip(".")
            if host not in names:
                names.append(host)
    if not names:
        _fail(name, expected, _shown(raw))
    return tuple(names)


MAX_HTTP_CONNECTIONS: Final = 10_000


def http_max_connections(name: str, raw: object) -> int:
    return _count(name, raw, 1, MAX_HTTP_CONNECTIONS,
                  f"a whole number from 1 to {MAX_HTTP_CONNECTIONS}")  # fmt: skip


def on_off(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = raw.strip().lower() if isinstance(raw, str) else ""
    if text in ("on", "true", "1", "yes"):
        return True
    if text in ("off", "false", "0", "no"):
        return False
    _fail(name, "on or off", _shown(raw))


def secret_file(name: str, raw: object) -> Path:
    """The path of a file holding a secret; read when the dashboard starts."""
    text = raw if isinstance(raw, str) else str(raw) if isinstance(raw, Path) else ""
    if not text.strip() or "\0" in text:
        _fail(name, "the path of a file holding a secret", _shown(raw))
    return Path(text.strip()).expanduser()


MAX_RETENTION = 100 * 365 * 86400.0
"""A century: the cutoff (now minus this) must stay a date PostgreSQL and Python both hold."""


def retention(name: str, raw: object) -> float:
    expected = "a duration from 1s to 36500d such as 7d, 12h or 30m"
    seconds = _duration(name, raw, 1.0, True, expected)
    if seconds > MAX_RETENTION:
        _fail(name, expected, _shown(raw))
    return seconds


MAX_STATEMENT_CACHE = 100_000


def statement_cache(name: str, raw: object) -> int:
    if (isinstance(raw, str) and raw.strip() == "0") or (type(raw) is int and raw == 0):
        return 0
    value = _whole(raw)
    if value is None or value > MAX_STATEMENT_CACHE:
        _fail(name, f"a whole number from 0 to {MAX_STATEMENT_CACHE}", _shown(raw))
    return value


RETENTION_VACUUM_MODES = ("auto", "on", "off")


def retention_vacuum(name: str, raw: object) -> str:
    text = raw.strip().lower() if isinstance(raw, str) else ""
    if text not in RETENTION_VACUUM_MODES:
        _fail(name, "auto, on or off", _shown(raw))
    return text


def home(name: str, raw: object) -> Path:
    text = raw if isinstance(raw, str) else str(raw) if isinstance(raw, Path) else ""
    if not text.strip() or "\0" in text:
        _fail(name, "a directory path", _shown(raw))
    return Path(text).expanduser()

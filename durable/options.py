"""Every option of `durable run` and `Settings`, in one table: its variable, flag, parser,
default and help. `Settings.from_env`, the `run` flags with their `--help` and
docs/configuration.md (bin/gen-docs) are all generated from `OPTIONS`."""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn
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


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One setting: where it comes from, how it is read, what it means."""

    field: str
    env: str
    flag: str | None
    """The `durable run` flag; None: only the variable sets it."""
    parse: Callable[[str, object], Any]
    """(variable or flag name, raw value) -> the value; raises ConfigurationError."""
    default: Any
    shown_default: str
    help: str
    metavar: str | None = None
    repeatable: bool = False


OPTIONS: Final[tuple[Option, ...]] = (
    Option(
        "database_url", "DURABLE_DATABASE_URL", "--database-url", url, None, "(unset)",
        "Postgres URL postgresql://user:password@host:port/dbname. Unset: "
        "DURABLE_DATABASE_URL_FILE, DATABASE_URL, then libpq's PGHOST/PGPORT/PGUSER/"
        "PGDATABASE/PGPASSWORD/PGSERVICE if any is set, else an embedded Postgres under "
        "DURABLE_HOME. Prefer the variable or a file to the flag: a command line is "
        "visible to every user in process listings", metavar="URL",
    ),
    Option(
        "database_url_file", "DURABLE_DATABASE_URL_FILE", "--database-url-file", read_url_file,
        None, "(unset)",
        "a file holding the Postgres URL (a mounted secret, e.g. /run/secrets/database_url); "
        "instead of DURABLE_DATABASE_URL", metavar="PATH",
    ),
    Option(
        "listen_url", "DURABLE_LISTEN_URL", "--listen-url", url, None, "(the database URL)",
        "direct Postgres URL for the LISTEN connection, e.g. when the database URL "
        "goes through PgBouncer in transaction mode", metavar="URL",
    ),
    Option(
        "statement_cache", "DURABLE_STATEMENT_CACHE", "--statement-cache", statement_cache,
        100, "100",
        "prepared statements each connection keeps; 0 when the database URL goes through "
        "PgBouncer in transaction mode (before 1.21, or without max_prepared_statements), "
        "which cannot keep a prepared statement beyond a transaction", metavar="N",
    ),
    Option(
        "queues", "DURABLE_QUEUES", "--queues", queues, (), "default",
        "queues to serve with their per-daemon concurrency: orders=8,email=32 "
        "(a bare name uses DURABLE_CONCURRENCY)", metavar="QUEUES",
    ),
    Option(
        "concurrency", "DURABLE_CONCURRENCY", "--concurrency", concurrency, 10, "10",
        "tasks run at once per queue when DURABLE_QUEUES gives no number", metavar="N",
    ),
    Option(
        "poll_interval", "DURABLE_POLL_INTERVAL", "--poll-interval", poll_interval, 5.0, "5s",
        "re-query for work this often when no notification arrives (5, 0.5, 500ms, 2s, 1m)",
        metavar="DURATION",
    ),
    Option(
        "lease", "DURABLE_LEASE", "--lease", lease, 30.0, "30s",
        "a claimed task returns to the queue if its daemon stops heartbeating for this long "
        "(at least 1s); the daemon heartbeats every third of it", metavar="DURATION",
    ),
    Option(
        "claim_ahead", "DURABLE_CLAIM_AHEAD", "--claim-ahead", claim_ahead, None, "auto",
        "tasks a queue may claim beyond its free slots, so a freed slot starts its next "
        "task without a round trip: auto (the slots that free up during two claims' round "
        "trips or 20 ms, whichever is longer; none for slow tasks) or a whole number (0: "
        "claim only for free slots)", metavar="N",
    ),
    Option(
        "shutdown_grace", "DURABLE_SHUTDOWN_GRACE", "--shutdown-grace", shutdown_grace, 30.0,
        "30s", "on SIGTERM, let running tasks finish for this long before cancelling them",
        metavar="DURATION",
    ),
    Option(
        "log_level", "DURABLE_LOG_LEVEL", "--log-level", log_level, "info", "info",
        "debug, info, warning or error", metavar="LEVEL",
    ),
    Option(
        "log_format", "DURABLE_LOG_FORMAT", "--log-format", log_format, "auto", "auto",
        "json, console, or auto (JSON lines unless stderr is a terminal)", metavar="FORMAT",
    ),
    Option(
        "apps", "DURABLE_APP", "--app", apps, (), "(none)",
        "comma-separated modules to import for their tasks and workflows, in addition to "
        "the 'durable' entry points (the flag is repeatable)", metavar="MODULE",
        repeatable=True,
    ),
    Option(
        "http", "DURABLE_HTTP", "--http", http, None, "(off)",
        "serve /healthz, /readyz and /metrics (Prometheus) on host:port, e.g. 0.0.0.0:9090 "
        "(:9090: every interface; port 0 picks a free port)", metavar="HOST:PORT",
    ),
    Option(
        "ui", "DURABLE_UI", "--ui", on_off, False, "off",
        "on: serve the web dashboard on DURABLE_HTTP too, beside the probes (`durable ui` "
        "serves it alone)", metavar="on|off",
    ),
    Option(
        "ui_listen", "DURABLE_UI_LISTEN", "--ui-listen", http, ("127.0.0.1", 8080),
        "127.0.0.1:8080",
        "where `durable ui` serves the dashboard (`durable ui --listen`), host:port as for "
        "DURABLE_HTTP; `durable run` serves it only on DURABLE_HTTP, with DURABLE_UI=on",
        metavar="HOST:PORT",
    ),
    Option(
        "ui_token_file", "DURABLE_UI_TOKEN_FILE", "--ui-token-file", secret_file, None,
        "(unset: read-only)",
        "a file holding a token (8 characters or more) that signs in to the dashboard and "
        "enables its actions (retry, replay, fork, cancel, events); without it or "
        "DURABLE_UI_PASSWORD_FILE the dashboard is read-only. Read again when it changes: "
        "a rotated token needs no restart (and ends the sessions of the old one)",
        metavar="PATH",
    ),
    Option(
        "ui_password_file", "DURABLE_UI_PASSWORD_FILE", "--ui-password-file", secret_file,
        None, "(unset: read-only)",
        "as DURABLE_UI_TOKEN_FILE, a password the sign-in form asks for", metavar="PATH",
    ),
    Option(
        "retention", "DURABLE_RETENTION", "--retention", retention, None, "(keep forever)",
        "delete finished tasks, with their events, this long after they finished, e.g. 7d "
        "(1s to 36500d; one daemon at a time prunes, every few minutes)", metavar="DURATION",
    ),
    Option(
        "retention_vacuum", "DURABLE_RETENTION_VACUUM", "--retention-vacuum",
        retention_vacuum, "auto", "auto",
        "after each prune pass under DURABLE_RETENTION, VACUUM the task, event and signal "
        "tables: auto (only when the server's autovacuum is off), on, or off; the daemon's "
        "role must own them (PostgreSQL 17: or hold MAINTAIN on them)", metavar="MODE",
    ),
    Option(
        "workflow_cache", "DURABLE_WORKFLOW_CACHE", "--workflow-cache", workflow_cache, 1000,
        "1000",
        "suspended workflows a daemon keeps in memory, so that resuming one on the same "
        "daemon continues it instead of replaying its event log (least recently suspended "
        "dropped first; 0: keep none, every resume replays)", metavar="N",
    ),
    Option(
        "history_warning", "DURABLE_HISTORY_WARNING", "--history-warning", history_warning,
        10_000, "10000",
        "log workflow_history_large (and count it in durable_workflow_history_warnings) "
        "when a workflow's event log passes this many events, or off", metavar="N",
    ),
    Option(
        "home", "DURABLE_HOME", "--home", home, None,
        "(per-user data directory; /var/lib/durable for root)",
        "directory of the embedded Postgres server used when no database is configured, "
        "with its data and its generated password",
        metavar="DIR",
    ),
)  # fmt: skip

BY_FIELD: Final[Mapping[str, Option]] = {o.field: o for o in OPTIONS}

ENV_VARS: Final[tuple[tuple[str, str, str], ...]] = (
    (OPTIONS[0].env, OPTIONS[0].shown_default, OPTIONS[0].help),
    (
        "DATABASE_URL",
        "(unset)",
        "used when DURABLE_DATABASE_URL is unset; must also be a postgresql:// URL",
    ),
    *((o.env, o.shown_default, o.help) for o in OPTIONS[1:]),
)
"""(variable, default shown, help) of every variable durable reads."""


def env_help() -> str:
    """The `durable run --help` epilog."""
    lines = ["environment variables (flags override them):"]
    lines += [f"  {var:<26} {text} [default: {default}]" for var, default, text in ENV_VARS]
    return "\n".join(lines)


def configuration_markdown() -> str:
    """docs/configuration.md, as bin/gen-docs writes it."""
    flags = {o.env: o.flag for o in OPTIONS}

    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "# Configuration",
        "",
        "<!-- Generated from durable/options.py by bin/gen-docs: edit the table there. -->",
        "",
        "`durable run` and `durable.connect()` read these environment variables once, at",
        "start; a flag of `durable run` overrides its variable. An empty variable counts as",
        "unset. A malformed value stops the process with one line naming the variable (or",
        "the flag) and the form it expects; passwords never appear in messages.",
        "",
        "| Variable | `durable run` flag | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    for var, default, text in ENV_VARS:
        flag = flags.get(var)
        shown_flag = f"`{flag}`" if flag else "-"
        lines.append(f"| `{var}` | {shown_flag} | {escape(default)} | {escape(text)} |")
    lines += [
        "",
        "Durations accept a number of seconds (`5`, `0.5`) or a number with `ms`, `s`, `m`,",
        "`h` or `d` (`500ms`, `30s`, `1m`, `7d`).",
        "",
        "The URL is taken from the first of: `--database-url` or `--database-url-file`,",
        "`DURABLE_DATABASE_URL` or `DURABLE_DATABASE_URL_FILE` (giving both forms at one",
        "level is an error), `DATABASE_URL`; then, if any libpq variable",
        f"({', '.join(f'`{v}`' for v in LIBPQ_VARIABLES)}) is set, asyncpg reads those;",
        "otherwise durable starts (once) and uses an embedded Postgres under `DURABLE_HOME`.",
        "Commands other than `durable run`, `demo` and `db` say on stderr when they use it.",
        "The embedded server outlives the command that started it (a stopped or killed `durable",
        "run` included) and is shared by every later command on that home, until `durable db",
        "stop`; after a crash of the server the next command starts it again on the same data. The",
        "home must be yours and writable by you alone: durable refuses one that another user could",
        "write into, since they could swap its files.",
        "",
    ]
    return "\n".join(lines)

"""Runtime configuration: every DURABLE_* variable, read and validated once at startup."""

from __future__ import annotations

import keyword
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Final, NoReturn, TypeVar
from urllib.parse import urlsplit

from durable.logs import FORMATS, LEVELS, redact

__all__ = [
    "ENV_VARS",
    "LIBPQ_VARIABLES",
    "MAX_CONCURRENCY",
    "Settings",
    "SettingsError",
    "parse_duration",
    "unknown_variables",
]

MAX_CONCURRENCY: Final = 100_000
MAX_QUEUE_NAME: Final = 200
LIBPQ_VARIABLES: Final = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE")


class SettingsError(ValueError):
    """A configuration value is malformed; the message is one line naming its variable or flag."""


# field -> (variable, CLI flag, default shown to users, description)
_SPEC: Final[dict[str, tuple[str, str, str, str]]] = {
    "database_url": (
        "DURABLE_DATABASE_URL",
        "--database-url",
        "(unset)",
        "Postgres URL postgresql://user:password@host:port/dbname. Unset: "
        "DURABLE_DATABASE_URL_FILE, DATABASE_URL, then libpq's PGHOST/PGPORT/PGUSER/"
        "PGDATABASE/PGPASSWORD/PGSERVICE if any is set, else an embedded Postgres under "
        "DURABLE_HOME. Prefer the variable or a file to the flag: a command line is "
        "visible to every user in process listings",
    ),
    "database_url_file": (
        "DURABLE_DATABASE_URL_FILE",
        "--database-url-file",
        "(unset)",
        "a file holding the Postgres URL (a mounted secret, e.g. /run/secrets/database_url); "
        "instead of DURABLE_DATABASE_URL",
    ),
    "listen_url": (
        "DURABLE_LISTEN_URL",
        "--listen-url",
        "(the database URL)",
        "direct Postgres URL for the LISTEN connection, e.g. when the database URL "
        "goes through PgBouncer in transaction mode",
    ),
    "queues": (
        "DURABLE_QUEUES",
        "--queues",
        "default",
        "queues to serve with their per-daemon concurrency: orders=8,email=32 "
        "(a bare name uses DURABLE_CONCURRENCY)",
    ),
    "concurrency": (
        "DURABLE_CONCURRENCY",
        "--concurrency",
        "10",
        "tasks run at once per queue when DURABLE_QUEUES gives no number",
    ),
    "poll_interval": (
        "DURABLE_POLL_INTERVAL",
        "--poll-interval",
        "5s",
        "re-query for work this often when no notification arrives (5, 0.5, 500ms, 2s, 1m)",
    ),
    "lease": (
        "DURABLE_LEASE",
        "--lease",
        "30s",
        "a claimed task returns to the queue if its daemon stops heartbeating "
        "for this long (at least 1s)",
    ),
    "claim_ahead": (
        "DURABLE_CLAIM_AHEAD",
        "--claim-ahead",
        "auto",
        "tasks a queue may claim beyond its free slots, so a freed slot starts its next "
        "task without a round trip: auto (sized to how fast slots free up) or a whole "
        "number (0: claim only for free slots)",
    ),
    "shutdown_grace": (
        "DURABLE_SHUTDOWN_GRACE",
        "--shutdown-grace",
        "30s",
        "on SIGTERM, let running tasks finish for this long before cancelling them",
    ),
    "log_level": ("DURABLE_LOG_LEVEL", "--log-level", "info", "debug, info, warning or error"),
    "log_format": (
        "DURABLE_LOG_FORMAT",
        "--log-format",
        "auto",
        "json, console, or auto (JSON lines unless stderr is a terminal)",
    ),
    "apps": (
        "DURABLE_APP",
        "--app",
        "(none)",
        "comma-separated modules to import for their tasks and workflows, "
        "in addition to the 'durable' entry points",
    ),
    "http": (
        "DURABLE_HTTP",
        "--http",
        "(off)",
        "serve /healthz, /readyz and /metrics (Prometheus) on host:port, e.g. 0.0.0.0:9090 "
        "(port 0 picks a free port)",
    ),
    "retention": (
        "DURABLE_RETENTION",
        "--retention",
        "(keep forever)",
        "delete finished tasks, with their events, this long after they finished, e.g. 7d "
        "(one daemon at a time prunes, every few minutes)",
    ),
    "home": (
        "DURABLE_HOME",
        "--home",
        "(per-user data directory)",
        "directory of the embedded Postgres server used when no database is configured",
    ),
}

ENV_VARS: Final[tuple[tuple[str, str, str], ...]] = (
    (_SPEC["database_url"][0], *_SPEC["database_url"][2:]),
    (
        "DATABASE_URL",
        "(unset)",
        "used when DURABLE_DATABASE_URL is unset; must also be a postgresql:// URL",
    ),
    *((variable, default, text) for variable, _flag, default, text in list(_SPEC.values())[1:]),
)

_URL_FORM = "a URL postgresql://[user[:password]@][host][:port][/dbname] (or postgres://)"
_QUEUES_FORM = f"name=N[,name=N...] with N a whole number from 1 to {MAX_CONCURRENCY}"
_WHOLE_FORM = f"a whole number from 1 to {MAX_CONCURRENCY}"
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_WHOLE_RE = re.compile(r"\d+")
_T = TypeVar("_T")


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


def unknown_variables(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """DURABLE_* variables in `env` that durable does not read (likely typos), sorted."""
    env = os.environ if env is None else env
    known = {variable for variable, _default, _text in ENV_VARS}
    return tuple(sorted(name for name in env if name.startswith("DURABLE_") and name not in known))


@dataclass(frozen=True, repr=False)
class Settings:
    """How `durable run` and the client connect and behave; build it with `Settings.from_env()`.

    Every field comes from an environment variable, and a CLI flag overrides it:

    - `database_url` (`DURABLE_DATABASE_URL`, else `DATABASE_URL`): a
      `postgresql://` or `postgres://` URL. When neither is set but a libpq variable
      (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`, `PGSERVICE`) is, it
      stays None and `use_libpq_env` is True: asyncpg reads those variables itself.
      Otherwise None means the embedded Postgres.
    - `listen_url` (`DURABLE_LISTEN_URL`): a direct URL for the LISTEN connection when
      the database URL goes through a transaction-pooling proxy; None means the
      database URL.
    - `queues` (`DURABLE_QUEUES`, e.g. `orders=8,email=32`): the queues this daemon
      serves, each with its concurrency, None for a bare name (the default
      concurrency). Empty means the queue `default`. See `queue_limits`.
    - `concurrency` (`DURABLE_CONCURRENCY`, default 10): tasks run at once per queue
      when no number is given for it.
    - `poll_interval` (`DURABLE_POLL_INTERVAL`, default 5 s): how often a worker
      re-queries when no notification arrives. Durations accept `5`, `0.5`, `500ms`,
      `2s`, `1m`, `1h`.
    - `lease` (`DURABLE_LEASE`, default 30 s, at least 1 s): how long a claim lasts
      without a heartbeat before another daemon may take the task.
    - `claim_ahead` (`DURABLE_CLAIM_AHEAD`, default `auto`): how many tasks a queue
      may claim beyond its free slots; None (auto) sizes it to the slots that free up
      during two claims' round trips or 20 ms, whichever is longer; 0 claims only for
      free slots.
    - `shutdown_grace` (`DURABLE_SHUTDOWN_GRACE`, default 30 s): how long running
      tasks may finish after SIGTERM before they are cancelled.
    - `log_level` (`DURABLE_LOG_LEVEL`): `debug`, `info` (default), `warning`, `error`.
    - `log_format` (`DURABLE_LOG_FORMAT`): `json`, `console`, or `auto` (default:
      JSON lines unless stderr is a terminal).
    - `apps` (`DURABLE_APP`): comma-separated modules imported for the tasks and
      workflows they register, besides the `durable` entry points.
    - `http` (`DURABLE_HTTP`, e.g. `0.0.0.0:9090`): (host, port) of the daemon's
      `/healthz`, `/readyz` and `/metrics` endpoint; None (the default) serves none.
      An empty host listens on every interface; port 0 picks a free port.
    - `retention` (`DURABLE_RETENTION`, e.g. `7d`): seconds after which finished tasks
      are deleted by the daemon in the background; None (the default) keeps them.
    - `home` (`DURABLE_HOME`): the embedded Postgres directory; None for the default.

    A malformed value raises `SettingsError` with one line naming the variable (or
    the flag) and the expected form. Passwords never appear in messages or `repr`.
    """

    database_url: str | None = None
    use_libpq_env: bool = False
    listen_url: str | None = None
    queues: tuple[tuple[str, int | None], ...] = ()
    concurrency: int = 10
    poll_interval: float = 5.0
    lease: float = 30.0
    claim_ahead: int | None = None
    shutdown_grace: float = 30.0
    log_level: str = "info"
    log_format: str = "auto"
    apps: tuple[str, ...] = ()
    http: tuple[str, int] | None = None
    retention: float | None = None
    home: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read `env` (default `os.environ`); `overrides` (CLI flag values by field name,
        None meaning not given) win over it and are validated the same way."""
        unknown = sorted(set(overrides) - _SPEC.keys())
        if unknown:
            raise TypeError(
                f"unknown setting(s) {', '.join(unknown)}; expected some of {', '.join(_SPEC)}"
            )
        source = _Source(os.environ if env is None else env, overrides)

        database_url: str | None = None
        use_libpq_env = False
        picked = source.pick_url()
        if picked is None and source.env_value("DATABASE_URL") is not None:
            picked = ("DATABASE_URL", source.env_value("DATABASE_URL"))
        if picked is not None:
            database_url = _url(*picked)
        else:
            use_libpq_env = any(source.env_value(name) is not None for name in LIBPQ_VARIABLES)

        listen = source.pick("listen_url")
        return cls(
            database_url=database_url,
            use_libpq_env=use_libpq_env,
            listen_url=None if listen is None else _url(*listen),
            queues=source.parse("queues", _queues, ()),
            concurrency=source.parse("concurrency", _concurrency, 10),
            poll_interval=source.parse("poll_interval", _poll_interval, 5.0),
            lease=source.parse("lease", _lease, 30.0),
            claim_ahead=source.parse("claim_ahead", _claim_ahead, None),
            shutdown_grace=source.parse("shutdown_grace", _shutdown_grace, 30.0),
            log_level=source.parse("log_level", _log_level, "info"),
            log_format=source.parse("log_format", _log_format, "auto"),
            apps=source.parse("apps", _apps, ()),
            http=source.parse("http", _http, None),
            retention=source.parse("retention", _retention, None),
            home=source.parse("home", _home, None),
        )

    @property
    def queue_limits(self) -> dict[str, int]:
        """Queue name -> concurrency, bare names resolved; `{"default": concurrency}` if none."""
        if not self.queues:
            return {"default": self.concurrency}
        return {name: self.concurrency if limit is None else limit for name, limit in self.queues}

    @property
    def dsn_for_logs(self) -> str | None:
        """The database URL with any password replaced by ***; None when it is unset."""
        return None if self.database_url is None else _masked_url(self.database_url)

    def __repr__(self) -> str:
        parts = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in ("database_url", "listen_url") and value is not None:
                value = _masked_url(value)
            parts.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(parts)})"


class _Source:
    """Picks each setting from the overrides first, then the environment."""

    def __init__(self, env: Mapping[str, str], overrides: Mapping[str, object]) -> None:
        self._env = env
        self._overrides = overrides

    def env_value(self, variable: str) -> str | None:
        # An empty variable counts as unset (`FOO=` in compose files and unit files).
        value = self._env.get(variable, "").strip()
        return value or None

    def pick(self, field: str) -> tuple[str, object] | None:
        """(variable or flag name, raw value) for `field`, or None when not given."""
        variable, flag, _default, _text = _SPEC[field]
        override = self._overrides.get(field)
        if override is not None:
            return flag, override
        value = self.env_value(variable)
        return None if value is None else (variable, value)

    def pick_url(self) -> tuple[str, object] | None:
        """The database URL given directly or in a file: a flag over a variable, and
        never both forms at one level."""
        for level in (self._overrides_only, self._env_only):
            direct, in_file = level("database_url"), level("database_url_file")
            if direct is not None and in_file is not None:
                raise SettingsError(f"{direct[0]} and {in_file[0]} are both set: give one")
            if in_file is not None:
                return in_file[0], _read_url_file(*in_file)
            if direct is not None:
                return direct
        return None

    def _overrides_only(self, field: str) -> tuple[str, object] | None:
        override = self._overrides.get(field)
        return None if override is None else (_SPEC[field][1], override)

    def _env_only(self, field: str) -> tuple[str, object] | None:
        value = self.env_value(_SPEC[field][0])
        return None if value is None else (_SPEC[field][0], value)

    def parse(self, field: str, parser: Callable[[str, object], _T], default: _T) -> _T:
        picked = self.pick(field)
        return default if picked is None else parser(*picked)


def _fail(name: str, expected: str, shown: str, detail: str = "") -> NoReturn:
    # repr() keeps the message on one line whatever the value holds.
    message = f"{name}: expected {expected}, got {shown!r}"
    raise SettingsError(f"{message} ({detail})" if detail else message)


def _shown(raw: object) -> str:
    return redact(raw if isinstance(raw, str) else repr(raw))


def _masked_url(text: str) -> str:
    masked = redact(text)
    head, at, tail = masked.rpartition("@")
    _scheme, separator, userinfo = head.partition("://")
    if at and "***" not in head and ":" in (userinfo if separator else head):
        # Not shaped like scheme://user:password@host, yet it may hold a password:
        # show only what follows the credentials.
        masked = "***@" + tail
    return masked


def _url(name: str, raw: object) -> str:
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
        _fail(name, _URL_FORM, _masked_url(text))
    return text


def _read_url_file(name: str, raw: object) -> str:
    path = raw if isinstance(raw, str | Path) else None
    if path is None or "\0" in str(path):
        _fail(name, "the path of a file holding a postgresql:// URL", _shown(raw))
    try:
        with open(Path(path).expanduser(), encoding="utf-8") as f:
            text = f.read(65536).strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise SettingsError(f"{name}: cannot read {str(path)!r}: {reason}") from None
    if not text:
        raise SettingsError(f"{name}: {str(path)!r} is empty; expected {_URL_FORM}")
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


def _concurrency(name: str, raw: object) -> int:
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


def _queues(name: str, raw: object) -> tuple[tuple[str, int | None], ...]:
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


def _poll_interval(name: str, raw: object) -> float:
    return _duration(name, raw, 0.0, False, "a positive duration such as 5, 0.5, 500ms, 2s or 1m")


def _lease(name: str, raw: object) -> float:
    return _duration(name, raw, 1.0, True, "a duration of at least 1s such as 30, 30s or 1m")


def _claim_ahead(name: str, raw: object) -> int | None:
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


def _shutdown_grace(name: str, raw: object) -> float:
    return _duration(name, raw, 0.0, True, "a duration such as 30, 30s or 1m (0 to cancel at once)")


def _choice(name: str, raw: object, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower() if isinstance(raw, str) else ""
    if value not in choices:
        _fail(name, f"one of {', '.join(choices)}", _shown(raw))
    return value


def _log_level(name: str, raw: object) -> str:
    return _choice(name, raw, LEVELS)


def _log_format(name: str, raw: object) -> str:
    return _choice(name, raw, FORMATS)


def _apps(name: str, raw: object) -> tuple[str, ...]:
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


def _http(name: str, raw: object) -> tuple[str, int]:
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


def _retention(name: str, raw: object) -> float:
    return _duration(name, raw, 0.0, False, "a positive duration such as 7d, 12h or 30m")


def _home(name: str, raw: object) -> Path:
    text = raw if isinstance(raw, str) else str(raw) if isinstance(raw, Path) else ""
    if not text.strip() or "\0" in text:
        _fail(name, "a directory path", _shown(raw))
    return Path(text).expanduser()

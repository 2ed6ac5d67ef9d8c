"""Runtime configuration: every DURABLE_* variable, read and validated once at startup."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from durable.errors import ConfigurationError
from durable.options import BY_FIELD, ENV_VARS, OPTIONS
from durable.values import (
    LIBPQ_VARIABLES,
    MAX_CONCURRENCY,
    masked_url,
    parse_duration,
    read_url_file,
    url,
)

__all__ = [
    "ENV_VARS",
    "LIBPQ_VARIABLES",
    "MAX_CONCURRENCY",
    "Settings",
    "SettingsError",
    "masked_url",
    "parse_duration",
    "unknown_variables",
]

SettingsError = ConfigurationError
"""The name this module has always exported for a malformed configuration value."""

_URL_FIELDS = ("database_url", "database_url_file")


def unknown_variables(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """DURABLE_* variables in `env` that durable does not read (likely typos), sorted."""
    env = os.environ if env is None else env
    known = {variable for variable, _default, _text in ENV_VARS}
    return tuple(sorted(name for name in env if name.startswith("DURABLE_") and name not in known))


@dataclass(frozen=True, repr=False)
class Settings:
    """How `durable run` and the client connect and behave; build it with `Settings.from_env()`.

    Every field comes from an environment variable, and a `durable run` flag overrides
    it: docs/configuration.md lists them all, generated from `durable.options.OPTIONS`.
    When no URL is given but a libpq variable (`PGHOST`, ...) is, `database_url` stays
    None and `use_libpq_env` is True: asyncpg reads those variables itself. Otherwise
    None means the embedded Postgres. `database_url_source` says where the URL came from
    (a flag, a variable, a file), for messages.

    A malformed value raises `ConfigurationError` with one line naming the variable (or
    the flag) and the expected form. Passwords never appear in messages or `repr`.
    """

    database_url: str | None = None
    use_libpq_env: bool = False
    listen_url: str | None = None
    statement_cache: int = 100
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
    http_max_connections: int = 64
    ui: bool = False
    ui_listen: tuple[str, int] = ("127.0.0.1", 8080)
    ui_allowed_hosts: tuple[str, ...] = ()
    ui_token_file: Path | None = None
    ui_password_file: Path | None = None
    retention: float | None = None
    retention_vacuum: str = "auto"
    workflow_cache: int = 1000
    history_warning: int | None = 10_000
    home: Path | None = None
    database_url_source: str | None = field(default=None, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read `env` (default `os.environ`); `overrides` (CLI flag values by field name,
        None meaning not given) win over it and are validated the same way."""
        unknown = sorted(set(overrides) - BY_FIELD.keys())
        if unknown:
            raise TypeError(
                f"unknown setting(s) {', '.join(unknown)}; expected some of {', '.join(BY_FIELD)}"
            )
        source = _Source(os.environ if env is None else env, overrides)

        values: dict[str, Any] = {}
        picked = source.pick_url()
        if picked is None and source.env_value("DATABASE_URL") is not None:
            picked = ("DATABASE_URL", source.env_value("DATABASE_URL"), "DATABASE_URL")
        if picked is not None:
            name, raw, where = picked
            values["database_url"] = url(name, raw)
            values["database_url_source"] = where
        elif any(source.env_value(name) is not None for name in LIBPQ_VARIABLES):
            values["use_libpq_env"] = True
            given = [name for name in LIBPQ_VARIABLES if source.env_value(name) is not None]
            values["database_url_source"] = ", ".join(given)
        for option in OPTIONS:
            if option.field not in _URL_FIELDS:
                values[option.field] = source.parse(option.field)
        return cls(**values)

    @property
    def queue_limits(self) -> dict[str, int]:
        """Queue name -> concurrency, bare names resolved; `{"default": concurrency}` if none."""
        if not self.queues:
            return {"default": self.concurrency}
        return {name: self.concurrency if limit is None else limit for name, limit in self.queues}

    @property
    def dsn_for_logs(self) -> str | None:
        """The database URL with any password replaced by ***; None when it is unset."""
        return None if self.database_url is None else masked_url(self.database_url)

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("database_url", "listen_url") and value is not None:
                value = masked_url(value)
            parts.append(f"{f.name}={value!r}")
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
        return self._overrides_only(field) or self._env_only(field)

    def pick_url(self) -> tuple[str, object, str] | None:
        """(name, URL, where it came from) given directly or in a file: a flag over a
        variable, and never both forms at one level."""
        for level in (self._overrides_only, self._env_only):
            direct, in_file = level("database_url"), level("database_url_file")
            if direct is not None and in_file is not None:
                raise ConfigurationError(f"{direct[0]} and {in_file[0]} are both set: give one")
            if in_file is not None:
                name, path = in_file
                return name, read_url_file(name, path), f"{name} {path}"
            if direct is not None:
                return direct[0], direct[1], direct[0]
        return None

    def _overrides_only(self, field: str) -> tuple[str, object] | None:
        override = self._overrides.get(field)
        flag = BY_FIELD[field].flag
        return None if override is None else (flag or BY_FIELD[field].env, override)

    def _env_only(self, field: str) -> tuple[str, object] | None:
        value = self.env_value(BY_FIELD[field].env)
        return None if value is None else (BY_FIELD[field].env, value)

    def parse(self, field: str) -> Any:
        option = BY_FIELD[field]
        picked = self.pick(field)
        return option.default if picked is None else option.parse(*picked)

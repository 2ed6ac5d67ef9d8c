"""Every option of `durable run` and `Settings`, in one table: its variable, flag, parser,
default and help. `Settings.from_env`, the `run` flags with their `--help` and
docs/configuration.md (bin/gen-docs) are all generated from `OPTIONS`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from durable.values import (
    LIBPQ_VARIABLES,
    apps,
    claim_ahead,
    concurrency,
    history_warning,
    home,
    host_names,
    http,
    http_max_connections,
    lease,
    log_format,
    log_level,
    on_off,
    poll_interval,
    queues,
    read_url_file,
    retention,
    retention_vacuum,
    secret_file,
    shutdown_grace,
    statement_cache,
    url,
    workflow_cache,
)


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
        "http_max_connections", "DURABLE_HTTP_MAX_CONNECTIONS", "--http-max-connections",
        http_max_connections, 64, "64",
        "connections DURABLE_HTTP serves at once (with DURABLE_UI=off), so a flood of "
        "clients cannot use up the daemon's file descriptors and with them its database "
        "connections: past it, the oldest connection still without a request is closed "
        "to make room, or, when every one is being answered, the new one; both get a 503",
        metavar="N",
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
        "ui_allowed_hosts", "DURABLE_UI_ALLOWED_HOSTS", "--ui-allowed-hosts", host_names, (),
        "(loopback names only, when listening on loopback)",
        "comma-separated host names the dashboard answers to besides localhost, e.g. the "
        "name a reverse proxy passes on in Host. A dashboard listening on a loopback "
        "address answers only to loopback names and these (a page elsewhere cannot reach "
        "it by DNS rebinding); listening on other addresses, to any name unless this is set",
        metavar="NAMES", repeatable=True,
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

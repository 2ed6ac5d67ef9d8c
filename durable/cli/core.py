"""What every command shares: errors, settings, the database it talks to, output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import anyio

from durable.errors import ConfigurationError, DurableError
from durable.settings import Settings, masked_url, parse_duration

if TYPE_CHECKING:
    from durable.admin import Admin
    from durable.client import Client
    from durable.models import Progress

T = TypeVar("T")


class CommandError(Exception):
    """A one-line error for the user; exits with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr, as every other error is, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("durable").strip()
        where = f"{command}: " if command else ""
        hint = f"durable {command} --help" if command else "durable --help"
        self.exit(2, f"durable: {where}{message} (see `{hint}`)\n")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn, backend_options={"use_uvloop": True})


def settings(args: argparse.Namespace | None = None, **overrides: object) -> Settings:
    if args is not None:
        for name in ("database_url", "database_url_file"):
            overrides.setdefault(name, getattr(args, name, None))
    try:
        return Settings.from_env(None, **overrides)
    except ConfigurationError as exc:
        raise CommandError(str(exc), 2) from None


# -- the database -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The database a command talks to, and where its URL came from."""

    url: str | None
    source: str

    def __str__(self) -> str:
        if self.url is None:
            return f"the server the libpq variables name ({self.source})"
        return f"{masked_url(self.url)} (from {self.source})"


async def target(s: Settings, *, announce: bool = True) -> Target:
    """Where ``s`` points; with no URL configured, the embedded server, started (and its
    schema migrated) if needed, saying so on stderr when ``announce``."""
    if s.database_url is not None or s.use_libpq_env:
        return Target(s.database_url, s.database_url_source or "the environment")
    from durable.embedded import EmbeddedServer
    from durable.store import migrate

    server = EmbeddedServer(s.home)
    if announce:
        announce_embedded(server.home)
    url = await anyio.to_thread.run_sync(server.ensure_started)
    where = Target(url, f"the embedded server in {server.home}")
    with connecting(where):
        await migrate(url)
    return where


def announce_embedded(home: Path) -> None:
    # A user who meant to reach their own database must not act on another unawares.
    print(
        f"durable: no database URL set (--database-url, DURABLE_DATABASE_URL, DATABASE_URL, "
        f"PG*): using the embedded server in {home}",
        file=sys.stderr,
    )


@contextmanager
def connecting(where: Target, prefix: str = "") -> Iterator[None]:
    """Turn a failure to connect into one line naming the URL (masked) and its source."""
    try:
        yield
    except (CommandError, ConfigurationError, DurableError):
        raise  # reached the database: what it said is the message
    except Exception as exc:
        from durable.logs import redact

        reason = redact(f"{type(exc).__name__}: {exc}".strip())
        raise CommandError(f"{prefix}cannot connect to {where}: {reason}") from None


@dataclass(frozen=True)
class Session:
    """A command's connection: the client API and the operator API over one pool."""

    client: Client
    admin: Admin
    target: Target


@asynccontextmanager
async def session(args: argparse.Namespace) -> AsyncIterator[Session]:
    # Administrators often run these as a superuser: the sessions search the catalog
    # alone (see PINNED_SESSION).
    from durable.admin import Admin
    from durable.connection import connect
    from durable.store import PINNED_SESSION

    where = await target(settings(args))
    async with AsyncExitStack() as stack:
        with connecting(where):
            client = await stack.enter_async_context(
                connect(where.url, server_settings=PINNED_SESSION)
            )
        yield Session(client, Admin(client.store), where)


def with_session(args: argparse.Namespace, fn: Callable[[Session], Awaitable[T]]) -> T:
    async def main() -> T:
        async with session(args) as s:
            return await fn(s)

    return run(main)


def database_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--database-url",
        help="Postgres URL (default: DURABLE_DATABASE_URL, DURABLE_DATABASE_URL_FILE, "
        "DATABASE_URL, PG* variables, else the embedded server); a password here shows in "
        "process listings: prefer the variable or --database-url-file",
    )
    sp.add_argument(
        "--database-url-file", metavar="PATH",
        help="read the Postgres URL from this file (DURABLE_DATABASE_URL_FILE)",
    )  # fmt: skip


# -- argument types: a bad value exits 2 naming its flag ------------------------------------


def duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30, 30s, 500ms, 5m, 1h or 7d, got {text!r}"
        ) from None
    return seconds


def duration_text(text: str) -> str:
    """A duration checked now and kept as written (it is shown back to the user)."""
    duration(text)
    return text


def positive_duration(text: str) -> float:
    seconds = duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return seconds


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        t = text.strip()
        digits = t[1:] if t.startswith("-") else t
        value = int(t) if digits.isdigit() and digits.isascii() else None
        if value is None or value < low or (high is not None and value > high):
            upper = f" to {high}" if high is not None else " or more"
            raise argparse.ArgumentTypeError(f"expected a whole number {low}{upper}, got {text!r}")
        return value

    parse.__name__ = "whole number"
    return parse


def json_value(what: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CommandError(f"{what} is not JSON: {exc}", 2) from None


def read_text(flag: str, path: str) -> str:
    """The text of ``path`` for ``flag``; ``-`` reads stdin."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CommandError(f"{flag}: cannot read {path!r}: {reason}", 2) from None


# -- output -------------------------------------------------------------------------------


def emit(args: argparse.Namespace, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if getattr(args, "json", False) or not sys.stdout.isatty():
        for row in rows:
            print(json.dumps(row, default=str))
        return
    print(table(rows, columns))


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def progress_words(p: Progress | None) -> str | None:
    """A progress report in a few words: its value and message."""
    if p is None:
        return None
    value = "" if p.value is None else json.dumps(p.value)
    return " ".join(x for x in (value, p.message or "") if x)[:80] or None


def cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, timedelta):
        return f"{v.total_seconds():.1f}s"
    if isinstance(v, list | tuple):
        return ", ".join(map(str, v)) or "-"
    return str(v)


def report(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if getattr(args, "json", False) else text)


def progress(text: str | None) -> None:
    """A progress line on a terminal's stderr, rewritten in place; None ends it."""
    if not sys.stderr.isatty():
        return
    sys.stderr.write("\r\033[K" if text is None else f"\r\033[K{text}")
    sys.stderr.flush()


def confirm(args: argparse.Namespace, action: str) -> None:
    """Ask before acting on many tasks; ``--yes`` skips; off a terminal, refuse."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CommandError(
            f"refusing to {action} without confirmation (stdin is not a terminal): pass --yes", 2
        )
    try:
        answer = input(f"{action[0].upper()}{action[1:]}? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandError("aborted; nothing was changed")


def live_within(s: Settings) -> float:
    """A daemon silent for longer than this is lost: three missed heartbeats. A daemon
    beats every lease/3, and its lease is not recorded, so this takes the lease this
    command is configured with (DURABLE_LEASE, default 30s)."""
    return s.lease

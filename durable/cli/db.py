"""The database: `migrate`, `sql`, `check`, `prune` and the embedded server (`db`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio

from durable.cli.core import (
    CommandError,
    Session,
    Target,
    announce_embedded,
    confirm,
    connecting,
    database_options,
    duration,
    duration_text,
    progress,
    report,
    run,
    session,
    settings,
    target,
    whole,
)
from durable.models import PruneResult
from durable.values import MAX_RETENTION

BATCH = 1000
"""Tasks per statement (and per transaction) of prune."""


def add_commands(sub: Any) -> None:
    m = sub.add_parser("migrate", help="create or upgrade the durable schema")
    database_options(m)
    m.add_argument(
        "--grant", action="append", metavar="ROLE",
        help="then give ROLE what the daemon and clients need: usage on the schema, read and "
        "write on its tables, usage on its sequences, execute on its functions; no create, no "
        "ownership (repeatable; run again after upgrades)",
    )  # fmt: skip
    m.add_argument(
        "--lock-timeout", type=_seconds, default=None, metavar="SECONDS",
        help="how long a migration's statement waits for a table in use before it gives way "
        "to the statements queued behind it, rolls back and tries again (default 2)",
    )  # fmt: skip
    m.add_argument(
        "--lock-wait", type=_seconds, default=None, metavar="SECONDS",
        help="how long to keep trying a migration that gives way before failing (default 120)",
    )  # fmt: skip
    m.set_defaults(func=cmd_migrate)

    s = sub.add_parser("sql", help="print the schema SQL (no connection)")
    s.set_defaults(func=cmd_sql)

    c = sub.add_parser(
        "check", help="health probe: exit 0 if the database answers and the schema is current"
    )
    database_options(c)
    c.add_argument("--timeout", type=_seconds, default=5.0)
    c.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "prune", help="delete finished tasks older than a cutoff, with their event logs",
        description="Deletes tasks that finished (completed, failed or cancelled) more than "
        "--older-than ago, with their events and signals, in batches that each commit on "
        "their own. A workflow's tree goes only once every task in it has finished: no "
        "queued, running or waiting task is ever deleted, nor any part of a tree that still "
        "has one. DURABLE_RETENTION makes the daemon do this by itself.",
    )  # fmt: skip
    database_options(p)
    p.add_argument("--older-than", type=_older_than, required=True, help="e.g. 7d, 12h, 30m")
    p.add_argument("--batch-size", type=whole(1), default=BATCH, help="tasks per statement")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--vacuum", action="store_true",
                   help="then VACUUM the task, event and signal tables (as their owner): "
                   "what keeps their size flat on a server with autovacuum off")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    d = sub.add_parser("db", help="the embedded Postgres server")
    d.add_argument("action", choices=["url", "start", "stop"])
    d.set_defaults(func=cmd_db)


def _seconds(text: str) -> float:
    seconds = duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def _older_than(text: str) -> str:
    if not 0 < duration(duration_text(text)) <= MAX_RETENTION:
        raise argparse.ArgumentTypeError(
            f"expected a positive duration up to 36500d, e.g. 7d, got {text!r}"
        )
    return text


def cmd_migrate(args: argparse.Namespace) -> int:
    s = settings(args)

    async def main() -> list[int]:
        from durable.store import LOCK_TIMEOUT, LOCK_WAIT, grant, migrate

        def waiting(version: int, name: str, waited: float) -> None:
            print(f"migration {version:04d} ({name}) waits for a table in use; trying again"
                  f" ({waited:.1f} s so far)", file=sys.stderr, flush=True)

        where = await target(s)
        with connecting(where):
            applied = await migrate(
                where.url, on_wait=waiting,
                lock_timeout=args.lock_timeout or LOCK_TIMEOUT,
                lock_wait=args.lock_wait or LOCK_WAIT,
            )
        for role in args.grant or ():
            await grant(where.url, role)
        return applied

    applied = run(main)
    print(f"applied migrations: {', '.join(map(str, applied))}" if applied else "schema is current")
    for role in args.grant or ():
        print(f"granted {role!r} what the daemon and clients need (no create, no ownership)")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from durable.store import schema_sql

    sys.stdout.write(schema_sql())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    s = settings(args)

    async def main() -> str:
        from durable.store import (
            PINNED_SESSION,
            connect,
            latest_version,
            missing_tables,
            schema_problem,
            schema_version,
        )

        if s.database_url is None and not s.use_libpq_env:
            from durable.embedded import EmbeddedServer

            server = EmbeddedServer(s.home)
            announce_embedded(server.home)
            url = server.url()
            if url is None:
                raise CommandError("the embedded database is not running")
            where = Target(url, f"the embedded server in {server.home}")
        else:
            where = Target(s.database_url, s.database_url_source or "the environment")
        with connecting(where, "unhealthy: "), anyio.fail_after(args.timeout):
            conn = await connect(where.url, timeout=args.timeout, server_settings=PINNED_SESSION)
        try:
            version = await schema_version(conn)
            # A newer schema is healthy: daemons of this release serve it during a deploy.
            if schema_problem(version) is not None:
                raise CommandError(f"schema version {version}, expected {latest_version()}")
            if version == latest_version() and (missing := await missing_tables(conn)):
                raise CommandError(
                    f"schema version {version} lacks "
                    + ", ".join(f"durable.{t}" for t in missing) + " (dropped by hand?)"
                )
        finally:
            await conn.close()
        return "ok"

    try:
        print(run(main))
    except CommandError:
        raise
    except Exception as exc:
        from durable.logs import redact

        raise CommandError(f"unhealthy: {redact(f'{type(exc).__name__}: {exc}')}") from None
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    older_than = duration(args.older_than)

    if not args.yes:

        async def count() -> int:
            async with session(args) as s:
                return await s.admin.prune_count(older_than)

        n = run(count)
        if n:
            confirm(args, f"delete {n} task(s) that finished more than {args.older_than} "
                    "ago, with their event logs")  # fmt: skip

    def show(done: PruneResult) -> None:
        progress(f"pruned {done.tasks} task(s), {done.events} event(s)")

    async def prune(s: Session) -> PruneResult | None:
        return await s.admin.prune(
            older_than, batch=args.batch_size, progress=show,
            vacuum="on" if args.vacuum else "off",
        )  # fmt: skip

    async def main() -> PruneResult | None:
        async with session(args) as s:
            return await prune(s)

    result = run(main)
    progress(None)
    if result is None:
        raise CommandError("another process is pruning now (a daemon with DURABLE_RETENTION?); "
                           "try again later")  # fmt: skip
    if result.vacuumed is False:
        raise CommandError("pruned, but VACUUM was not run: only the owner of durable's "
                           "tables (or a superuser) may vacuum them; run it as that role")  # fmt: skip
    report(
        args,
        {"tasks": result.tasks, "events": result.events, "signals": result.signals,
         "workers": result.workers, **({"vacuumed": True} if result.vacuumed else {})},
        f"pruned {result.tasks} task(s), {result.events} event(s), {result.signals} signal(s) "
        f"and {result.workers} stopped daemon(s) older than {args.older_than}"
        + (", then vacuumed" if result.vacuumed else ""),
    )  # fmt: skip
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from durable.embedded import EmbeddedServer

    server = EmbeddedServer(settings(None).home)
    if args.action == "url":
        # Only reads: a command that prints where the server is must not start one.
        url = server.url()
        if url is None:
            raise CommandError(
                "the embedded server is not running; start it with `durable db start`"
            )
        print(url)
    elif args.action == "start":
        url = server.ensure_started()

        async def main() -> None:
            from durable.store import migrate

            await migrate(url)

        run(main)
        print(url)
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    return 0

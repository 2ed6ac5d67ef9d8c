"""`durable run`: the daemon, its flags generated from the option table."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from durable.cli.core import CommandError, connecting, run, settings, target
from durable.errors import ConfigurationError
from durable.options import OPTIONS, env_help


def add_commands(sub: Any) -> None:
    r = sub.add_parser(
        "run", help="run the daemon", epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the configured queues until SIGTERM/SIGINT (a second signal "
        "exits at once).",
    )  # fmt: skip
    for option in OPTIONS:
        if option.flag is None:
            continue
        r.add_argument(
            option.flag, dest=option.field, metavar=option.metavar,
            action="append" if option.repeatable else "store",
            help=f"{option.help} ({option.env}; default: {option.shown_default})",
        )  # fmt: skip
    r.add_argument("--burst", action="store_true", help="exit once no work is ready")
    r.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    flags = {o.field: getattr(args, o.field) for o in OPTIONS if o.flag is not None}
    s = settings(None, **flags)
    from durable import logs
    from durable.registry import load

    logs.configure(s.log_level, s.log_format)
    log = logs.get_logger("durable.cli")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--app mymodule` finds modules where it is run
    try:
        registry = load(s.apps)
    except ConfigurationError as exc:
        raise CommandError(str(exc), 2) from None
    if not registry.names():
        log.warning(
            "no_tasks_registered",
            hint="install a package with a 'durable' entry point or pass --app MODULE",
        )

    async def main() -> None:
        from durable.daemon import tune_gc
        from durable.service import serving
        from durable.store import connect, schema_problem, schema_version

        tune_gc()
        where = await target(s, announce=False)
        with connecting(where):
            conn = await connect(where.url)
        try:
            version = await schema_version(conn)
        finally:
            await conn.close()
        if (problem := schema_problem(version)) is not None:
            raise CommandError(problem)
        try:
            async with serving(
                where.url, s, registry, version, burst=args.burst, handle_signals=True
            ) as service:
                await service.wait()
        except Exception:
            # The one-line error on stderr says what; the log keeps the traceback (of every
            # task of the group that failed) for whoever has to find out why.
            log.exception("daemon_failed")
            raise

    run(main)
    return 0

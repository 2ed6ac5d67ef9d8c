"""`durable ui`: the web dashboard, served until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import signal
from typing import Any

from durable.cli.core import CommandError, connecting, database_options, run, settings, target


def add_commands(sub: Any) -> None:
    u = sub.add_parser(
        "ui", help="serve the web dashboard",
        description="Serve the dashboard (overview, tasks, timelines, workers) until "
        "SIGTERM/SIGINT. Read-only unless --token-file or --password-file is given.",
    )  # fmt: skip
    database_options(u)
    u.add_argument("--listen", metavar="HOST:PORT",
                   help="where to listen (DURABLE_UI_LISTEN; default: 127.0.0.1:8080; port 0 "
                   "picks a free port)")  # fmt: skip
    u.add_argument("--token-file", metavar="PATH",
                   help="a file holding the token that signs in and enables actions "
                   "(DURABLE_UI_TOKEN_FILE)")  # fmt: skip
    u.add_argument("--allowed-hosts", metavar="NAMES",
                   help="comma-separated host names to answer to besides localhost, e.g. "
                   "behind a reverse proxy (DURABLE_UI_ALLOWED_HOSTS)")  # fmt: skip
    u.add_argument("--password-file", metavar="PATH",
                   help="as --token-file, for a password (DURABLE_UI_PASSWORD_FILE)")
    u.set_defaults(func=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    from durable import logs
    from durable.errors import DurableError
    from durable.ui.auth import Auth
    from durable.ui.server import UiServer, auth_from, url_of
    from durable.values import host_names, http

    s = settings(args)
    try:
        listen = http("--listen", args.listen) if args.listen is not None else s.ui_listen
        allowed = (
            host_names("--allowed-hosts", args.allowed_hosts)
            if args.allowed_hosts is not None
            else s.ui_allowed_hosts
        )
        if args.token_file is not None and args.password_file is not None:
            raise DurableError("--token-file and --password-file are both given: give one")
        if args.token_file is not None:
            auth: Auth | None = Auth.from_file("--token-file", args.token_file, "token")
        elif args.password_file is not None:
            auth = Auth.from_file("--password-file", args.password_file, "password")
        else:
            auth = auth_from(s)
    except DurableError as exc:
        raise CommandError(str(exc), 2) from None
    logs.configure(s.log_level, s.log_format)

    async def main() -> None:
        import anyio

        from durable.store import connect, schema_problem, schema_version

        where = await target(s)
        with connecting(where):
            conn = await connect(where.url)
        try:
            version = await schema_version(conn)
        finally:
            await conn.close()
        if (problem := schema_problem(version)) is not None:
            raise CommandError(problem)
        host, port = listen
        server = UiServer(host, port, where.url, auth, allowed_hosts=allowed)
        await server.listen()
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            mode = "actions enabled" if auth is not None else "read-only"
            # Handled before the line says it serves: whoever waits for the line may stop
            # it at once, and must see it stop cleanly rather than die of the signal.
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                print(f"dashboard: {url_of(host, server.port)} ({mode})", flush=True)
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break

    run(main)
    return 0

"""The `durable` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import anyio

from durable.errors import ConfigurationError, DurableError
from durable.settings import ENV_VARS, Settings, SettingsError, parse_duration
from durable.validation import InvalidValue


class CommandError(Exception):
    """A one-line error for the user; exits with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(fn, backend_options={"use_uvloop": True})


def _settings(args: argparse.Namespace | None = None, **extra: object) -> Settings:
    overrides: dict[str, object] = dict(extra)
    if args is not None:
        for name in ("database_url", "database_url_file"):
            overrides[name] = getattr(args, name, None)
    try:
        return Settings.from_env(None, **overrides)
    except SettingsError as exc:
        raise CommandError(str(exc), 2) from None


async def _dsn(settings: Settings) -> str | None:
    if settings.database_url is not None or settings.use_libpq_env:
        return settings.database_url
    from durable.embedded import EmbeddedServer
    from durable.store import migrate

    url = await anyio.to_thread.run_sync(EmbeddedServer(settings.home).ensure_started)
    await migrate(url)
    return url


def _emit(args: argparse.Namespace, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if getattr(args, "json", False) or not sys.stdout.isatty():
        for row in rows:
            print(json.dumps(row, default=str))
        return
    print(_table(rows, columns))


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, timedelta):
        return f"{v.total_seconds():.1f}s"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return str(v)


# -- commands ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(
        None,
        database_url=args.database_url,
        database_url_file=args.database_url_file,
        listen_url=args.listen_url,
        queues=args.queues,
        concurrency=args.concurrency,
        poll_interval=args.poll_interval,
        lease=args.lease,
        claim_ahead=args.claim_ahead,
        shutdown_grace=args.shutdown_grace,
        log_level=args.log_level,
        log_format=args.log_format,
        apps=args.app or None,
        http=args.http,
        retention=args.retention,
    )
    from durable import logs
    from durable.registry import load

    logs.configure(settings.log_level, settings.log_format)
    log = logs.get_logger("durable.cli")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--app mymodule` finds modules where it is run
    try:
        registry = load(settings.apps)
    except ConfigurationError as exc:
        raise CommandError(str(exc), 2) from None
    if not registry.names():
        log.warning(
            "no_tasks_registered",
            hint="install a package with a 'durable' entry point or pass --app MODULE",
        )

    async def main() -> None:
        from durable.daemon import Daemon, tune_gc
        from durable.store import connect, latest_version, schema_version

        tune_gc()

        dsn = await _dsn(settings)
        conn = await connect(dsn)
        try:
            version = await schema_version(conn)
        finally:
            await conn.close()
        if version != latest_version():
            raise CommandError(
                f"the database schema is at version {version or 'none'}, this durable needs "
                f"{latest_version()}: run `durable migrate`"
            )
        listen = settings.listen_url or dsn
        daemon = Daemon(settings, registry, dsn, listen_dsn=listen, burst=args.burst)
        try:
            await daemon.run(handle_signals=True)
        except Exception:
            # The one-line error on stderr says what; the log keeps the traceback (of every
            # task of the group that failed) for whoever has to find out why.
            log.exception("daemon_failed")
            raise

    _run(main)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def main() -> list[int]:
        from durable.store import grant, migrate

        dsn = await _dsn(settings)
        applied = await migrate(dsn)
        for role in args.grant or ():
            await grant(dsn, role)
        return applied

    applied = _run(main)
    print(f"applied migrations: {', '.join(map(str, applied))}" if applied else "schema is current")
    for role in args.grant or ():
        print(f"granted {role!r} what the daemon and clients need (no create, no ownership)")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from durable.store import schema_sql

    sys.stdout.write(schema_sql())
    return 0


def _client(dsn: str | None) -> AbstractAsyncContextManager[Any]:
    """A client for a command: its sessions search the catalog alone (an administrator
    runs these, often as a superuser; see PINNED_SESSION)."""
    from durable.client import connect
    from durable.store import PINNED_SESSION

    return connect(dsn, server_settings=PINNED_SESSION)


def _with_client(args: argparse.Namespace, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    settings = _settings(args)

    async def main() -> Any:
        async with _client(await _dsn(settings)) as client:
            return await fn(client)

    return _run(main)


def _json_arg(text: str | None, what: str, default: Any) -> Any:
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CommandError(f"{what} is not JSON: {exc}", 2) from None


def cmd_start(args: argparse.Namespace) -> int:
    call_args = _json_arg(args.args, "ARGS", [])
    if not isinstance(call_args, list):
        call_args = [call_args]
    kwargs = _json_arg(args.kwargs, "--kwargs", {})
    if not isinstance(kwargs, dict):
        raise CommandError("--kwargs must be a JSON object", 2)
    delay = parse_duration(args.delay) if args.delay else None

    async def go(client: Any) -> Any:
        handle = await client.start(
            args.name, *call_args, queue=args.queue, priority=args.priority, delay=delay,
            idempotency_key=args.idempotency_key, **kwargs,
        )
        print(handle.id, flush=True)
        if args.wait:
            timeout = parse_duration(args.timeout) if args.timeout else None
            result = await handle.result(timeout=timeout)
            print(json.dumps(result))
        return handle.id

    _with_client(args, go)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    since = None
    if args.since:
        since = datetime.now(UTC) - timedelta(seconds=parse_duration(args.since))

    async def go(client: Any) -> Any:
        return await client.store.list_tasks(
            status=args.status, queue=args.queue, name=args.name, since=since, limit=args.limit
        )

    rows = [dict(r) for r in _with_client(args, go)]
    _emit(args, rows, ["id", "queue", "name", "kind", "status", "attempt", "created_at", "finished_at"])
    return 0


def _act(args: argparse.Namespace, what: str) -> int:
    async def go(client: Any) -> Any:
        if what == "retry":
            return await client.retry(args.id)
        if what == "replay":
            return await client.replay(args.id)
        if what == "fork":
            return await client.fork(args.id, args.at)
        return await client.cancel(args.id)

    out = _with_client(args, go)
    if what == "cancel":
        if out.finished is not None:
            raise CommandError(f"task {args.id} had already finished ({out.finished})")
        if not out:
            raise CommandError(f"task {args.id} does not exist")
        print(f"cancelled {len(out.cancelled)} task(s): {', '.join(map(str, out.cancelled))}")
    else:
        print(f"task {args.id} queued again ({what}), branch {out}")
    return 0


def cmd_event(args: argparse.Namespace) -> int:
    payload = _json_arg(args.payload, "PAYLOAD", None)

    async def go(client: Any) -> Any:
        return await client.send_event(args.id, args.name, payload)

    if not _with_client(args, go):
        raise CommandError(f"task {args.id} does not exist or has finished; event not sent")
    print(f"event {args.name!r} sent to task {args.id}")
    return 0


def cmd_queues(args: argparse.Namespace) -> int:
    if getattr(args, "action", "list") == "set":
        from durable.limits import cmd_queues_set

        return cmd_queues_set(args, _with_client)

    from durable.operator import LIVE_WITHIN

    async def go(client: Any) -> Any:
        return (await client.store.queue_stats(), await client.store.list_workers(1000),
                await client.store.queue_limits(), await client.store.unserved_names(LIVE_WITHIN))

    stats, workers, limits, unserved = _with_client(args, go)
    now = datetime.now(UTC)
    by_queue: dict[str, dict[str, Any]] = {}
    for r in stats:
        q = by_queue.setdefault(r["queue"], {"queue": r["queue"], "oldest_ready_s": None})
        q[r["status"]] = r["count"]
        if r["oldest_ready"] is not None:
            q["oldest_ready_s"] = round((now - r["oldest_ready"]).total_seconds(), 1)
    for w in workers:
        if w["stopped_at"] is None and w["silence"].total_seconds() < 120:
            for q in json.loads(w["queues"]):
                entry = by_queue.setdefault(q, {"queue": q, "oldest_ready_s": None})
                entry["daemons"] = entry.get("daemons", 0) + 1
    from durable.limits import describe_rate

    for lim in limits:
        entry = by_queue.setdefault(lim["name"], {"queue": lim["name"], "oldest_ready_s": None})
        entry["limit"] = lim["concurrency"]
        entry["rate"] = describe_rate(lim["rate_limit"], lim["rate_period"])
    for u in unserved:  # queued names that no live daemon has the code for
        entry = by_queue.setdefault(u["queue"], {"queue": u["queue"], "oldest_ready_s": None})
        entry["unserved"] = list(u["names"])
    rows = sorted(by_queue.values(), key=lambda r: r["queue"])
    _emit(args, rows, ["queue", "queued", "running", "waiting", "completed", "failed",
                       "cancelled", "oldest_ready_s", "daemons", "limit", "rate", "unserved"])
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from durable.embedded import EmbeddedServer

    settings = _settings(None)
    server = EmbeddedServer(settings.home)
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

        _run(main)
        print(url)
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    settings = _settings(args)
    selected = list(args.workloads) or ["throughput", "latency", "workflows"]

    async def main() -> int:
        from durable import bench, logs
        from durable.daemon import tune_gc

        logs.configure("warning", "console")
        tune_gc()  # the daemons it runs in this process are tuned as `durable run` is
        server = await _dsn(settings)
        if server is None:
            raise CommandError("durable bench needs a database URL (it creates scratch databases)")
        return await bench.run(
            server, selected, n=args.tasks, concurrency=args.concurrency, as_json=args.json,
            latency_n=args.latency_tasks, rate=args.rate, workflows_n=args.workflows,
            steps=args.steps, uneven=args.uneven, history=args.history, queued=args.queued,
            scheduled=args.scheduled, queue_limit=args.queue_limit,
        )

    return int(_run(main))


def cmd_demo(args: argparse.Namespace) -> int:
    from durable.demo import run_demo

    return run_demo(_settings(None))


# -- parser -------------------------------------------------------------------------------


def _env_help() -> str:
    lines = ["environment variables (flags override them):"]
    for var, default, desc in ENV_VARS:
        lines.append(f"  {var:<24} {desc} [default: {default}]")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="durable",
        description="Durable execution for Python asyncio that lives entirely in Postgres.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def db_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--database-url", help="Postgres URL (default: DURABLE_DATABASE_URL, "
                        "DURABLE_DATABASE_URL_FILE, DATABASE_URL, PG* variables, else the "
                        "embedded server); a password here shows in process listings: prefer "
                        "the variable or --database-url-file")
        sp.add_argument("--database-url-file", metavar="PATH",
                        help="read the Postgres URL from this file (DURABLE_DATABASE_URL_FILE)")

    r = sub.add_parser(
        "run", help="run the daemon", epilog=_env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the configured queues until SIGTERM/SIGINT (a second signal "
        "exits at once).",
    )
    db_opt(r)
    r.add_argument("--listen-url", help="direct URL for LISTEN (DURABLE_LISTEN_URL)")
    r.add_argument("--queues", help="queues and concurrency, e.g. orders=8,email=32 (DURABLE_QUEUES)")
    r.add_argument("--concurrency", help="default concurrency per queue (DURABLE_CONCURRENCY)")
    r.add_argument("--poll-interval", help="fallback poll interval (DURABLE_POLL_INTERVAL)")
    r.add_argument("--lease", help="task lease duration (DURABLE_LEASE)")
    r.add_argument("--claim-ahead", help="auto, or tasks to claim beyond free slots (DURABLE_CLAIM_AHEAD)")
    r.add_argument("--shutdown-grace", help="grace period on shutdown (DURABLE_SHUTDOWN_GRACE)")
    r.add_argument("--log-level", help="debug, info, warning, error (DURABLE_LOG_LEVEL)")
    r.add_argument("--log-format", help="auto, json, console (DURABLE_LOG_FORMAT)")
    r.add_argument("--app", action="append", help="module to import for its tasks (DURABLE_APP); repeatable")
    r.add_argument("--http", help="serve /healthz, /readyz, /metrics on host:port (DURABLE_HTTP)")
    r.add_argument("--retention", help="prune finished tasks older than this (DURABLE_RETENTION)")
    r.add_argument("--burst", action="store_true", help="exit once no work is ready")
    r.set_defaults(func=cmd_run)

    m = sub.add_parser("migrate", help="create or upgrade the durable schema")
    db_opt(m)
    m.add_argument(
        "--grant", action="append", metavar="ROLE",
        help="then give ROLE what the daemon and clients need: usage on the schema, read and "
        "write on its tables, usage on its sequences, execute on its functions; no create, no "
        "ownership (repeatable; run again after upgrades)",
    )
    m.set_defaults(func=cmd_migrate)

    s = sub.add_parser("sql", help="print the schema SQL (no connection)")
    s.set_defaults(func=cmd_sql)

    st = sub.add_parser("start", help="start a task or workflow by name")
    db_opt(st)
    st.add_argument("name")
    st.add_argument("args", nargs="?", help="JSON array of arguments (or one JSON value)")
    st.add_argument("--kwargs", help="JSON object of keyword arguments")
    st.add_argument("--queue")
    st.add_argument("--priority", type=int)
    st.add_argument("--delay", help="start after this long, e.g. 30s")
    st.add_argument("--idempotency-key")
    st.add_argument("--wait", action="store_true", help="wait for the result and print it")
    st.add_argument("--timeout", help="with --wait: give up after this long")
    st.set_defaults(func=cmd_start)

    ls = sub.add_parser("ls", help="list tasks")
    db_opt(ls)
    ls.add_argument("--status", choices=["queued", "running", "waiting", "completed", "failed", "cancelled"])
    ls.add_argument("--queue")
    ls.add_argument("--name")
    ls.add_argument("--since", help="created within this long, e.g. 1h")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    from durable import operator  # show, retry, cancel, workers, check, prune

    operator.add_commands(sub, db_opt)

    a = sub.add_parser("replay", help="run a finished workflow again from nothing, on a new branch")
    db_opt(a)
    a.add_argument("id", type=int)
    a.set_defaults(func=lambda ns: _act(ns, "replay"))

    f = sub.add_parser("fork", help="run a finished workflow again from position N on a new branch")
    db_opt(f)
    f.add_argument("id", type=int)
    f.add_argument("--at", type=int, required=True, help="keep events 0..N-1, re-run from N")
    f.set_defaults(func=lambda ns: _act(ns, "fork"))

    e = sub.add_parser("event", help="send an event to a workflow")
    db_opt(e)
    e.add_argument("id", type=int)
    e.add_argument("name")
    e.add_argument("payload", nargs="?", help="JSON payload")
    e.set_defaults(func=cmd_event)

    q = sub.add_parser(
        "queues", help="queue depths, limits and serving daemons; `queues set` sets limits"
    )
    db_opt(q)
    q.add_argument("action", nargs="?", choices=["list", "set"], default="list")
    q.add_argument("name", nargs="?", help="with set: the queue")
    q.add_argument("--concurrency", help="with set: most tasks running at once across all "
                   "daemons, or 'none'")
    q.add_argument("--rate", help="with set: most starts per period across all daemons, e.g. "
                   "20/1s, or 'none'")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_queues)

    from durable.limits import add_commands

    add_commands(sub, db_opt)

    from durable.soak import add_command as add_soak

    add_soak(sub)

    d = sub.add_parser("db", help="the embedded Postgres server")
    d.add_argument("action", choices=["url", "start", "stop"])
    d.set_defaults(func=cmd_db)

    b = sub.add_parser(
        "bench", help="measure throughput, latency, workflows, backlog and scale",
        description="Runs each workload in a scratch database it creates on the server "
        "and drops afterwards; every run checks its own count.",
    )
    db_opt(b)
    b.add_argument("workloads", nargs="*", choices=["throughput", "latency", "floor", "workflows",
                                                     "backlog", "scale", []],
                   help="default: throughput latency workflows; floor runs the latency "
                   "schedule on a minimal queue with no guarantees, for comparison")
    b.add_argument("--tasks", type=int, default=20000, help="tasks for throughput and scale")
    b.add_argument("--concurrency", type=int, default=32)
    b.add_argument("--latency-tasks", type=int, default=500, help="latency and floor: tasks")
    b.add_argument("--rate", type=float, default=100.0,
                   help="latency and floor: enqueues per second")
    b.add_argument("--workflows", type=int, default=2000)
    b.add_argument("--steps", type=int, default=3)
    b.add_argument("--uneven", action="store_true", help="each step sleeps a random 0-2 ms")
    b.add_argument("--history", type=int, default=1_000_000, help="backlog: finished tasks")
    b.add_argument("--queued", type=int, default=100_000, help="backlog: queued tasks")
    b.add_argument("--scheduled", type=int, default=0,
                   help="backlog: tasks scheduled for tomorrow, ahead of the queued ones")
    b.add_argument("--queue-limit", type=int, help="throughput: set a fleet-wide concurrency "
                   "limit on the bench queue (e.g. far above --concurrency: not binding)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    dm = sub.add_parser("demo", help="see durable work in a few seconds (embedded server)")
    dm.set_defaults(func=cmd_demo)
    return p


def _fail(message: str, code: int) -> NoReturn:
    from durable.logs import redact

    print(f"durable: {redact(message)}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except CommandError as exc:
        _fail(str(exc), exc.code)
    except (SettingsError, InvalidValue) as exc:
        _fail(str(exc), 2)
    except (DurableError, ValueError) as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", 1)
    raise SystemExit(code)

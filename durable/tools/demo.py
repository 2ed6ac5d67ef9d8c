"""`durable demo`: see durable work in seconds, on the embedded server.

Part one runs tasks in a daemon inside this process, one failing twice before it
succeeds. Part two tells the seed's story: an order workflow whose worker process is
killed right after charging the card; a second worker resumes it and the event log
shows the card was charged once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import anyio

import durable
from durable.settings import Settings

CRASH_VARIABLE = "DURABLE_DEMO_CRASH_AFTER_CHARGE"

SETUP = """
create schema if not exists durable_demo;
create table if not exists durable_demo.charges (
    order_id text not null, amount integer not null, at timestamptz not null default now());
create table if not exists durable_demo.reservations (
    order_id text primary key, sku text not null, at timestamptz not null default now());
"""


@durable.task(name="demo.greet")
async def greet(name: str) -> str:
    return f"hello, {name}"


@durable.task(
    name="demo.flaky", max_attempts=5, retry=durable.RetryPolicy(base=0.2, jitter=0)
)
async def flaky(label: str) -> str:
    from durable.logs import get_logger

    # Fails on its first two attempts in this process, then succeeds.
    raise_count = _FLAKY_FAILURES.setdefault(label, 0)
    if raise_count < 2:
        _FLAKY_FAILURES[label] = raise_count + 1
        get_logger("durable.tools.demo").info("demo_flaky_failing", label=label)
        raise ConnectionError(f"{label}: the payment gateway timed out (on purpose)")
    return f"{label} succeeded after {raise_count} failures"


_FLAKY_FAILURES: dict[str, int] = {}


# The database the demo's own tables live in. Configuration, never an argument: a task's
# arguments are stored and shown (`durable show`), and a URL may hold a password.
_database: str | None = None


async def _demo_database() -> str | None:
    if _database is not None:
        return _database
    from durable.connection import resolve_dsn

    return await resolve_dsn()  # a worker process: DURABLE_DATABASE_URL, as it was given


async def charge_card(order_id: str, amount: int) -> dict[str, Any]:
    from durable.store import connect

    conn = await connect(await _demo_database())
    try:
        await conn.execute(
            "insert into durable_demo.charges (order_id, amount) values ($1, $2)",
            order_id,
            amount,
        )
    finally:
        await conn.close()
    return {"charged": amount, "order": order_id}


async def reserve(conn: Any, order_id: str, sku: str) -> str:
    await conn.execute(
        "insert into durable_demo.reservations (order_id, sku) values ($1, $2)", order_id, sku
    )
    return f"reserved {sku}"


@durable.task(name="demo.send_email")
async def send_email(to: str, body: str) -> str:
    return f"sent {body!r} to {to}"


@durable.workflow(name="demo.fulfill", max_attempts=5)
async def fulfill(ctx: durable.Context, order_id: str) -> dict[str, Any]:
    charge = await ctx.step("charge", charge_card, order_id, 4200)
    if os.environ.get(CRASH_VARIABLE):
        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies right after the charge
    reservation = await ctx.transaction("reserve", reserve, order_id, "sku-42")
    receipt = await ctx.run(send_email, "buyer@example.com", f"order {order_id} is on its way")
    return {"charge": charge, "reservation": reservation, "receipt": receipt}


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(settings: Settings) -> int:
    return int(anyio.run(_demo, settings, backend_options={"use_uvloop": True}))


async def _demo(settings: Settings) -> int:
    global _database
    from durable import logs
    from durable.daemon import Daemon
    from durable.registry import registry
    from durable.store import connect, migrate

    logs.configure("error", "console")
    dsn = settings.database_url
    if dsn is None and not settings.use_libpq_env:
        from durable.embedded import EmbeddedServer

        server = EmbeddedServer(settings.home)
        _say("starting the embedded Postgres server (the first time takes a few seconds)...")
        dsn = await anyio.to_thread.run_sync(server.ensure_started)
    await migrate(dsn)
    _database = dsn
    conn = await connect(dsn)
    try:
        await conn.execute(SETUP)
    finally:
        await conn.close()
    _say(f"database: {logs.redact(dsn or '(from PG* variables)')}\n")

    # Part one: tasks, with a retry.
    _say("== tasks: three greetings and one flaky task that fails twice, then succeeds")
    run_settings = Settings.from_env({}, poll_interval="1", lease="10", home=settings.home)
    daemon = Daemon(run_settings, registry, dsn)
    async with durable.connect(dsn) as client:
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            handles = [await client.start(greet, n) for n in ("Ada", "Grace", "Edsger")]
            handles.append(await client.start(flaky, "charge-batch"))
            for h in handles:
                result = await h.result(timeout=30)
                info = await client.get(h.id)
                _say(f"  task {h.id:<5} {info.name:<12} attempt {info.attempt}  -> {result}")
            daemon.stop()

        # Part two: the order workflow, its worker killed right after the charge.
        order = f"order-{os.getpid()}"
        _say("\n== workflow demo.fulfill: charge card -> reserve inventory (transaction) -> email")
        handle = await client.start(fulfill, order)
        _say(f"  started workflow {handle.id}; worker 1 will be killed right after the charge")
        env = {**os.environ, CRASH_VARIABLE: "1", "DURABLE_DATABASE_URL": dsn or "",
               "DURABLE_LEASE": "2", "DURABLE_POLL_INTERVAL": "1", "DURABLE_LOG_LEVEL": "error"}
        worker = await anyio.run_process(
            [sys.executable, "-m", "durable", "run", "--app", "durable.tools.demo"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )
        _say(f"  worker 1 died with signal {-worker.returncode}")
        _say("  worker 2 starts; it takes the workflow over once worker 1's lease expires")
        daemon2 = Daemon(Settings.from_env({}, poll_interval="1", lease="2"), registry, dsn)
        async with anyio.create_task_group() as tg:
            await tg.start(daemon2.run)
            result = await handle.result(timeout=60)
            daemon2.stop()
        _say(f"  result: {json.dumps(result)}")
        info = await client.get(handle.id)
        _say(f"  status {info.status}, attempt {info.attempt} of {info.max_attempts}\n")
        _say("  event log:")
        for e in await client.history(handle.id):
            outcome = f"child {e.child_id} {e.child_status}" if e.kind == "child" else e.status
            _say(f"    {e.seq}  {e.kind:<12} {e.name:<16} attempt {e.attempt}  {outcome}")
        conn = await connect(dsn)
        try:
            charges = await conn.fetchval(
                "select count(*) from durable_demo.charges where order_id = $1", order
            )
            reservations = await conn.fetchval(
                "select count(*) from durable_demo.reservations where order_id = $1", order
            )
        finally:
            await conn.close()
        _say(f"\n  the card was charged {charges} time(s); inventory reserved {reservations} time(s)")
        _say(f"  see it again with: durable show {handle.id}")
        return 0 if charges == 1 and reservations == 1 else 1

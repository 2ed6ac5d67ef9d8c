"""Test support: an in-process daemon, a subprocess daemon, and waiting on conditions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg

import durable
from durable.daemon import Daemon
from durable.models import Checkpoint
from durable.registry import Registry
from durable.settings import Settings
from durable.store import Store

ROOT = Path(__file__).resolve().parents[2]


BASE = {"poll_interval": "1", "lease": "5", "shutdown_grace": "5"}
"""What the tests' daemons run with unless told otherwise: short polls, leases and grace."""


def settings(**overrides: object) -> Settings:
    return Settings.from_env({}, **{**BASE, **overrides})


@asynccontextmanager
async def running_daemon(
    dsn: str,
    *,
    reg: Registry | None = None,
    **overrides: object,
) -> AsyncIterator[Daemon]:
    """A daemon serving in this event loop until the block ends (then stopped gracefully)."""
    options: dict[str, Any] = {**BASE, **overrides}
    async with durable.serve(dsn, registry=reg, env={}, **options) as service:
        yield service.daemon


async def run_burst(dsn: str, *, reg: Registry | None = None, **overrides: object) -> Daemon:
    """Run a daemon until no work is ready and nothing is running."""
    options: dict[str, Any] = {**BASE, **overrides}
    async with durable.serve(dsn, registry=reg, env={}, burst=True, **options) as service:
        await service.wait()
    return service.daemon


async def wait_for(
    check: Callable[[], Awaitable[Any]], *, timeout: float = 20.0, interval: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something truthy (a database condition, not a sleep
    standing in for synchronisation); fails the test after ``timeout``."""
    with anyio.fail_after(timeout):
        while True:
            value = await check()
            if value:
                return value
            await anyio.sleep(interval)


async def fetchval(dsn: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def execute(dsn: str, query: str, *args: Any) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


def daemon_env(dsn: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DURABLE_", "PG"))}
    env.pop("DATABASE_URL", None)
    env.update(
        {
            "DURABLE_DATABASE_URL": dsn,
            "DURABLE_LOG_FORMAT": "json",
            "DURABLE_POLL_INTERVAL": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra)
    return env


def spawn_daemon(dsn: str, app: str, *args: str, log: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
    """``durable run --app APP`` in a subprocess (killed with the test)."""
    if log is None:
        return subprocess.Popen(
            [sys.executable, "-m", "durable", "run", "--app", app, *args],
            cwd=ROOT, env=daemon_env(dsn, **env), stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "durable", "run", "--app", app, *args],
            cwd=ROOT, env=daemon_env(dsn, **env), stdout=out, stderr=subprocess.STDOUT,
        )


def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)


def durable_cli(*args: str, dsn: str | None = None, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the `durable` CLI as a user would; returns the completed process."""
    e = daemon_env(dsn, **env) if dsn is not None else {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "durable", *args],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def published(dsn: str, name: str, timeout: float = 20.0) -> None:
    """Wait until a daemon has published ``name`` in the catalog (a start by name from a
    process without its code resolves through it)."""

    async def check() -> bool:
        return bool(await fetchval(
            dsn, "select exists (select 1 from durable.definitions where name = $1)", name
        ))  # fmt: skip

    await wait_for(check, timeout=timeout)


async def wait_status(dsn: str, task_id: int, *statuses: str, timeout: float = 20.0) -> str:
    """Wait until the task's status is one of ``statuses``; returns it."""

    async def check() -> str | None:
        status = await fetchval(dsn, "select status from durable.tasks where id = $1", task_id)
        return status if status in statuses else None

    return str(await wait_for(check, timeout=timeout))



def spawn_daemon_logged(
    dsn: str, app: str, log: Path, *args: str, **env: str
) -> subprocess.Popen[bytes]:
    """``spawn_daemon`` writing stdout and stderr to ``log``."""
    return spawn_daemon(dsn, app, *args, log=log, **env)


async def blocked_or_done(
    probe: asyncpg.Connection, pid: int, pending: asyncio.Future[Any], *, timeout: float = 20.0
) -> bool:
    """Wait until the session ``pid`` waits on a heavyweight lock (True) or ``pending``, the
    statement it runs, has finished (False). A state of the server, never a guessed delay:
    a change that removes the wait must not hang the test."""

    async def check() -> str | None:
        if pending.done():
            return "done"
        waiting = await probe.fetchval(
            "select wait_event_type = 'Lock' from pg_stat_activity where pid = $1", pid
        )
        return "blocked" if waiting else None

    outcome: str = await wait_for(check, timeout=timeout, interval=0.005)
    return outcome == "blocked"


@contextmanager
def reaped(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Kill whatever of ``procs`` still runs when the block ends (the list may grow
    inside it, as daemons are replaced)."""
    try:
        yield
    finally:
        for proc in procs:
            kill(proc)
            proc.wait(timeout=30)


async def exited(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """Wait until ``proc`` has exited; its return code."""

    async def done() -> bool:
        return proc.poll() is not None

    await wait_for(done, timeout=timeout)
    assert proc.returncode is not None
    return proc.returncode


async def statuses_in(dsn: str, ids: list[int], *wanted: str, timeout: float = 30) -> None:
    """Wait until every task of ``ids`` is in one of the ``wanted`` statuses."""

    async def there() -> bool:
        found = await fetchval(
            dsn, "select array_agg(status::text) from durable.tasks where id = any($1)", ids
        )
        return all(s in wanted for s in found)

    await wait_for(there, timeout=timeout)


async def holder_pid(dsn: str, task_id: int) -> int:
    """The process id of the daemon whose worker holds (or last held) ``task_id``."""
    pid: int = await fetchval(
        dsn, "select w.pid from durable.tasks t join durable.workers w"
        " on w.id = t.worker_id where t.id = $1", task_id,
    )  # fmt: skip
    return pid


class DirectCheckpoints:
    """A checkpoint writer that writes each checkpoint in a statement of its own (the
    daemon group-commits them): for tests that run workflow attempts by hand."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def submit(self, cp: Checkpoint) -> bool:
        return not await self.store.checkpoint_many([cp])  # none refused


def logged(path: Path, event: str) -> list[dict[str, object]]:
    """The JSON log records of ``event`` in the log file at ``path``."""
    found = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


def fetch_text(url: str) -> str:
    """The body of a GET of ``url`` (a daemon's probe), as text."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())

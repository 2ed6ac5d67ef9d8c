"""A daemon whose listener is refused on reconnecting, with errors that are not blips (its
CONNECT privilege revoked: 42501; its login taken away: 28000), keeps retrying, says so
on /readyz, lets its running task finish, and serves again once the refusal ends."""

from __future__ import annotations

import json
import secrets
import socket
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import durable
from durable.store import grant, quote_ident
from tests.apps.secret_tasks import QUEUE, sec_echo, sec_fail_once_told
from tests.support.helpers import execute, fetchval, kill, spawn_daemon_logged, wait_for
from tests.support.roles import as_app, literal

PASSWORD = "reconnect-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def as_role(dsn: str, role: str) -> str:
    url = as_app(dsn, PASSWORD)
    parts = urlsplit(url)
    return url.replace(f"{parts.username}:", f"{role}:", 1)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("refusal", ["revoke_connect", "nologin"])
async def test_a_refused_reconnect_is_retried_and_the_daemon_serves_on(
    dsn: str, tmp_path: Path, refusal: str
) -> None:
    role = f"durable_rc_{secrets.token_hex(4)}"
    ident = quote_ident(role)
    database = quote_ident(urlsplit(dsn).path.lstrip("/"))
    await execute(dsn, f"create role {ident} login password {literal(PASSWORD)}")
    await grant(dsn, role)
    port = free_port()
    log = tmp_path / "daemon.log"
    proc = spawn_daemon_logged(
        as_role(dsn, role), "tests.apps.secret_tasks", log, DURABLE_QUEUES=QUEUE,
        DURABLE_HTTP=f"127.0.0.1:{port}", DURABLE_POLL_INTERVAL="0.5",
    )  # fmt: skip
    refuse, allow = {
        "revoke_connect": (f"revoke connect on database {database} from public",
                           f"grant connect on database {database} to public"),
        "nologin": (f"alter role {ident} nologin", f"alter role {ident} login"),
    }[refusal]
    try:
        async with durable.connect(dsn) as client:

            async def listening() -> int | None:
                return await fetchval(  # type: ignore[no-any-return]
                    dsn, "select pid from pg_stat_activity where usename = $1"
                    " and query like 'LISTEN%'", role,
                )  # fmt: skip

            first = await wait_for(listening, timeout=30)
            await execute(dsn, refuse)
            await execute(dsn, "select pg_terminate_backend($1)", first)

            async def unready() -> dict[str, Any] | None:
                status, body = readyz(port)
                return body if status == 503 and "listener_error" in body else None

            body = await wait_for(unready, timeout=30)
            assert not body["listener"]
            assert proc.poll() is None  # not a blip, and still no reason to exit
            # Work started meanwhile is served by polling on the pool's connections.
            handle = await client.start(sec_echo, "during")
            assert await handle.result(timeout=30) == "during"

            await execute(dsn, allow)

            async def listening_again() -> bool:
                pid = await listening()
                return pid is not None and pid != first

            await wait_for(listening_again, timeout=30)
            assert await (await client.start(sec_echo, "after")).result(timeout=30) == "after"
            assert proc.poll() is None
    finally:
        kill(proc)
        proc.wait(timeout=30)
        await execute(dsn, allow)
        await execute(dsn, f"drop owned by {ident}")
        await execute(dsn, f"drop role if exists {ident}")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_an_outcome_refused_for_a_moment_is_written_once_logins_return(
    dsn: str, tmp_path: Path
) -> None:
    """The failure of an attempt is written through a refusal of logins, rather than lost
    to an error log and a lease left to expire."""
    role = f"durable_ow_{secrets.token_hex(4)}"
    ident = quote_ident(role)
    await execute(dsn, f"create role {ident} login password {literal(PASSWORD)}")
    await grant(dsn, role)
    log = tmp_path / "daemon.log"
    signal = tmp_path / "fail-now"
    proc = spawn_daemon_logged(
        as_role(dsn, role), "tests.apps.secret_tasks", log, DURABLE_QUEUES=QUEUE,
    )  # fmt: skip
    try:
        async with durable.connect(dsn) as client:
            handle = await client.start(sec_fail_once_told, str(signal))

            async def running() -> bool:
                return (await client.get(handle.id)).status == "running"

            await wait_for(running, timeout=30)
            await execute(dsn, f"alter role {ident} nologin")
            await execute(
                dsn, "select pg_terminate_backend(pid) from pg_stat_activity where usename = $1",
                role,
            )  # fmt: skip
            signal.touch()

            async def refused() -> bool:
                return "outcome_write_retrying" in log.read_text()

            await wait_for(refused, timeout=30)
            await execute(dsn, f"alter role {ident} login")

            async def ended() -> bool:
                return (await client.get(handle.id)).status == "failed"

            await wait_for(ended, timeout=60)
            task = await client.get(handle.id)
            assert task.attempt == 2
            assert proc.poll() is None
        events = [json.loads(line) for line in log.read_text().splitlines()
                  if line.startswith("{")]  # fmt: skip
        names = [e["event"] for e in events]
        assert "runner_error" not in names
        assert "task_outcome_not_written" not in names
        retrying = [e for e in events if e["event"] == "task_retrying"]
        assert [e["attempt"] for e in retrying] == [1]
        assert "RuntimeError" in retrying[0]["error"]
    finally:
        kill(proc)
        proc.wait(timeout=30)
        await execute(dsn, f"alter role {ident} login")
        await execute(dsn, f"drop owned by {ident}")
        await execute(dsn, f"drop role if exists {ident}")

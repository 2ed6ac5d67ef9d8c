"""The systemd watchdog is fed only while the daemon's heartbeats reach Postgres."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import anyio
import pytest

from tests.support.helpers import running_daemon, wait_for


async def next_message(sock: socket.socket, timeout: float = 10) -> str:
    with anyio.fail_after(timeout):
        return (await asyncio.get_running_loop().sock_recv(sock, 4096)).decode()


def drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(4096)
        except BlockingIOError:
            return


async def test_watchdog_pings_stop_while_heartbeats_fail_and_resume_after(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        async with running_daemon(dsn, lease="1") as daemon:
            while "WATCHDOG=1" not in await next_message(sock):
                pass
            assert daemon.ready.is_set() and daemon.healthy
            store = daemon.store
            assert store is not None
            real = store.worker_heartbeat

            async def unreachable(*_args: object) -> None:
                raise OSError("connection refused")

            monkeypatch.setattr(store, "worker_heartbeat", unreachable)

            async def unhealthy() -> bool:
                return not daemon.healthy

            await wait_for(unhealthy, timeout=10)
            drain(sock)
            # Six ping intervals without a ping: systemd would restart this daemon.
            with anyio.move_on_after(0.3):
                message = await next_message(sock)
                pytest.fail(f"pinged while unhealthy: {message!r}")

            monkeypatch.setattr(store, "worker_heartbeat", real)
            while "WATCHDOG=1" not in await next_message(sock):
                pass
            assert daemon.healthy

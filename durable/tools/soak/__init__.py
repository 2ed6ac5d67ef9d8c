"""``durable soak``: run daemons, producers and faults for a while, then prove nothing broke.

K daemon processes serve the workload of ``durable.tools.soak.app`` against an embedded Postgres
in a scratch home, logging in as a role of their own: one through a TCP proxy, one with
its clock an hour behind (libfaketime). Producers start tasks and workflows (with
idempotency keys, so a start retried through a restart is still one task), keyed tasks
sharing keys across two queues, tasks of a queue under a fleet-wide limit, hostile tasks
and results of several MB; they cancel some of it at random moments and send the events
the workflows wait for. Meanwhile a fault schedule kills daemons with SIGKILL (restarting
them after a delay), restarts Postgres in immediate mode, terminates the listeners'
connections, cuts one daemon's listener and cancels its tasks while it cannot hear,
refuses the daemons' logins for a few seconds, freezes a daemon with SIGSTOP past its
lease (a zombie once it resumes), stalls the proxied daemon's network path for longer
than a lease, and writes bad rows into durable.schedules and durable.queues.

Then everything is let back up, the work drains, the daemons are stopped gracefully, and
the invariants are checked against the database and an audit of every claim
(``soak.sql``): every task reached the state the workload intends, no task was held
by two claims at once, no limit was exceeded at any instant, every acknowledged cancel
ended the task cancelled, no step ran again once its checkpoint committed, every
transaction's business row exists exactly once, no task was lost or completed twice, no
write from an attempt that had lost its claim was accepted, and no daemon exited on its
own. Exit status 1 on any violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import anyio

import durable
from durable.embedded import EmbeddedServer
from durable.errors import DurableError
from durable.store import NamedSql, create_database, drop_database, grant, migrate
from durable.tools.soak.faults import (
    Fault,
    FaultSchedule,
    Proxy,
    daemon_env,
    faketime_library,
    retry,
    skewed_clock,
)  # fmt: skip
from durable.tools.soak.report import FAULTS, SKEW, render, verdict

SQL = Path(__file__).with_name("soak.sql")
DATABASE = "durable_soak"
ROLE = "durable_soak"
"""The daemons' login role (soak.sql creates it): not a superuser, so that the
login_refused fault can turn its reconnects away."""
if TYPE_CHECKING:
    from durable.tools.soak import app as soak_app


@dataclass(frozen=True)
class SoakOptions:
    duration: float = 60.0
    daemons: int = 3
    lease: float = 3.0
    rate: float = 10.0
    """Starts per second (a fifth of them workflows)."""
    seed: int | None = None
    home: Path | None = None
    keep: bool = False
    drain_timeout: float = 180.0
    fault_gap: tuple[float, float] = (3.0, 6.0)
    """Seconds between faults, at full length; a short run scales it down so that every
    fault kind still fires."""
    progress: bool = True


class Soak:
    def __init__(self, opts: SoakOptions) -> None:
        self.opts = opts
        self.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(self.seed)
        self.faults: list[Fault] = []
        self.fault_errors: list[str] = []
        """Faults that could not be injected (an error of the apparatus itself)."""
        self.producer: soak_app.Producer | None = None
        self._stop_producing = asyncio.Event()
        self._stop_faults = asyncio.Event()
        self.pg_up = asyncio.Event()
        self.pg_up.set()
        self.logins = asyncio.Event()
        """Set while the daemons' role may log in: a daemon is (re)started only then."""
        self.logins.set()
        self._starting = 0
        """Daemons started but not registered yet: no fault-wide outage starts under them."""
        self._settled = asyncio.Event()
        self._settled.set()
        self._restarts: set[asyncio.Task[None]] = set()
        self.server: EmbeddedServer | None = None
        self.sql: NamedSql | None = None
        self.fleet: Fleet | None = None
        self.proxy: Proxy | None = None
        self.started_at = time.monotonic()

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        faketime = faketime_library()
        if faketime is None:
            raise DurableError(
                "durable soak runs one daemon with a skewed clock and needs libfaketime: "
                "install it (Debian/Ubuntu: apt-get install faketime)"
            )
        home = opts.home
        if home is None:
            home = Path(tempfile.mkdtemp(prefix="durable-soak-"))
            if os.geteuid() == 0:
                home.chmod(0o711)  # ours: let the server's account (root runs it as one) in
        home.mkdir(parents=True, exist_ok=True)
        (home / "logs").mkdir(exist_ok=True)
        self.server = server = EmbeddedServer(home)
        report: dict[str, Any] = {}
        try:
            url = await anyio.to_thread.run_sync(server.ensure_started)
            await drop_database(url, DATABASE)
            await create_database(url, DATABASE)
            db = _with(url, database=DATABASE)
            await migrate(db)
            self.sql = await NamedSql.open(db, SQL, max_size=6, name="durable-soak")
            await self.sql.run("create_role")
            await self.sql.run("setup")
            await grant(db, ROLE)
            await self.sql.run("grant", ROLE)
            password = secrets.token_urlsafe(24)
            await self.sql.run("set_password", ROLE, password)
            from durable.tools.soak.app import (  # registers the workload here, not at import
                BAD_RATE_QUEUE,
                CHILD_QUEUE,
                KEYS_A,
                KEYS_B,
                LIMITED,
                LIMITED_CONCURRENCY,
                QUEUE,
            )  # fmt: skip

            await self.sql.run("set_concurrency", LIMITED, LIMITED_CONCURRENCY)
            self.proxy = Proxy(urlsplit(url).port or 5432)
            await self.proxy.start()
            own = _with(db, user=f"{ROLE}:{password}")
            queues = (f"{QUEUE}=8,{CHILD_QUEUE}=16,{KEYS_A}=4,{KEYS_B}=4,{LIMITED}=4,"
                      f"{BAD_RATE_QUEUE}=1")
            env = daemon_env(opts.lease, queues)
            env["DURABLE_APP"] = "durable.tools.soak.app"
            self.fleet = Fleet(
                [(_with(own, port=self.proxy.port), True, {})]
                + [(own, False, {})] * (opts.daemons - 2)
                + [(own, False, skewed_clock(faketime, SKEW))],
                env, home / "logs",
            )  # fmt: skip
            self._say(f"soak: {opts.daemons} daemons (daemon {opts.daemons - 1} at {SKEW}), "
                      f"{opts.duration:g}s, lease {opts.lease:g}s, seed {self.seed}, home {home}")
            await asyncio.gather(*(self.start_daemon(d) for d in self.fleet.daemons))
            report = await self._soak(db)
        finally:
            for task in self._restarts:
                task.cancel()
            if self.fleet is not None:
                self.fleet.kill_all()
            if self.proxy is not None:
                await self.proxy.close()
            if self.sql is not None:
                with contextlib.suppress(Exception):
                    await self.sql.close()
            failed = not report.get("ok", False)
            if opts.keep or failed:
                report["home"] = str(home)
            if not opts.keep:
                await anyio.to_thread.run_sync(server.stop, "immediate")
                if not failed and opts.home is None:
                    shutil.rmtree(home, ignore_errors=True)
        return report

    async def _soak(self, db: str) -> dict[str, Any]:
        opts = self.opts
        assert self.fleet is not None and self.sql is not None
        from durable.tools.soak.app import Producer

        async with durable.connect(db, max_size=10) as client:
            self.producer = Producer(
                client, self.sql.pool, self.rng, opts.rate, self._stop_producing, retry
            )
            monitor = asyncio.create_task(self._monitor())
            progress = asyncio.create_task(self._progress())
            producer = asyncio.create_task(self.producer.run())
            faults = asyncio.create_task(FaultSchedule(self, self._stop_faults).run())
            t0 = time.monotonic()
            await asyncio.sleep(opts.duration)
            self._stop_faults.set()
            await faults  # past the duration only while a fault kind has yet to fire
            self._stop_producing.set()
            await producer
            self._say("soak: producing stopped; faults over; draining")
            drained = await self._drain()
            elapsed = time.monotonic() - t0
            progress.cancel()
            for task in self._restarts:
                task.cancel()
            await asyncio.gather(*self._restarts, return_exceptions=True)
            monitor.cancel()
            await asyncio.gather(monitor, progress, return_exceptions=True)
            await self.fleet.stop_all(timeout=20)
        return await verdict(self, drained, elapsed)

    async def start_daemon(self, d: Daemon) -> None:
        """Start (or restart) a daemon as its supervisor would: once Postgres is up and
        its role may log in, since `durable run` exits with an error when it cannot reach
        its server at startup (by design: systemd or Kubernetes restart it); and no outage
        of the whole fleet begins until the daemon has registered and started (its
        listener connected). After that, every outage is the daemon's to ride out."""
        assert self.fleet is not None and self.sql is not None
        while not (self.pg_up.is_set() and self.logins.is_set()):
            await self.pg_up.wait()
            await self.logins.wait()
        self._starting += 1
        self._settled.clear()
        try:
            self.fleet.spawn(d)
            proc = d.proc
            assert proc is not None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(Exception):
                    if await self.sql.value("registered", proc.pid, timeout=5) and started(d):
                        return
                await asyncio.sleep(0.1)
        finally:
            self._starting -= 1
            if not self._starting:
                self._settled.set()

    async def fleet_settled(self) -> None:
        while self._starting:  # see _start_daemon
            await self._settled.wait()

    async def held(self, pid: int, *, roots: bool = False) -> list[int]:
        """The tasks daemon process ``pid`` holds (only those without a parent: roots)."""
        assert self.sql is not None
        sql, query = self.sql, "held_roots" if roots else "held_by"
        return list(await retry(lambda: sql.value(query, pid), deadline=30))

    # -- watching --------------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Record every exit the soak did not cause, and start the daemon again as its
        supervisor would."""
        assert self.fleet is not None
        while True:
            for d in self.fleet.check_exits():
                task = asyncio.create_task(self.start_daemon(d))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)
            await asyncio.sleep(0.2)

    async def _progress(self) -> None:
        assert self.sql is not None and self.producer is not None
        sql, producer = self.sql, self.producer
        while True:
            await asyncio.sleep(10)
            with contextlib.suppress(Exception):
                row = (await sql.rows("progress", timeout=5))[0]
                counts = Counter(f.kind for f in self.faults)
                self._say(
                    f"[{time.monotonic() - self.started_at:5.0f}s] started {len(producer.ledger)} "
                    f"completed {row['completed']} failed {row['failed']} "
                    f"unfinished {row['unfinished']} faults "
                    + " ".join(f"{k}={counts[k]}" for k in FAULTS)
                )

    async def _drain(self) -> bool:
        """Wait until no task is unfinished; False after the drain timeout."""
        assert self.sql is not None
        sql = self.sql
        deadline = time.monotonic() + self.opts.drain_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if await sql.value("unfinished", timeout=5) == 0:
                    return True
            await asyncio.sleep(0.5)
        return False

    def _say(self, text: str) -> None:
        if self.opts.progress:
            print(text, file=sys.stderr, flush=True)


# -- the fleet --------------------------------------------------------------------------


def started(d: Daemon) -> bool:
    """Its current process got past its startup: it registers before its listener first
    connects, which an outage of the whole fleet (refused logins) would make it exit on."""
    return bool(d.logs) and '"daemon_started"' in d.logs[-1].read_text(errors="replace")


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
                [sys.executable, "-m", "durable", "run", "--app", "durable.tools.soak.app"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                # A session of its own, as under a supervisor: a daemon frozen by the
                # zombie fault must not get the SIGHUP the kernel sends to stopped members
                # of a process group that becomes orphaned (the soak's launching shell
                # exiting).
                start_new_session=True,
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




# -- helpers ------------------------------------------------------------------------------


def _with(
    url: str, *, database: str | None = None, port: int | None = None, user: str | None = None
) -> str:
    parts = urlsplit(url)
    if database is not None:
        parts = parts._replace(path="/" + database)
    if port is not None or user is not None:
        host = parts.hostname or "127.0.0.1"
        port = port if port is not None else parts.port
        login = user if user is not None else parts.netloc.rpartition("@")[0]
        where = f"{host}:{port}" if port else host
        parts = parts._replace(netloc=f"{login}@{where}" if login else where)
    return urlunsplit(parts)


async def run(opts: SoakOptions, *, as_json: bool = False) -> int:
    report = await Soak(opts).run()
    if as_json:
        print(json.dumps(report, default=str, indent=2))
    else:
        print(render(report))
    return 0 if report.get("ok") else 1

"""``durable soak``: run daemons, producers and faults for a while, then prove nothing broke.

K daemon processes serve the workload of ``durable.soak_app`` against an embedded Postgres
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
(``sql/soak.sql``): every task reached the state the workload intends, no task was held
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
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio

import durable
from durable.embedded import EmbeddedServer
from durable.errors import DurableError
from durable.soak_faults import Daemon, Fleet, Proxy, daemon_env, faketime_library, skewed_clock
from durable.soak_report import FAULTS, SKEW, render, verdict
from durable.store import NamedSql, create_database, drop_database, grant, is_transient, migrate

DATABASE = "durable_soak"
ROLE = "durable_soak"
"""The daemons' login role (sql/soak.sql creates it): not a superuser, so that the
login_refused fault can turn its reconnects away."""
T = TypeVar("T")

if TYPE_CHECKING:
    from durable import soak_app


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


@dataclass
class Fault:
    kind: str
    at: datetime
    daemon: int | None = None
    ended: datetime | None = None
    held: list[int] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


class Soak:
    def __init__(self, opts: SoakOptions) -> None:
        self.opts = opts
        self.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(self.seed)
        self.faults: list[Fault] = []
        self.producer: soak_app.Producer | None = None
        self._stop_producing = asyncio.Event()
        self._stop_faults = asyncio.Event()
        self._pg_busy = False
        self._pg_up = asyncio.Event()
        self._pg_up.set()
        self._logins = asyncio.Event()
        """Set while the daemons' role may log in: a daemon is (re)started only then."""
        self._logins.set()
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
        home = opts.home or Path(tempfile.mkdtemp(prefix="durable-soak-"))
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
            self.sql = await NamedSql.open(db, "soak.sql", max_size=6, name="durable-soak")
            await self.sql.run("create_role")
            await self.sql.run("setup")
            await grant(db, ROLE)
            await self.sql.run("grant", ROLE)
            from durable.soak_app import (  # registers the workload here, not at import
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
            own = _with(db, user=ROLE)
            queues = (f"{QUEUE}=8,{CHILD_QUEUE}=16,{KEYS_A}=4,{KEYS_B}=4,{LIMITED}=4,"
                      f"{BAD_RATE_QUEUE}=1")
            env = daemon_env(opts.lease, queues)
            env["DURABLE_APP"] = "durable.soak_app"
            self.fleet = Fleet(
                [(_with(own, port=self.proxy.port), True, {})]
                + [(own, False, {})] * (opts.daemons - 2)
                + [(own, False, skewed_clock(faketime, SKEW))],
                env, home / "logs",
            )  # fmt: skip
            self._say(f"soak: {opts.daemons} daemons (daemon {opts.daemons - 1} at {SKEW}), "
                      f"{opts.duration:g}s, lease {opts.lease:g}s, seed {self.seed}, home {home}")
            await asyncio.gather(*(self._start_daemon(d) for d in self.fleet.daemons))
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
        from durable.soak_app import Producer

        async with durable.connect(db, max_size=10) as client:
            self.producer = Producer(
                client, self.sql.pool, self.rng, opts.rate, self._stop_producing, _retry
            )
            monitor = asyncio.create_task(self._monitor())
            progress = asyncio.create_task(self._progress())
            producer = asyncio.create_task(self.producer.run())
            faults = asyncio.create_task(self._fault_schedule())
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

    # -- faults ----------------------------------------------------------------------------

    def fault_gap(self) -> tuple[float, float]:
        """The gap between faults: at most the configured one, and short enough that a
        round of every kind fits in the duration."""
        lo, hi = self.opts.fault_gap
        scale = min(1.0, self.opts.duration / (len(FAULTS) * (lo + hi) / 2 + hi))
        return lo * scale, hi * scale

    async def _fault_schedule(self) -> None:
        """Every kind once per round, in a random order. A kind that finds nothing to hit
        (its daemon is under another fault) goes to the end of the round. Past the
        duration, only the kinds that never fired are injected, until each has."""
        kinds: list[str] = []
        fired: set[str] = set()
        running: set[asyncio.Task[None]] = set()

        async def inject(kind: str) -> None:
            if await self._inject(kind):
                fired.add(kind)
            else:
                kinds.insert(0, kind)

        lo, hi = self.fault_gap()
        overtime = time.monotonic() + self.opts.duration + 120
        while True:
            with contextlib.suppress(TimeoutError):
                if not self._stop_faults.is_set():
                    await asyncio.wait_for(self._stop_faults.wait(), self.rng.uniform(lo, hi))
                else:
                    await asyncio.sleep(lo)
            if self._stop_faults.is_set():
                missing = [k for k in FAULTS if k not in fired]
                if not missing or time.monotonic() > overtime:
                    break
                kinds = [k for k in kinds if k in missing] or missing
            if not kinds:
                kinds = list(FAULTS)
                self.rng.shuffle(kinds)
            task = asyncio.create_task(inject(kinds.pop()))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(list(running))

    async def _pick(self, proxied: bool | None = None) -> Daemon | None:
        """A daemon no other fault is hitting, preferably one running tasks right now."""
        assert self.fleet is not None
        free = [
            d for d in self.fleet.daemons
            if not d.busy and d.pid is not None and (proxied is None or d.proxied == proxied)
        ]  # fmt: skip
        holding = []
        for d in free:
            if d.pid is not None and await self._held(d.pid):
                holding.append(d)
        pool = holding or free
        return self.rng.choice(pool) if pool else None

    async def _start_daemon(self, d: Daemon) -> None:
        """Start (or restart) a daemon as its supervisor would: once Postgres is up and
        its role may log in, since `durable run` exits with an error when it cannot reach
        its server at startup (by design: systemd or Kubernetes restart it); and no outage
        of the whole fleet begins until the daemon has registered. After that, every
        outage is the daemon's to ride out."""
        assert self.fleet is not None and self.sql is not None
        while not (self._pg_up.is_set() and self._logins.is_set()):
            await self._pg_up.wait()
            await self._logins.wait()
        self._starting += 1
        self._settled.clear()
        try:
            self.fleet.spawn(d)
            proc = d.proc
            assert proc is not None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(Exception):
                    if await self.sql.value("registered", proc.pid, timeout=5):
                        return
                await asyncio.sleep(0.1)
        finally:
            self._starting -= 1
            if not self._starting:
                self._settled.set()

    async def _fleet_settled(self) -> None:
        while self._starting:  # see _start_daemon
            await self._settled.wait()

    async def _held(self, pid: int) -> list[int]:
        assert self.sql is not None
        sql = self.sql
        return list(await _retry(lambda: sql.value("held_by", pid), deadline=30))

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
                fault.held = await self._held(d.pid)
                fault.at = datetime.now(UTC)
                self.faults.append(fault)
                await self._hit_daemon(kind, d, fault)
            finally:
                d.busy = False
        elif kind in ("pg_restart", "login_refused"):
            if self._pg_busy:
                return False
            self._pg_busy = True
            try:
                await self._fleet_settled()
                fault.at = datetime.now(UTC)
                self.faults.append(fault)
                await (self._restart_pg(fault) if kind == "pg_restart" else self._refuse_logins(fault))
            finally:
                self._pg_busy = False
        elif kind == "listener_kill":
            self.faults.append(fault)
            await self._kill_listeners(fault)
        else:
            self.faults.append(fault)
            await self._bad_config(kind, fault)
        fault.ended = datetime.now(UTC)
        return True

    async def _hit_daemon(self, kind: str, d: Daemon, fault: Fault) -> None:
        assert self.fleet is not None and self.proxy is not None and d.pid is not None
        lease = self.opts.lease
        if kind == "kill9":
            await self.fleet.kill9(d)
            down = self.rng.uniform(0.5, 2.5)
            fault.detail["down_s"] = round(down, 2)
            await asyncio.sleep(down)
            await self._start_daemon(d)
        elif kind == "zombie":
            self.fleet.freeze(d)
            await asyncio.sleep(2 * lease + 1)  # past its lease: others take its tasks
            self.fleet.thaw(d)
        elif kind == "net_stall":
            self.proxy.stall()
            await asyncio.sleep(2 * lease + 2)
            self.proxy.resume()
        else:
            await self._cut_listener(d, fault)

    async def _cut_listener(self, d: Daemon, fault: Fault) -> None:
        """Cut the daemon's LISTEN connection and turn its reconnects away for a while;
        meanwhile cancel what it runs: those cancels reach it by other means or not at
        all. The other connections of the daemon keep working."""
        assert self.proxy is not None and self.producer is not None and d.pid is not None
        refused = self.proxy.refused
        self.proxy.refuse_listeners()
        try:
            fault.detail["cut"] = self.proxy.cut_listeners()
            cancelled: set[int] = set()
            end = time.monotonic() + self.opts.lease + 1
            while time.monotonic() < end and d.pid is not None:
                for task_id in await self._held(d.pid):
                    if task_id not in cancelled and len(cancelled) < 3:
                        cancelled.add(task_id)
                        await self.producer.cancel(task_id)
                await asyncio.sleep(0.3)
            fault.detail["cancelled"] = len(cancelled)
        finally:
            self.proxy.refuse_listeners(False)
            fault.detail["refused"] = self.proxy.refused - refused

    async def _restart_pg(self, fault: Fault) -> None:
        assert self.server is not None
        self._pg_up.clear()
        try:
            t0 = time.monotonic()
            await anyio.to_thread.run_sync(self.server.restart, "immediate")
            fault.detail["restart_s"] = round(time.monotonic() - t0, 2)
        finally:
            self._pg_up.set()

    async def _refuse_logins(self, fault: Fault) -> None:
        """Refuse the daemons' new connections with an error no retry loop expects
        (alternately: the role may not log in, 28000; CONNECT revoked, 42501), and
        terminate their listeners so that each must reconnect; restore after a while."""
        assert self.sql is not None
        sql = self.sql
        how = ("refuse_logins", "admit_logins") if len(self.faults) % 2 else (
            "revoke_connect", "grant_connect")
        fault.detail["how"] = "nologin" if how[0] == "refuse_logins" else "revoke_connect"
        self._logins.clear()
        try:
            await _retry(lambda: sql.run(how[0]))
            await self._kill_listeners(fault)
            await asyncio.sleep(self.opts.lease + 1)
        finally:
            await _retry(lambda: sql.run(how[1]))
            self._logins.set()

    async def _kill_listeners(self, fault: Fault) -> None:
        assert self.sql is not None
        sql = self.sql
        pids = [r["pid"] for r in await _retry(lambda: sql.rows("listener_backends"))]
        await _retry(lambda: sql.run("terminate", pids))
        fault.detail["connections"] = len(pids)

    async def _bad_config(self, kind: str, fault: Fault) -> None:
        """Rows that no CLI should accept, written directly; removed after a while. A
        daemon must log them, skip them, and go on serving everything else."""
        assert self.sql is not None
        from durable.soak_app import BAD_RATE_QUEUE

        sql = self.sql
        put, clear, args = (
            ("bad_schedules", "clear_bad_schedules", ()) if kind == "bad_schedule"
            else ("bad_queue", "clear_bad_queue", (BAD_RATE_QUEUE,))
        )  # fmt: skip
        try:
            await _retry(lambda: sql.run(put, *args))
            await asyncio.sleep(max(3.0, self.opts.lease))  # a few scheduler and claim polls
        finally:
            await _retry(lambda: sql.run(clear, *args))

    # -- watching --------------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Record every exit the soak did not cause, and start the daemon again as its
        supervisor would."""
        assert self.fleet is not None
        while True:
            for d in self.fleet.check_exits():
                task = asyncio.create_task(self._start_daemon(d))
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


# -- helpers ------------------------------------------------------------------------------


async def _retry(fn: Callable[[], Awaitable[T]], deadline: float = 300.0) -> T:
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


def add_command(sub: Any) -> None:
    """``durable soak`` on the CLI's subparsers."""
    p = sub.add_parser(
        "soak", help="run daemons, producers and faults for a while, then check invariants",
        description=(__doc__ or "").split("\n\n")[1].replace("``", ""),
    )
    p.add_argument("--duration", default="60s", help="how long to produce and inject faults "
                   "(e.g. 60s, 10m); the drain comes after")
    p.add_argument("--daemons", type=int, default=3, help="daemon processes (at least 3: one "
                   "behind the proxy, one with a skewed clock)")
    p.add_argument("--lease", default="3s", help="the daemons' DURABLE_LEASE")
    p.add_argument("--rate", type=float, default=10.0, help="starts per second")
    p.add_argument("--seed", type=int, help="random seed (printed; the timing is not replayed)")
    p.add_argument("--home", help="embedded server directory (default: a fresh temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the server, data and logs")
    p.add_argument("--drain-timeout", default="180s", help="how long the work may take to "
                   "finish once producing stops")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_soak)


def cmd_soak(args: Any) -> int:
    from durable.cli import CommandError, _run
    from durable.settings import parse_duration

    try:
        duration = parse_duration(args.duration)
        lease = parse_duration(args.lease)
        drain = parse_duration(args.drain_timeout)
    except ValueError as exc:
        raise CommandError(str(exc), 2) from None
    if args.daemons < 3:
        raise CommandError("--daemons must be at least 3 (one runs behind the proxy, one with "
                           "a skewed clock)", 2)
    if faketime_library() is None:
        raise CommandError("durable soak runs one daemon with a skewed clock and needs "
                           "libfaketime: install it (Debian/Ubuntu: apt-get install faketime)")
    if lease < 1 or not 0 < args.rate <= 1000:
        raise CommandError("--lease must be at least 1s and --rate from 0 to 1000", 2)
    opts = SoakOptions(
        duration=duration, daemons=args.daemons, lease=lease, rate=args.rate, seed=args.seed,
        home=Path(args.home) if args.home else None, keep=args.keep, drain_timeout=drain,
        progress=not args.quiet,
    )

    async def main() -> int:
        from durable import logs

        # Library warnings of this process (its client pool during a restart) as one line.
        logs.configure("error", "console")
        return await run(opts, as_json=args.json)

    return int(_run(main))

"""``durable soak``: run daemons, producers and faults for a while, then prove nothing broke.

K daemon processes serve the workload of ``durable.soak_app`` against an embedded Postgres
in a scratch home, one of them through a TCP proxy. Producers start tasks and workflows
(with idempotency keys, so a start retried through a restart is still one task) and send
the events the workflows wait for. Meanwhile a fault schedule kills daemons with SIGKILL
(restarting them after a delay), restarts Postgres in immediate mode, terminates the
listeners' connections, freezes a daemon with SIGSTOP past its lease (a zombie once it
resumes) and stalls the proxied daemon's network path for longer than a lease.

Then everything is let back up, the work drains, the daemons are stopped gracefully, and
the invariants are checked against the database (``sql/soak.sql``): every task reached
the state the workload intends, no step ran again once its checkpoint committed, every
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
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio

import durable
from durable.embedded import EmbeddedServer
from durable.soak_faults import Daemon, Fleet, Proxy, daemon_env
from durable.soak_report import FAULTS, render, verdict
from durable.store import NamedSql, create_database, drop_database, is_transient, migrate

DATABASE = "durable_soak"
T = TypeVar("T")


@dataclass(frozen=True)
class SoakOptions:
    duration: float = 60.0
    daemons: int = 3
    lease: float = 3.0
    rate: float = 10.0
    """Starts per second (a quarter of them workflows)."""
    seed: int | None = None
    home: Path | None = None
    keep: bool = False
    drain_timeout: float = 180.0
    fault_gap: tuple[float, float] = (3.0, 6.0)
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
        self.ledger: dict[str, tuple[str, str | None, bool]] = {}
        """key -> (kind, event payload sent or None, cancelled), for every start asked for."""
        self.sends = Counter[str]()
        self._stop_producing = asyncio.Event()
        self._stop_faults = asyncio.Event()
        self._pending: set[asyncio.Task[Any]] = set()
        self._pg_busy = False
        self._pg_up = asyncio.Event()
        self._pg_up.set()
        self._starting = 0
        """Daemons started but not registered yet: Postgres is not restarted under them."""
        self._settled = asyncio.Event()
        self._settled.set()
        self.server: EmbeddedServer | None = None
        self.sql: NamedSql | None = None
        self.fleet: Fleet | None = None
        self.proxy: Proxy | None = None
        self.started_at = time.monotonic()

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        opts = self.opts
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
            self.sql = await NamedSql.open(db, "soak.sql", max_size=4, name="durable-soak")
            await self.sql.run("setup")
            self.proxy = Proxy(urlsplit(url).port or 5432)
            await self.proxy.start()
            proxied = _with(db, port=self.proxy.port)
            from durable.soak_app import CHILD_QUEUE, QUEUE  # registers the workload here

            env = daemon_env(opts.lease, f"{QUEUE}=8,{CHILD_QUEUE}=16")
            env["DURABLE_APP"] = "durable.soak_app"
            self.fleet = Fleet(
                [(proxied, True)] + [(db, False)] * (opts.daemons - 1), env, home / "logs"
            )
            self._say(f"soak: {opts.daemons} daemons, {opts.duration:g}s, lease {opts.lease:g}s, "
                      f"seed {self.seed}, home {home}")
            await asyncio.gather(*(self._start_daemon(d) for d in self.fleet.daemons))
            report = await self._soak(db)
        finally:
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
        assert self.fleet is not None
        async with durable.connect(db, max_size=10) as client:
            monitor = asyncio.create_task(self._monitor())
            progress = asyncio.create_task(self._progress())
            producer = asyncio.create_task(self._produce(client))
            faults = asyncio.create_task(self._fault_schedule())
            t0 = time.monotonic()
            await asyncio.sleep(opts.duration)
            self._stop_producing.set()
            self._stop_faults.set()
            await faults
            await producer
            self._say("soak: producing stopped; faults over; draining")
            drained = await self._drain()
            elapsed = time.monotonic() - t0
            progress.cancel()
            await self.fleet.stop_all(timeout=20)
            monitor.cancel()
            await asyncio.gather(monitor, progress, return_exceptions=True)
        return await self._report(drained, elapsed)

    # -- producers -------------------------------------------------------------------------

    async def _produce(self, client: durable.Client) -> None:
        n = 0
        interval = 1.0 / self.opts.rate
        next_at = time.monotonic()
        while not self._stop_producing.is_set():
            n += 1
            key = f"soak-{n}"
            roll = self.rng.random()
            if roll < 0.25:
                self._spawn(self._start_workflow(client, key))
            elif roll < 0.28:
                self.ledger[key] = ("task", None, False)
                self._spawn(self._start(client, "soak_doomed", key, key))
            else:
                self.ledger[key] = ("task", None, False)
                slow = round(self.rng.uniform(2.0, 10.0), 2) if self.rng.random() < 0.15 else 0.0
                self._spawn(self._start(client, "soak_task", key, key, slow))
            next_at += self.rng.expovariate(1.0 / interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_producing.wait(), max(0, next_at - time.monotonic()))
        while self._pending:
            await asyncio.wait(list(self._pending))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _start(self, client: durable.Client, fn: Any, key: str, *args: Any) -> int:
        handle = await _retry(lambda: client.start(fn, *args, idempotency_key=key))
        return handle.id

    async def _start_workflow(self, client: durable.Client, key: str) -> None:
        rng = self.rng
        wants_event = rng.random() < 0.75
        plan = {
            "slow": round(rng.uniform(2.0, 8.0), 2) if rng.random() < 0.15 else 0.0,
            "sleep": round(rng.uniform(0.1, 1.5), 2),
            "wait": 600.0 if wants_event else round(rng.uniform(0.3, 2.0), 2),
            "fan": rng.randint(1, 4),
            "doomed": rng.random() < 0.2,
        }
        payload = f"go-{key}" if wants_event else None
        cancel = rng.random() < 0.08
        self.ledger[key] = ("workflow", payload, cancel)
        task_id = await self._start(client, "soak_workflow", key, key, plan)
        if cancel:  # while it runs, sleeps, waits or has children running
            await asyncio.sleep(rng.uniform(0.0, 3.0))
            hit = await _retry(lambda: client.cancel(task_id))
            self.sends["cancels"] += 1
            self.sends["cancelled_tasks"] += len(hit.cancelled)
        if payload is None:
            return
        await asyncio.sleep(rng.uniform(0.0, 2.5))  # before, during or after it waits
        sent = await _retry(lambda: client.send_event(task_id, "go", payload))
        self.sends["sent" if sent else "refused"] += 1

    # -- faults ----------------------------------------------------------------------------

    async def _fault_schedule(self) -> None:
        kinds: list[str] = []
        running: set[asyncio.Task[None]] = set()
        while True:
            lo, hi = self.opts.fault_gap
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_faults.wait(), self.rng.uniform(lo, hi))
            if self._stop_faults.is_set():
                break
            if not kinds:  # every kind once per round, in a random order
                kinds = list(FAULTS)
                self.rng.shuffle(kinds)
            kind = kinds.pop()
            task = asyncio.create_task(self._inject(kind))
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
        """Start (or restart) a daemon as its supervisor would: once Postgres is up, since
        `durable run` exits with an error when it cannot reach its server at startup (by
        design: systemd or Kubernetes restart it); and Postgres is not restarted until the
        daemon has registered. After that, every outage is the daemon's to ride out."""
        assert self.fleet is not None and self.sql is not None
        await self._pg_up.wait()
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

    async def _held(self, pid: int) -> list[int]:
        assert self.sql is not None
        sql = self.sql
        return list(await _retry(lambda: sql.value("held_by", pid), deadline=30))

    async def _inject(self, kind: str) -> None:
        assert self.fleet is not None and self.sql is not None and self.server is not None
        fleet, sql, lease = self.fleet, self.sql, self.opts.lease
        fault = Fault(kind, datetime.now(UTC))
        if kind in ("kill9", "zombie", "net_stall"):
            d = await self._pick(proxied=True if kind == "net_stall" else None)
            if d is None or d.pid is None:
                return  # nobody to hit right now: the next round tries again
            d.busy = True
            try:
                pid = d.pid
                fault.daemon, fault.detail["pid"] = d.index, pid
                fault.held = await self._held(pid)
                fault.at = datetime.now(UTC)
                self.faults.append(fault)
                if kind == "kill9":
                    await fleet.kill9(d)
                    down = self.rng.uniform(0.5, 2.5)
                    fault.detail["down_s"] = round(down, 2)
                    await asyncio.sleep(down)
                    await self._start_daemon(d)
                elif kind == "zombie":
                    fleet.freeze(d)
                    await asyncio.sleep(2 * lease + 1)  # past its lease: others take its tasks
                    fleet.thaw(d)
                else:
                    assert self.proxy is not None
                    self.proxy.stall()
                    await asyncio.sleep(2 * lease + 2)
                    self.proxy.resume()
            finally:
                d.busy = False
        elif kind == "pg_restart":
            if self._pg_busy:
                return
            self._pg_busy = True
            try:
                while self._starting:  # see _start_daemon
                    await self._settled.wait()
                fault.at = datetime.now(UTC)
                self.faults.append(fault)
                self._pg_up.clear()
                t0 = time.monotonic()
                await anyio.to_thread.run_sync(self.server.restart, "immediate")
                fault.detail["restart_s"] = round(time.monotonic() - t0, 2)
            finally:
                self._pg_up.set()
                self._pg_busy = False
        elif kind == "listener_kill":
            self.faults.append(fault)
            pids = [r["pid"] for r in await _retry(lambda: sql.rows("listener_backends"))]
            await _retry(lambda: sql.run("terminate", pids))
            fault.detail["connections"] = len(pids)
        fault.ended = datetime.now(UTC)

    # -- watching --------------------------------------------------------------------------

    async def _monitor(self) -> None:
        assert self.fleet is not None
        while True:
            self.fleet.check_exits()
            await asyncio.sleep(0.2)

    async def _progress(self) -> None:
        assert self.sql is not None
        sql = self.sql
        while True:
            await asyncio.sleep(10)
            with contextlib.suppress(Exception):
                row = (await sql.rows("progress", timeout=5))[0]
                counts = Counter(f.kind for f in self.faults)
                self._say(
                    f"[{time.monotonic() - self.started_at:5.0f}s] started {len(self.ledger)} "
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

    async def _report(self, drained: bool, elapsed: float) -> dict[str, Any]:
        return await verdict(self, drained, elapsed)


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


def _with(url: str, *, database: str | None = None, port: int | None = None) -> str:
    parts = urlsplit(url)
    if database is not None:
        parts = parts._replace(path="/" + database)
    if port is not None:
        host = parts.hostname or "127.0.0.1"
        user = parts.netloc.rpartition("@")[0]
        parts = parts._replace(netloc=f"{user}@{host}:{port}" if user else f"{host}:{port}")
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
    p.add_argument("--daemons", type=int, default=3, help="daemon processes (at least 2)")
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
    if args.daemons < 2:
        raise CommandError("--daemons must be at least 2 (one of them runs behind the proxy)", 2)
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

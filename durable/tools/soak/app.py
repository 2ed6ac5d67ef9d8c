"""The workload of ``durable soak``, served by its daemons (``--app durable.tools.soak.app``).

Plain tasks, children on a queue whose name needs quoting, a task that fails on purpose,
and a workflow using every durable call: steps, transactions, a durable sleep, an event
wait (with and without a sender), a child (a third of them fail their first run and are
retried while the parent waits), a fan-out and a failing child it catches.
Keyed tasks on two queues share their concurrency keys (``key_limit``); a queue has a
fleet-wide concurrency limit; some tasks return results of several MB; and hostile tasks
raise what task code should never raise: ``SystemExit``, ``KeyboardInterrupt``, a
``BaseException`` of their own, their own ``CancelledError``, and errors whose text
cannot be stored as it is.
Every body records its run in ``soak.effects`` as it starts, so the soak can prove after
the fact which steps ran again and which processes wrote which outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import durable
from durable.errors import EventTimeout, NonRetryable, TaskFailed
from durable.store import NamedSql, is_fatal, named_queries

QUEUE = "soak"
CHILD_QUEUE = 'soak "kids" ü'
"""Children run on a queue whose name has quotes, a space and non-ASCII letters."""
ATTEMPTS = 100
"""Faults cost attempts (a killed daemon's lease expires); a task must outlive many."""
FAST = durable.RetryPolicy(base=0.2, factor=2.0, max_delay=2.0, jitter=0.2)
HOSTILE_ATTEMPTS = 3
"""Few attempts for hostile tasks: an engine that lets one kill its daemon loses one
daemon per attempt. Each attempt raises at once, so a fault rarely costs one."""
KEYS_A, KEYS_B = "soak-keys-a", "soak-keys-b"
"""Two queues whose keyed tasks share concurrency keys: a key's limit holds across both."""
KEY_LIMIT = 1
LIMITED = "soak-limited"
"""A queue with a fleet-wide concurrency limit (a durable.queues row)."""
LIMITED_CONCURRENCY = 2
BAD_RATE_QUEUE = "soak-bad-rate"
"""Served but empty: the bad_queue fault gives it a rate period no timestamp can hold."""
EFFECT_DEADLINE = 120.0
"""Seconds a body keeps retrying its own record through a database restart."""

SQL = Path(__file__).with_name("soak.sql")
"""The soak's own statements and audit tables; they ship with the tool, not the runtime."""

_db: NamedSql | None = None
_db_lock: asyncio.Lock | None = None


async def _sql() -> NamedSql:
    global _db, _db_lock
    if _db is None:
        if _db_lock is None:
            _db_lock = asyncio.Lock()
        async with _db_lock:
            if _db is None:
                _db = await NamedSql.open(
                    os.environ.get("DURABLE_DATABASE_URL"), SQL, max_size=4,
                    name="durable-soak-app",
                )
    return _db


async def record(kind: str, key: str, task_id: int | None = None, seq: int | None = None,
                 attempt: int | None = None) -> str:
    """Record that a body starts; retried through restarts and refused logins (a run id makes
    it idempotent), so that a fault of the moment costs no attempt of a task."""
    run_id = str(uuid.uuid4())
    delay = 0.05
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EFFECT_DEADLINE
    while True:
        try:
            db = await _sql()
            await db.run("record_effect", run_id, kind, key, task_id, seq, attempt,
                         os.getpid(), timeout=10)
            return run_id
        except Exception as exc:
            if is_fatal(exc) or loop.time() > deadline:  # a refused login passes too
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def _work(low: float = 0.0, high: float = 0.05) -> None:
    """The body's own work: a kill or freeze may land here, after its record."""
    await asyncio.sleep(random.uniform(low, high))


@durable.task(queue=QUEUE, max_attempts=ATTEMPTS, retry=FAST)
async def soak_task(key: str, seconds: float = 0.0) -> dict[str, Any]:
    """Works for a moment, or ``seconds``: long ones outlive a frozen daemon's lease, so
    its attempt wakes up while another daemon runs the task (a zombie with work to write)."""
    run = await record("task", key)
    await (asyncio.sleep(seconds) if seconds else _work(0.0, 0.4))
    return {"pid": os.getpid(), "run": run, "key": key}


def _customer(key: str, customer: str | None = None, seconds: float = 0.0) -> str | None:
    return customer


async def _keyed(kind: str, key: str, customer: str | None, seconds: float) -> dict[str, Any]:
    run = await record(kind, key)
    await (asyncio.sleep(seconds) if seconds else _work(0.0, 0.2))
    return {"pid": os.getpid(), "run": run, "key": key}


@durable.task(queue=KEYS_A, max_attempts=ATTEMPTS, retry=FAST, concurrency_key=_customer,
              key_limit=KEY_LIMIT)
async def soak_keyed_a(key: str, customer: str | None = None, seconds: float = 0.0) -> dict[str, Any]:
    """Holds ``customer``'s key (when given) while it runs: at most KEY_LIMIT at once
    across both keyed queues."""
    return await _keyed("keyed", key, customer, seconds)


@durable.task(queue=KEYS_B, max_attempts=ATTEMPTS, retry=FAST, concurrency_key=_customer,
              key_limit=KEY_LIMIT)
async def soak_keyed_b(key: str, customer: str | None = None, seconds: float = 0.0) -> dict[str, Any]:
    return await _keyed("keyed", key, customer, seconds)


@durable.task(queue=LIMITED, max_attempts=ATTEMPTS, retry=FAST)
async def soak_limited(key: str, seconds: float = 0.0) -> dict[str, Any]:
    return await _keyed("limited", key, None, seconds)


@durable.task(queue=QUEUE, max_attempts=ATTEMPTS, retry=FAST)
async def soak_big(key: str, megabytes: int) -> dict[str, Any]:
    """A result of ``megabytes`` MB: encoding it must not starve the daemon's heartbeats."""
    run = await record("big", key)
    return {"pid": os.getpid(), "run": run, "key": key, "blob": "x" * (megabytes << 20)}


class SoakAbort(BaseException):
    """A BaseException of the task's own, neither Exception nor a system exit."""


class SoakBadMessage(Exception):
    """An error whose message cannot be stored as it is (NUL, a lone surrogate, 20 MB)."""


class SoakBadStr(Exception):
    """An error that cannot even say what it is."""

    def __str__(self) -> str:
        raise RuntimeError("SoakBadStr.__str__ fails on purpose")


def _hostile(how: str) -> BaseException:
    match how:
        case "exit":
            return SystemExit(3)
        case "interrupt":
            return KeyboardInterrupt()
        case "base":
            return SoakAbort("a BaseException raised by task code")
        case "cancel":
            return asyncio.CancelledError()
        case "nul":
            return SoakBadMessage("a NUL \x00 in the message")
        case "surrogate":
            return SoakBadMessage("a lone surrogate \ud800 in the message")
        case "str":
            return SoakBadStr()
        case "huge":
            return SoakBadMessage("x" * (20 << 20))
    raise ValueError(f"unknown hostile kind {how!r}")


HOSTILE = {
    "exit": "SystemExit", "interrupt": "KeyboardInterrupt", "base": "SoakAbort",
    "cancel": "CancelledError", "nul": "SoakBadMessage", "surrogate": "SoakBadMessage",
    "str": "SoakBadStr", "huge": "SoakBadMessage",
}  # fmt: skip
"""Each way a hostile task fails -> the name its recorded error must carry."""


@durable.task(queue=QUEUE, max_attempts=HOSTILE_ATTEMPTS, retry=FAST)
async def soak_hostile(key: str, how: str) -> None:
    """Raises what ``how`` names: the attempt must fail with an error that says so, and
    the daemon must keep serving."""
    await record("hostile", key)
    raise _hostile(how)


class ChildRestart(Exception):
    """A child's first run fails on purpose: its parent must wait through the retry."""


@durable.task(queue=CHILD_QUEUE, max_attempts=ATTEMPTS, retry=FAST)
async def soak_child(key: str, i: int) -> dict[str, Any]:
    run = await record("child", f"{key}/{i}")
    if i == 0 and zlib.crc32(key.encode()) % 3 == 0 and await _runs_of("child", f"{key}/{i}") == 1:
        raise ChildRestart(f"child {key}/{i} fails its first run")
    await _work(0.0, 0.1)
    return {"pid": os.getpid(), "run": run, "i": i}


async def _runs_of(kind: str, key: str) -> int:
    db = await _sql()
    return int(await db.value("runs_of", kind, key, timeout=10))


@durable.task(queue=CHILD_QUEUE, max_attempts=ATTEMPTS, retry=FAST)
async def soak_doomed(key: str) -> None:
    """Fails on purpose, at once: the soak expects it to end failed."""
    await record("doomed", key)
    raise NonRetryable(f"{key} fails on purpose")


async def _business(conn: Any, task_id: int, seq: int, attempt: int) -> int:
    await conn.execute(named_queries(SQL)["business"], task_id, seq, attempt, os.getpid())
    await _work(0.0, 0.03)  # a kill may land inside the transaction
    return seq


async def _step(ctx: durable.Context, name: str, seconds: float = 0.0) -> Any:
    seq, attempt, task_id = ctx.position, ctx.attempt, ctx.task_id

    async def body() -> dict[str, Any]:
        run = await record("step", name, task_id, seq, attempt)
        # Long enough that faults land inside steps; a slow one outlives a lease.
        await (asyncio.sleep(seconds) if seconds else _work(0.0, 0.5))
        return {"run": run}

    # The attempt is not an argument: arguments must replay identically.
    return await ctx.step(name, body)


async def _transaction(ctx: durable.Context, name: str) -> Any:
    attempt = ctx.attempt

    async def write(conn: Any, task_id: int, seq: int) -> int:
        return await _business(conn, task_id, seq, attempt)

    # As for steps, the attempt is not an argument: it would change the digest on replay.
    return await ctx.transaction(name, write, ctx.task_id, ctx.position)


def _prices(key: str) -> dict[str, float]:
    return {"zucchini": 1e16, "fig": 2.5, "apple": float(len(key))}


def _priced(item: str, price: float) -> str:
    if type(price) is not float:
        raise TypeError(f"the price of {item} came back as {type(price).__name__}")
    return item


def _refuse(key: str) -> None:
    raise ValueError(f"no stock for {key}")


@durable.workflow(queue=QUEUE, max_attempts=ATTEMPTS, retry=FAST)
async def soak_workflow(ctx: durable.Context, key: str, plan: dict[str, Any]) -> dict[str, Any]:
    """``plan``: slow (seconds of the first step), sleep (seconds), wait (event timeout),
    fan (children), doomed (bool)."""
    runs = [await _step(ctx, "first", float(plan.get("slow", 0.0)))]
    # What replay must see as the first run saw it: a dict whose keys jsonb reorders, one
    # durable call per key, a float jsonb would print as an integer, and a step failure the
    # workflow handles (a retry must keep it).
    prices = await ctx.step("prices", _prices, key)
    for item in prices:
        await ctx.step(f"price-{item}", _priced, item, prices[item])
    with contextlib.suppress(ValueError):
        await ctx.step("refused", _refuse, key)
    await _transaction(ctx, "reserve")
    await ctx.sleep(float(plan["sleep"]))
    try:
        event = await ctx.wait_for_event("go", timeout=float(plan["wait"]))
    except EventTimeout:
        event = "timeout"
    child = await ctx.run(soak_child, key, 0)
    fan = await ctx.gather(*(ctx.run(soak_child, key, i) for i in range(1, int(plan["fan"]) + 1)))
    caught = None
    if plan["doomed"]:
        try:
            await ctx.run(soak_doomed, key)
        except TaskFailed as exc:
            caught = exc.type
    runs.append(await _step(ctx, "last"))
    await _transaction(ctx, "finish")
    return {
        "pid": os.getpid(),
        "attempt": ctx.attempt,
        "event": event,
        "children": [child["i"]] + [c["i"] for c in fan],
        "caught": caught,
        "runs": [r["run"] for r in runs],
    }


# -- the producing side: what the soak starts, and what it expects of each start ------------


@dataclass
class Started:
    """One start the producers asked for (idempotency key = its key)."""

    kind: str
    event: str | None = None
    """The event payload sent to the workflow, if any."""
    cancelled: bool = False
    """A cancel was sent (acknowledged or not): ending cancelled is right too."""
    raises: str | None = None
    """The name its recorded error must carry (HOSTILE), if it fails on purpose."""


CUSTOMERS = ("ada", "bob", "cyd", "dee")
"""Few keys, so keyed tasks wait for each other across both keyed queues."""


class Producer:
    """Starts the workload at ``rate`` per second until told to stop, cancels some of it
    at random moments, and sends the events the workflows wait for."""

    def __init__(
        self, client: durable.Client, pool: Any, rng: random.Random, rate: float,
        stop: asyncio.Event, retry: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self.client = client
        self.pool = pool
        """An asyncpg pool of the soak's own: starts inside longer transactions (outbox)."""
        self.rng = rng
        self.rate = rate
        self.stop = stop
        self.retry = retry
        self.ledger: dict[str, Started] = {}
        self.actions = Counter[str]()
        self.asked: list[int] = []
        """Every task a cancel was sent for."""
        self.acked: list[tuple[int, datetime]] = []
        """(task id, when) for every id a cancel returned."""
        self._pending: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            n += 1
            self._one(f"soak-{n}")
            next_at += self.rng.expovariate(self.rate)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), max(0, next_at - time.monotonic()))
        while self._pending:
            await asyncio.wait(list(self._pending))

    def _one(self, key: str) -> None:
        rng = self.rng
        roll = rng.random()
        cancel = rng.random() < 0.06
        if roll < 0.20:
            self._spawn(self._workflow(key, cancel))
            return
        slow = round(rng.uniform(2.0, 10.0), 2) if rng.random() < 0.15 else 0.0
        if roll < 0.23:
            self._spawn(self._task(key, Started("task", cancelled=cancel), soak_doomed, key))
        elif roll < 0.35:
            fn = soak_keyed_a if rng.random() < 0.5 else soak_keyed_b
            customer = rng.choice(CUSTOMERS) if rng.random() < 0.8 else None
            seconds = round(rng.uniform(0.0, 0.3), 3) if not slow else min(slow, 3.0)
            outbox = rng.random() < 0.3
            self._spawn(self._task(key, Started("keyed", cancelled=cancel), fn, key, customer,
                                   seconds, outbox=outbox))
        elif roll < 0.43:
            seconds = round(rng.uniform(0.05, 0.5), 3)
            self._spawn(self._task(key, Started("limited", cancelled=cancel), soak_limited,
                                   key, seconds))
        elif roll < 0.45:
            how = rng.choice(sorted(HOSTILE))
            self._spawn(self._task(key, Started("hostile", cancelled=cancel, raises=HOSTILE[how]),
                                   soak_hostile, key, how))
        elif roll < 0.455:
            for i in range(4):  # a burst: several finish at once on one daemon
                sub = f"{key}/{i}"
                self._spawn(self._task(sub, Started("big"), soak_big, sub, rng.randint(3, 8)))
        else:
            self._spawn(self._task(key, Started("task", cancelled=cancel), soak_task, key, slow))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _start(self, key: str, fn: Any, *args: Any, outbox: bool = False) -> int:
        if not outbox:
            handle = await self.retry(lambda: self.client.start(fn, *args, idempotency_key=key))
            return int(handle.id)

        async def in_transaction() -> int:
            # The task becomes visible to claimers only when this transaction commits,
            # a moment after a claimer may have decided there was no keyed work.
            async with self.pool.acquire() as conn, conn.transaction():
                handle = await self.client.start(fn, *args, idempotency_key=key, conn=conn)
                await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            return int(handle.id)

        self.actions["outbox_starts"] += 1
        return int(await self.retry(in_transaction))

    async def _task(
        self, key: str, started: Started, fn: Any, *args: Any, outbox: bool = False
    ) -> None:
        self.ledger[key] = started
        task_id = await self._start(key, fn, *args, outbox=outbox)
        if started.cancelled:
            await asyncio.sleep(self.rng.uniform(0.0, 1.5))  # queued, running or done
            await self.cancel(task_id)

    async def cancel(self, task_id: int) -> list[int]:
        """Cancel; every id it returns is recorded as an acknowledged cancel."""
        self.asked.append(task_id)
        done = await self.retry(lambda: self.client.cancel(task_id))
        hit = list(done.cancelled)  # the task itself first, if it had not finished
        now = datetime.now(UTC)
        self.acked += [(i, now) for i in hit]
        self.actions["cancels"] += 1
        self.actions["cancels_acknowledged"] += bool(hit)
        return hit

    async def _workflow(self, key: str, cancel: bool) -> None:
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
        self.ledger[key] = Started("workflow", payload, cancel)
        task_id = await self._start(key, soak_workflow, key, plan)
        if cancel:  # while it runs, sleeps, waits or has children running
            await asyncio.sleep(rng.uniform(0.0, 3.0))
            await self.cancel(task_id)
        if payload is None:
            return
        await asyncio.sleep(rng.uniform(0.0, 2.5))  # before, during or after it waits
        client = self.client
        sent = await self.retry(lambda: client.send_event(task_id, "go", payload))
        self.actions["sent" if sent else "refused"] += 1

"""Suspended workflows kept in memory (durable/sticky.py): a warm resume continues the
parked coroutine, and anything that may have made it stale sends the resume cold.

The attempts here are claimed and ended by hand on a real database (``Harness``), so
that two daemons' tables can take turns on one workflow in a chosen order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import durable
from durable.codec import digest, dumps
from durable.context import Context
from durable.models import Claimed
from durable.replay import Suspend
from durable.sticky import WorkflowRuns
from durable.store import Store
from durable.store.schema import named_queries
from tests.support.helpers import DirectCheckpoints

QUEUE = "wf_cache"
STARTS: list[int] = []
"""Task ids, once per time the entity's function started (a cold run)."""
UNWOUND: list[int] = []


def add1(v: int) -> int:
    return v + 1


@durable.workflow(queue=QUEUE)
async def wf_entity(ctx: durable.Context, n: int) -> list[int]:
    STARTS.append(ctx.task_id)
    out = []
    try:
        for i in range(n):
            v = await ctx.wait_for_event("e")
            out.append(await ctx.step(f"s{i}", add1, v))
    finally:
        UNWOUND.append(ctx.task_id)
    return out


class Harness:
    """One daemon's workflow runs, with claims and suspensions made by hand."""

    def __init__(self, store: Store, size: int = 10, warn_at: int | None = None) -> None:
        self.store = store
        self.runs = WorkflowRuns(
            store, DirectCheckpoints(store), lambda _: None, size=size, history_warning=warn_at
        )
        self.worker = uuid.uuid4()

    async def claim(self) -> Claimed:
        (task,) = await self.store.claim(QUEUE, [wf_entity.name], 1, 30.0, self.worker)
        return task

    async def attempt(self, task: Claimed | None = None) -> tuple[str, Any]:
        """Run one attempt: ('suspended', status) or ('completed', result)."""
        task = task or await self.claim()
        n = durable.codec.loads(task.args)[0]

        def call(ctx: Context) -> Any:
            return wf_entity.fn(ctx, n)

        try:
            result = await self.runs.run(task, call)
        except Suspend as s:
            status = await self.store.suspend(
                task.id, task.token, task.branch, s.waiting_on, s.wake_at, s.event
            )
            if status not in ("waiting", "queued"):
                self.runs.discard(task.id, task.token)
            return ("suspended", status)
        await self.store.complete_many([(task.id, task.token, dumps(result))])
        return ("completed", result)


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    STARTS.clear()
    UNWOUND.clear()


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[Store]:
    s = await Store.open(dsn)
    try:
        yield s
    finally:
        await s.close()


async def start(dsn: str, n: int) -> int:
    async with durable.connect(dsn) as client:
        return (await client.start(wf_entity, n)).id


async def send(dsn: str, task_id: int, v: int) -> None:
    async with durable.connect(dsn) as client:
        assert await client.send_event(task_id, "e", v)


async def test_a_resume_on_the_same_daemon_continues_the_parked_run(dsn: str, store: Store) -> None:
    a = Harness(store)
    tid = await start(dsn, 4)
    assert await a.attempt() == ("suspended", "waiting")
    for v in range(3):
        await send(dsn, tid, v * 10)
        assert await a.attempt() == ("suspended", "waiting")
    await send(dsn, tid, 30)
    assert await a.attempt() == ("completed", [1, 11, 21, 31])
    assert STARTS.count(tid) == 1  # never replayed
    c = a.runs.counts
    assert (c.warm, c.cold, c.replayed) == (4, 0, 4)  # each: the parked wait, read again
    assert c.loaded == 4  # its own pending event, once per resume
    assert len(a.runs) == 0


async def test_two_daemons_taking_turns_never_continue_a_stale_run(dsn: str, store: Store) -> None:
    a, b = Harness(store), Harness(store)
    tid = await start(dsn, 4)
    assert await a.attempt() == ("suspended", "waiting")  # parked in a
    await send(dsn, tid, 0)
    assert await b.attempt() == ("suspended", "waiting")  # b: cold, parked in b
    await send(dsn, tid, 10)
    # a still holds its run parked at the first wait; b ran the task since.
    assert await a.attempt() == ("suspended", "waiting")
    assert (a.runs.counts.warm, a.runs.counts.cold, a.runs.counts.evicted) == (0, 1, 1)
    await send(dsn, tid, 20)
    assert await a.attempt() == ("suspended", "waiting")  # its own suspension: warm
    assert a.runs.counts.warm == 1
    await send(dsn, tid, 30)
    # b's run is parked at the second wait; a ran the task twice since.
    assert await b.attempt() == ("completed", [1, 11, 21, 31])
    assert (b.runs.counts.warm, b.runs.counts.cold, b.runs.counts.evicted) == (0, 2, 1)
    assert STARTS.count(tid) == 4  # a, b, a (cold), b (cold)


@pytest.mark.parametrize("mode", ["fork", "replay", "retry"])
async def test_a_restart_while_parked_sends_the_resume_cold(
    dsn: str, store: Store, mode: str
) -> None:
    a = Harness(store)
    tid = await start(dsn, 2)
    assert await a.attempt() == ("suspended", "waiting")
    await send(dsn, tid, 0)
    assert await a.attempt() == ("suspended", "waiting")  # parked at the second wait
    await store.cancel([tid])
    await store.restart(tid, mode, 2 if mode == "fork" else None)
    # Fork at 2 keeps the first wait and step, retry keeps both, replay starts an empty
    # branch, which takes the first event again: each ends with [1, 101].
    await send(dsn, tid, 100)
    assert await a.attempt() == ("completed", [1, 101])
    assert (a.runs.counts.warm, a.runs.counts.cold, a.runs.counts.evicted) == (1, 1, 1)
    assert STARTS.count(tid) == 2


async def test_a_cancelled_resume_keeps_nothing_and_the_next_replays(
    dsn: str, store: Store
) -> None:
    a = Harness(store)
    tid = await start(dsn, 2)
    assert await a.attempt() == ("suspended", "waiting")
    await send(dsn, tid, 0)
    task = await a.claim()
    gate = asyncio.Event()
    original = wf_entity.fn.__globals__["add1"]

    def blocking(v: int) -> Any:
        async def wait() -> int:
            await gate.wait()
            return int(original(v))

        return wait()

    wf_entity.fn.__globals__["add1"] = blocking
    try:
        run = asyncio.create_task(a.attempt(task))
        for _ in range(200):  # until the resumed run waits inside its step
            if a.runs.counts.warm == 1:
                break
            await asyncio.sleep(0.01)
        run.cancel()  # the daemon stopping the attempt mid-resume (cancel, lease lost)
        with pytest.raises(asyncio.CancelledError):
            await run
    finally:
        wf_entity.fn.__globals__["add1"] = original
    assert len(a.runs) == 0 and UNWOUND.count(tid) == 1
    await store.release([(task.id, task.token)])
    outcome = await a.attempt()
    assert outcome == ("suspended", "waiting")
    assert (a.runs.counts.warm, a.runs.counts.cold) == (1, 1)
    await send(dsn, tid, 10)
    assert await a.attempt() == ("completed", [1, 11])


async def test_a_full_table_drops_the_oldest_and_unwinds_it(dsn: str, store: Store) -> None:
    a = Harness(store, size=1)
    first, second = await start(dsn, 1), await start(dsn, 1)
    assert await a.attempt() == ("suspended", "waiting")
    assert await a.attempt() == ("suspended", "waiting")
    assert list(a.runs.parked) == [second]
    for _ in range(200):
        if first in UNWOUND:
            break
        await asyncio.sleep(0.01)
    assert first in UNWOUND and second not in UNWOUND  # its finally ran, as at a cold suspend
    await send(dsn, first, 5)
    assert await a.attempt() == ("completed", [6])
    assert (a.runs.counts.cold, a.runs.counts.evicted) == (1, 1)
    await a.runs.close()
    assert second in UNWOUND


# -- cost per resume, whatever the length of the log ------------------------------------


async def seed_history(dsn: str, n: int) -> int:
    """An entity workflow that consumed n events, written as the daemon writes them."""
    tid = await start(dsn, n + 3)
    conn = await asyncpg.connect(dsn)
    try:
        ids = [
            r["id"]
            for r in await conn.fetch(
                "insert into durable.signals (task_id, name, payload)"
                " select $1, 'e', to_jsonb(g) from generate_series(0, $2 - 1) g returning id",
                tid,
                n,
            )
        ]
        rows = []
        for i, sid in enumerate(ids):
            rows.append((2 * i, "event", "e", digest("event", "e", None), str(i), sid))
            dig = digest("step", f"s{i}", [[i], {}])
            rows.append((2 * i + 1, "step", f"s{i}", dig, str(i + 1), None))
        await conn.executemany(
            "insert into durable.events (task_id, branch, seq, kind, name, digest, status,"
            " result, signal_id, attempt) values ($1, 0, $2, $3, $4, $5, 'completed',"
            " $6::jsonb, $7, 1)",
            [(tid, *r) for r in rows],
        )
        await conn.execute("update durable.tasks set started_at = now() where id = $1", tid)
    finally:
        await conn.close()
    return tid


async def rows_touched(dsn: str, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
    """Index and table rows read from durable.events and durable.signals by the
    statements, in one transaction (pg_stat_xact_user_tables counts it alone). Planned
    without sequential scans: on a small log the planner may choose one when it has
    analyzed the table, which reads every row and says nothing about the path measured."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("set local enable_seqscan = off")
            for query, args in statements:
                await conn.fetch(query, *args)
            return int(
                await conn.fetchval(
                    "select sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))"
                    " from pg_stat_xact_user_tables where schemaname = 'durable'"
                    " and relname in ('events', 'signals')"
                )
            )
    finally:
        await conn.close()


ANTI_JOIN = """
select s.id, s.payload::text from durable.signals s
where s.task_id = $1 and s.name = $3
  and not exists (select 1 from durable.events e
                  where e.task_id = s.task_id and e.branch = $2 and e.signal_id = s.id)
order by s.id
limit 1"""
"""How a wait found its event before durable.next_signal: one probe per event sent."""


async def resume_cost(dsn: str, store: Store, n: int) -> tuple[int, ...]:
    """(events read, calls replayed, rows the wait's statements touch) for a warm resume
    at history 2n, the events a cold resume reads there, and the rows the anti-join read."""
    a = Harness(store)
    tid = await seed_history(dsn, n)
    await send(dsn, tid, n)
    assert await a.attempt() == ("suspended", "waiting")  # cold: replays 2n, parks
    cold = a.runs.counts.loaded
    await send(dsn, tid, n + 1)
    before = (a.runs.counts.loaded, a.runs.counts.replayed)
    assert await a.attempt() == ("suspended", "waiting")  # warm
    assert a.runs.counts.warm == 1
    loaded = a.runs.counts.loaded - before[0]
    replayed = a.runs.counts.replayed - before[1]
    await send(dsn, tid, n + 2)
    q = named_queries("queries.sql")
    pos = 2 * n + 4
    touched = await rows_touched(
        dsn,
        [
            (q["take_signal"], (tid, 0, "e")),
            (q["load_tail"], (tid, 0, pos)),
            ("select durable.next_signal($1, 0, 'e')", (tid,)),
        ],
    )
    old = await rows_touched(dsn, [(ANTI_JOIN, (tid, 0, "e"))])
    await store.cancel([tid])  # the event sent last leaves it queued
    return loaded, replayed, touched, cold, old


async def test_a_warm_resume_costs_the_same_at_2000_events_as_at_100(
    dsn: str, store: Store
) -> None:
    small = await resume_cost(dsn, store, 50)
    large = await resume_cost(dsn, store, 1000)
    assert small[:3] == large[:3]
    assert small[0] <= 2 and small[1] <= 2
    assert small[2] <= 10
    # A cold resume reads the whole log: that is what the table spares.
    assert (small[3], large[3]) == (100, 2000)
    # The measure has teeth: the anti-join it replaced grows with the log.
    assert large[4] > 10 * small[4]


@pytest.mark.parametrize("size", [10, 0])
async def test_a_log_passing_the_warning_size_is_reported_once(
    dsn: str, store: Store, size: int, capsys: pytest.CaptureFixture[str]
) -> None:
    a = Harness(store, size=size, warn_at=5)  # positions: wait, step, wait, step, wait...
    tid = await start(dsn, 5)
    assert await a.attempt() == ("suspended", "waiting")
    for v in range(4):
        await send(dsn, tid, v)
        assert await a.attempt() == ("suspended", "waiting")
        # The second resume takes the log to 5 positions (its third wait), and only it.
        assert a.runs.counts.history_warnings == (1 if v >= 1 else 0)
    assert capsys.readouterr().out.count("workflow_history_large") == 1

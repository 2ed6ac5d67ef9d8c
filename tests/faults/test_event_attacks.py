"""Attacks on workflow events: ctx.wait_for_event, client.send_event, durable.send_event.

Interleavings are forced by claiming and ending attempts by hand (``Harness``), by
holding the task's row lock in a transaction left open, and by waiting on pg_locks,
never by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import durable
from durable.codec import dumps, loads
from durable.context import Context
from durable.models import Claimed
from durable.registry import registry
from durable.replay import ContinueAsNew, Suspend
from durable.sticky import WorkflowRuns
from durable.store import Store
from tests.support.helpers import DirectCheckpoints, execute, fetchval, wait_for

QUEUE = "attack_events"


@durable.workflow(queue=QUEUE)
async def wf_ev_timeout(ctx: durable.Context) -> list[Any]:
    """A wait with a timeout; after a timeout, a second wait of the same name."""
    try:
        return ["got", await ctx.wait_for_event("e", timeout=3600)]
    except durable.EventTimeout:
        return ["late", await ctx.wait_for_event("e")]


@durable.workflow(queue=QUEUE)
async def wf_ev_collect(ctx: durable.Context, n: int) -> list[Any]:
    return [await ctx.wait_for_event("e") for _ in range(n)]


@durable.workflow(queue=QUEUE)
async def wf_ev_switch(ctx: durable.Context) -> list[Any]:
    """Waits for 'a' with a timeout, then switches to 'b'."""
    try:
        first = await ctx.wait_for_event("a", timeout=3600)
    except durable.EventTimeout:
        first = "timeout"
    return [first, await ctx.wait_for_event("b")]


@durable.workflow(queue=QUEUE)
async def wf_ev_chain(ctx: durable.Context, seen: list[Any], per_run: int, n: int) -> list[Any]:
    for _ in range(per_run):
        if len(seen) >= n:
            return seen
        seen = [*seen, await ctx.wait_for_event("e")]
    if len(seen) >= n:
        return seen
    ctx.continue_as_new(seen, per_run, n)


@durable.workflow(queue=QUEUE)
async def wf_ev_parent(ctx: durable.Context) -> list[Any]:
    """Waits on a child (which waits for 'e'), then for its own 'p'."""
    return [await ctx.run(wf_ev_collect, 1), await ctx.wait_for_event("p")]


@durable.workflow(queue=QUEUE)
async def wf_ev_size(ctx: durable.Context) -> int:
    return len(await ctx.wait_for_event("e"))


_FNS = {
    f.name: f.fn
    for f in (wf_ev_timeout, wf_ev_collect, wf_ev_switch, wf_ev_chain, wf_ev_parent, wf_ev_size)
}


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[Store]:
    s = await Store.open(dsn)
    try:
        yield s
    finally:
        await s.close()


class Harness:
    """One daemon's workflow runs (its warm cache), with claims and outcomes made by hand."""

    def __init__(self, store: Store, size: int = 10) -> None:
        self.store = store
        self.runs = WorkflowRuns(store, DirectCheckpoints(store), registry.get, size=size)
        self.worker = uuid.uuid4()

    async def claim(self) -> Claimed:
        # A row a sender holds locked is skipped by the claim: try again until it is free.
        async def one() -> list[Claimed]:
            return await self.store.claim(QUEUE, list(_FNS), 1, 30.0, self.worker)

        claimed: list[Claimed] = await wait_for(one)
        return claimed[0]

    async def run(self, task: Claimed) -> tuple[str, Any]:
        fn = _FNS[task.name]
        args, kwargs = loads(task.args), loads(task.kwargs)

        def call(ctx: Context) -> Any:
            return fn(ctx, *args, **kwargs)

        try:
            return ("completed", await self.runs.run(task, call))
        except Suspend as s:
            return ("suspended", s)
        except ContinueAsNew as c:
            return ("continued", c)

    async def finish(self, task: Claimed, outcome: tuple[str, Any]) -> Any:
        kind, value = outcome
        if kind == "suspended":
            s: Suspend = value
            status = await self.store.suspend(
                task.id, task.token, task.branch, s.waiting_on, s.wake_at, s.event
            )
            if status not in ("waiting", "queued"):
                self.runs.discard(task.id, task.token)
            return status
        if kind == "continued":
            c: ContinueAsNew = value
            return await self.store.continue_as_new(task.id, task.token, c.args_json, c.kwargs_json)
        await self.store.complete_many([(task.id, task.token, dumps(value))])
        return value

    async def attempt(self, task: Claimed | None = None) -> tuple[str, Any]:
        task = task or await self.claim()
        self.last = task
        outcome = await self.run(task)
        return outcome[0], await self.finish(task, outcome)


async def start(dsn: str, fn: Any, *args: Any) -> int:
    async with durable.connect(dsn) as client:
        return (await client.start(fn, *args)).id


async def send(dsn: str, task_id: int, v: Any, name: str = "e", key: str | None = None) -> bool:
    async with durable.connect(dsn) as client:
        return await client.send_event(task_id, name, v, idempotency_key=key)


async def status(dsn: str, task_id: int) -> str:
    return str(await fetchval(dsn, "select status from durable.tasks where id = $1", task_id))


async def due_now(dsn: str, task_id: int) -> None:
    """The pending wait's timeout (its recorded deadline and the task's timer) is now."""
    await execute(
        dsn,
        "update durable.events set wake_at = now() where task_id = $1 and status = 'pending'",
        task_id,
    )
    await execute(
        dsn,
        "update durable.tasks set wake_at = now() where id = $1 and status = 'waiting'",
        task_id,
    )


async def lock_waiters(dsn: str) -> int:
    return int(
        await fetchval(
            dsn, "select count(*) from pg_locks where not granted and locktype = 'transactionid'"
        )
    )


async def replayed(store: Store, task: Claimed) -> Any:
    """The finished workflow's code run again over its recorded log: what a replay sees."""
    events = await store.load_events(task.id, task.branch)
    ctx = Context(store, task, events, DirectCheckpoints(store), lambda _: None)
    result = await _FNS[task.name](ctx, *loads(task.args), **loads(task.kwargs))
    ctx.check_consumed()
    return result


async def waits(dsn: str, task_id: int) -> list[tuple[str, str, Any]]:
    """The task's recorded waits: (status, result, the signal it took)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select status, result::text, signal_id from durable.events"
            " where task_id = $1 and kind = 'event' order by seq",
            task_id,
        )
    finally:
        await conn.close()
    return [(r["status"], r["result"], r["signal_id"]) for r in rows]


async def untaken(dsn: str, task_id: int) -> list[Any]:
    """Payloads of the task's events no wait took, oldest first."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select s.payload::text from durable.signals s where s.task_id = $1"
            " and s.id not in (select signal_id from durable.events e"
            "  where e.task_id = $1 and e.signal_id is not null) order by s.id",
            task_id,
        )
    finally:
        await conn.close()
    return [loads(r[0]) for r in rows]


# -- 1. a timeout racing an event -------------------------------------------------------


async def test_an_event_sent_just_before_the_timeout_is_taken(dsn: str, store: Store) -> None:
    """Sent while the wait is pending, then the timeout passes before any claim: the
    event wakes the task first and the wait takes it; the timer finds nothing to wake."""
    h = Harness(store)
    tid = await start(dsn, wf_ev_timeout)
    assert await h.attempt() == ("suspended", "waiting")
    assert await send(dsn, tid, 1)
    assert await status(dsn, tid) == "queued"
    await due_now(dsn, tid)
    assert await store.wake_timers() == 0
    assert await h.attempt() == ("completed", ["got", 1])
    assert [s for s, _, _ in await waits(dsn, tid)] == ["completed"]
    assert await replayed(store, h.last) == ["got", 1]
    assert await untaken(dsn, tid) == []


async def test_an_event_sent_after_the_timer_woke_the_task_but_before_its_claim_wins(
    dsn: str, store: Store
) -> None:
    """The timer woke the task (its wait is due); the event commits before the claim's
    take: the wait sees the event, once, and a replay sees the same."""
    h = Harness(store)
    tid = await start(dsn, wf_ev_timeout)
    assert await h.attempt() == ("suspended", "waiting")
    await due_now(dsn, tid)
    assert await store.wake_timers() == 1
    assert await send(dsn, tid, 2)
    assert await Harness(store, size=0).attempt() == ("completed", ["got", 2])
    assert [s for s, _, _ in await waits(dsn, tid)] == ["completed"]
    assert await untaken(dsn, tid) == []


@pytest.mark.parametrize("cache", [0, 10])
async def test_an_event_committed_while_the_claim_settles_the_timeout_stays_for_the_next_wait(
    dsn: str, store: Store, cache: int
) -> None:
    """The claim's take runs while the event is uncommitted (its sender holds the task's
    row lock) and the deadline has passed: the wait times out, its fence waits for the
    sender, the event commits. The timeout is what the workflow sees and a replay sees;
    the event is not lost: the next wait of the name takes it."""
    h = Harness(store, size=cache)
    tid = await start(dsn, wf_ev_timeout)
    assert await h.attempt() == ("suspended", "waiting")
    await due_now(dsn, tid)
    assert await store.wake_timers() == 1
    task = await h.claim()
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        assert await conn.fetchval("select durable.send_event($1, 'e', '3')", tid)
        run = asyncio.create_task(h.attempt(task))
        await wait_for(lambda: lock_waiters(dsn))  # the fence waits for the sender
        await tx.commit()
    finally:
        await conn.close()
    assert await run == ("completed", ["late", 3])
    assert [s for s, _, _ in await waits(dsn, tid)] == ["failed", "completed"]
    assert await replayed(store, task) == ["late", 3]
    assert await untaken(dsn, tid) == []


async def test_an_event_sent_after_the_timeout_is_recorded_waits_for_a_later_wait(
    dsn: str, store: Store
) -> None:
    h = Harness(store)
    tid = await start(dsn, wf_ev_switch)
    assert await h.attempt() == ("suspended", "waiting")
    await due_now(dsn, tid)
    assert await store.wake_timers() == 1
    assert await h.attempt() == ("suspended", "waiting")  # 'a' timed out; waits for 'b'
    assert await send(dsn, tid, "late-a", name="a")  # stays; wakes nothing
    assert await status(dsn, tid) == "waiting"
    assert await send(dsn, tid, "b", name="b")
    assert await h.attempt() == ("completed", ["timeout", "b"])
    assert await untaken(dsn, tid) == ["late-a"]
    assert await replayed(store, h.last) == ["timeout", "b"]


# -- 2. bursts, concurrent senders, restarts and chains ------------------------------------


@pytest.mark.parametrize("cache", [0, 1])
async def test_concurrent_bursts_are_taken_in_commit_order_once_each(
    dsn: str, store: Store, cache: int
) -> None:
    """Four producers send 10 events each, concurrently, while the workflow takes them one
    wait at a time (its cache kept or dropped between attempts): every event is taken
    once, each producer's in the order it sent them, and in the order they committed."""
    n = 40
    h = Harness(store, size=cache)
    tid = await start(dsn, wf_ev_collect, n)

    async def producer(p: int) -> None:
        async with durable.connect(dsn) as client:
            for i in range(10):
                assert await client.send_event(tid, "e", [p, i])

    producers = asyncio.gather(*(producer(p) for p in range(4)))
    outcome: tuple[str, Any] = ("suspended", "waiting")
    while outcome[0] == "suspended":
        await wait_for(lambda: _ready(dsn, tid))
        if cache == 0:
            h = Harness(store, size=0)  # a daemon restart: every resume is cold
        outcome = await h.attempt()
    await producers
    assert outcome[0] == "completed"
    got = outcome[1]
    assert sorted(map(tuple, got)) == [(p, i) for p in range(4) for i in range(10)]
    for p in range(4):
        assert [i for q, i in got if q == p] == list(range(10))
    conn = await asyncpg.connect(dsn)
    try:
        sent = [loads(r[0]) for r in await conn.fetch(
            "select payload::text from durable.signals where task_id = $1 order by id", tid
        )]
    finally:
        await conn.close()
    assert got == sent
    assert await replayed(store, h.last) == got


async def _ready(dsn: str, task_id: int) -> bool:
    return await status(dsn, task_id) in ("queued", "completed")


async def test_a_burst_across_continue_as_new_is_taken_once_in_order(
    dsn: str, store: Store
) -> None:
    """30 events sent at once to a chain that continues every 4: each run hands the rest
    on, in order; none is taken twice or lost, whether a run parked warm or not."""
    h = Harness(store)
    tid = await start(dsn, wf_ev_chain, [], 4, 30)
    assert await h.attempt() == ("suspended", "waiting")
    async with durable.connect(dsn) as client:
        for i in range(30):
            assert await client.send_event(tid, "e", i, idempotency_key=f"k{i}")
    runs = [tid]
    while True:
        kind, value = await h.attempt()
        if kind == "completed":
            break
        assert kind == "continued"
        runs.append(int(value))
        # A resend of every key, to the new run, delivers nothing more.
        async with durable.connect(dsn) as client:
            for i in range(30):
                assert await client.send_event(runs[-1], "e", -1, idempotency_key=f"k{i}")
    assert value == list(range(30))
    assert await untaken(dsn, runs[-1]) == []


# -- 4. limits -----------------------------------------------------------------------------


async def _take_buffers(conn: asyncpg.Connection, task_id: int) -> tuple[int, int]:
    """(buffers touched, rows) of the wait's take as the store runs it."""
    plan = await conn.fetchval(
        "explain (analyze, buffers, format json) select s.id, s.payload::text"
        " from durable.signals s where s.id = (select durable.next_signal($1, 0, 'e'))",
        task_id,
    )
    top = json.loads(plan)[0]["Plan"]
    return top["Shared Hit Blocks"] + top["Shared Read Blocks"], top["Actual Rows"]


async def _consume(conn: asyncpg.Connection, task_id: int, upto: int) -> None:
    """Record waits 0..upto-1 as having taken the task's first ``upto`` events."""
    await conn.execute(
        "insert into durable.events (task_id, branch, seq, kind, name, digest, status,"
        " result, signal_id, attempt)"
        " select $1, 0, n - 1, 'event', 'e', 'd', 'completed', s.payload, s.id, 1"
        "   from (select id, payload, row_number() over (order by id) as n"
        "           from durable.signals where task_id = $1) s"
        "  where n <= $2 and not exists (select 1 from durable.events e"
        "    where e.task_id = $1 and e.branch = 0 and e.seq = n - 1)",
        task_id,
        upto,
    )


@pytest.mark.parametrize("analyzed", [False, True])
async def test_taking_the_10000th_pending_event_touches_what_the_10th_does(
    dsn: str, analyzed: bool
) -> None:
    """10,000 events of one name, pending: the take at the 10,000th reads as many buffers
    and rows as at the 10th (two index probes), with statistics stale or fresh."""
    tid = await start(dsn, wf_ev_collect, 10_000)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "select durable.send_event($1, 'e', to_jsonb(i)) from generate_series(1, 10000) i",
            tid,
        )
        await _consume(conn, tid, 9)
        if analyzed:
            await conn.execute("analyze durable.signals; analyze durable.events")
        early = await _take_buffers(conn, tid)
        await _consume(conn, tid, 9_999)
        late = await _take_buffers(conn, tid)
        assert await conn.fetchval(
            "select s.payload from durable.signals s"
            " where s.id = (select durable.next_signal($1, 0, 'e'))", tid
        ) == "10000"
    finally:
        await conn.close()
    assert late[1] == early[1] == 1
    assert late[0] <= early[0] + 4, (early, late)  # a deeper index level at most


async def _count(dsn: str, task_id: int) -> int:
    return int(await fetchval(dsn, "select count(*) from durable.signals where task_id = $1", task_id))


async def test_names_keys_and_payloads_at_their_limits(dsn: str, store: Store) -> None:
    """200 characters and 2000 key bytes pass, one more is refused with one line, from
    Python and from SQL alike; a payload of exactly MAX_PAYLOAD bytes is delivered and
    one byte more is refused; NUL and lone surrogates are refused. Nothing refused is
    stored, and what passed is taken intact."""
    from durable.codec import MAX_PAYLOAD
    from durable.errors import PayloadError
    from durable.validation import InvalidValue

    tid = await start(dsn, wf_ev_size)
    async with durable.connect(dsn) as client:
        assert await client.send_event(tid, "n" * 200, 1, idempotency_key="é" * 1000)
        bad: list[tuple[str, Any, str | None, type[Exception]]] = [
            ("n" * 201, 1, None, InvalidValue),
            ("n", 1, "k" * 2001, InvalidValue),
            ("n", 1, "é" * 1000 + "k", InvalidValue),
            ("a\0b", 1, None, InvalidValue),
            ("a\ud800", 1, None, InvalidValue),
            ("n", 1, "k\0", InvalidValue),
            ("n", "a\0b", None, PayloadError),
            ("n", "a\udfff", None, PayloadError),
            ("n", "x" * (MAX_PAYLOAD - 1), None, PayloadError),  # its quotes make 1 over
        ]
        for name, payload, key, error in bad:
            with pytest.raises(error) as info:
                await client.send_event(tid, name, payload, idempotency_key=key)
            assert "\n" not in str(info.value)
        assert await client.send_event(tid, "e", "x" * (MAX_PAYLOAD - 2))  # exactly the limit
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("select durable.send_event($1, $2, '1')", tid, "m" * 200)
        for args in [("m" * 201, None), ("m", "k" * 2001), ("", None), (None, None)]:
            with pytest.raises(asyncpg.InvalidParameterValueError) as sql_info:
                await conn.fetchval("select durable.send_event($1, $2, '1', $3)", tid, *args)
            assert "\n" not in str(sql_info.value)
        with pytest.raises(asyncpg.UntranslatableCharacterError):
            await conn.fetchval("select durable.send_event($1, 'm', '\"\\u0000\"')", tid)
    finally:
        await conn.close()
    assert await _count(dsn, tid) == 3
    h = Harness(store)
    kind, value = await h.attempt()
    assert (kind, value) == ("completed", MAX_PAYLOAD - 2)


# -- 3. where an event goes ---------------------------------------------------------------


async def test_an_event_sent_from_sql_in_a_transaction_that_rolls_back_is_not_delivered(
    dsn: str, store: Store
) -> None:
    """Nothing stored, the task still waiting, and no wake-up announced."""
    h = Harness(store)
    tid = await start(dsn, wf_ev_collect, 1)
    assert await h.attempt() == ("suspended", "waiting")
    listener = await asyncpg.connect(dsn)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("durable_ready", lambda *a: heard.put_nowait(a[3]))
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            assert await conn.fetchval("select durable.send_event($1, 'e', '1')", tid)
            assert await conn.fetchval(
                "select status from durable.tasks where id = $1", tid
            ) == "queued"
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await conn.close()
    await execute(dsn, "select pg_notify('durable_ready', 'sentinel')")
    try:
        assert await asyncio.wait_for(heard.get(), 20) == "sentinel"
    finally:
        await listener.close()
    assert await status(dsn, tid) == "waiting" and await _count(dsn, tid) == 0
    assert await send(dsn, tid, 2)
    assert await h.attempt() == ("completed", [2])


class _Rollback(Exception):
    pass


async def test_an_event_committed_late_from_sql_is_taken_not_the_timeout(
    dsn: str, store: Store
) -> None:
    """The user's transaction sends the event and holds on; the wait's timeout falls due
    meanwhile. The timer skips the locked row; the late commit wakes the task and its
    wait takes the event (it was sent, under the row's lock, before the timer could
    fire): one outcome, recorded."""
    h = Harness(store)
    tid = await start(dsn, wf_ev_timeout)
    assert await h.attempt() == ("suspended", "waiting")
    await due_now(dsn, tid)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            assert await conn.fetchval("select durable.send_event($1, 'e', '5')", tid)
            assert await store.wake_timers() == 0
    finally:
        await conn.close()
    assert await status(dsn, tid) == "queued"
    assert await h.attempt() == ("completed", ["got", 5])
    assert await replayed(store, h.last) == ["got", 5]


async def test_events_to_a_child_and_to_a_parent_waiting_on_it(dsn: str, store: Store) -> None:
    """The parent waits on its child, not on 'p': a 'p' sent now is kept and does not
    wake it; the child's 'e' wakes the child alone; the parent then takes its 'p'."""
    h = Harness(store)
    pid = await start(dsn, wf_ev_parent)
    assert await h.attempt() == ("suspended", "waiting")
    cid = int(await fetchval(dsn, "select id from durable.tasks where parent_id = $1", pid))
    assert await h.attempt() == ("suspended", "waiting")  # the child waits for 'e'
    assert await send(dsn, pid, "p", name="p")
    assert await send(dsn, pid, "stray", name="e")  # the parent's, not the child's
    assert await status(dsn, pid) == "waiting" and await status(dsn, cid) == "waiting"
    assert await send(dsn, cid, "c")
    assert await h.attempt() == ("completed", ["c"])
    assert await status(dsn, pid) == "queued"
    assert await h.attempt() == ("completed", [["c"], "p"])
    assert await untaken(dsn, pid) == ["stray"]


async def test_events_to_a_cancelled_workflow_and_one_past_its_deadline(
    dsn: str, store: Store
) -> None:
    """Cancelled: refused (False), nothing stored. Past its deadline but not yet failed:
    accepted (it is unfinished, as documented); it then fails with DeadlineExceeded and
    later sends are refused."""
    h = Harness(store)
    cancelled = await start(dsn, wf_ev_collect, 1)
    assert await h.attempt() == ("suspended", "waiting")
    async with durable.connect(dsn) as client:
        await client.cancel(cancelled)
        assert not await client.send_event(cancelled, "e", 1)
        assert await _count(dsn, cancelled) == 0
        late = (await client.start(wf_ev_collect, 1, deadline=3600)).id
        assert await h.attempt() == ("suspended", "waiting")
        await execute(
            dsn, "update durable.tasks set deadline = now() - interval '1 s' where id = $1", late
        )
        assert await client.send_event(late, "e", 1)
        assert await status(dsn, late) == "queued"
        await store.expire_deadlines()  # fails it: past due, nobody runs it
        assert await status(dsn, late) == "failed"
        assert not await client.send_event(late, "e", 2)
    assert await _count(dsn, late) == 1


# -- 5. a send racing the suspension ------------------------------------------------------


async def test_a_repeatable_read_sender_whose_snapshot_predates_the_suspension_fails_loudly(
    dsn: str, store: Store
) -> None:
    """The sender's snapshot sees the task running; the suspension commits before it
    sends. Stored without a wake-up would strand the workflow: it must instead fail
    (serialization failure, the user's transaction retries) and its retry wake the task."""
    h = Harness(store)
    tid = await start(dsn, wf_ev_collect, 1)
    task = await h.claim()
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction(isolation="repeatable_read")
        await tx.start()
        assert await conn.fetchval("select status from durable.tasks where id = $1", tid) == "running"
        assert await h.attempt(task) == ("suspended", "waiting")
        with pytest.raises(asyncpg.SerializationError):
            await conn.fetchval("select durable.send_event($1, 'e', '1')", tid)
        await tx.rollback()
        async with conn.transaction(isolation="repeatable_read"):
            assert await conn.fetchval("select durable.send_event($1, 'e', '1')", tid)
    finally:
        await conn.close()
    assert await status(dsn, tid) == "queued"
    assert await h.attempt() == ("completed", [1])


@pytest.mark.parametrize("order", ["send_first", "suspend_first"])
async def test_a_send_and_the_suspension_in_either_order_wake_the_workflow(
    dsn: str, store: Store, order: str
) -> None:
    """The send holds the row lock while the suspension waits for it, or the reverse:
    either way the task ends queued, never waiting with its event stored."""
    h = Harness(store, size=0)
    tid = await start(dsn, wf_ev_switch)
    assert await h.attempt() == ("suspended", "waiting")  # waits for 'a' (timeout)
    await due_now(dsn, tid)
    assert await store.wake_timers() == 1  # the timer wakes it: it will switch to 'b'
    task = await h.claim()
    outcome = await h.run(task)  # 'a' timed out; about to suspend on 'b'
    assert outcome[0] == "suspended" and outcome[1].event == "b"
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        if order == "send_first":
            assert await conn.fetchval("select durable.send_event($1, 'b', '7')", tid)
            suspension = asyncio.create_task(h.finish(task, outcome))
            await wait_for(lambda: lock_waiters(dsn))
            await tx.commit()
            assert await suspension == "queued"
        else:
            assert await conn.fetchval(
                "select durable.suspend($1, $2, $3, null, null, 'b')",
                task.id, task.token, task.branch,
            ) == "waiting"
            sender = asyncio.create_task(send(dsn, tid, 7, name="b"))
            await wait_for(lambda: lock_waiters(dsn))
            await tx.commit()
            assert await sender
    finally:
        await conn.close()
    assert await status(dsn, tid) == "queued"
    assert await h.attempt() == ("completed", ["timeout", 7])

"""Attacks on the warm workflow cache (durable/sticky.py) and ctx.continue_as_new.

Each test either guards a promise that held under a nasty interleaving, or exposes a
broken one (fixed since). Interleavings are forced by claiming and ending
attempts by hand (``Harness``) or by waiting on database states, never by sleeping.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

import durable
from durable.codec import dumps, loads
from durable.context import Context
from durable.models import Claimed
from durable.replay import ContinueAsNew, Suspend
from durable.sticky import WorkflowRuns
from durable.store import Store
from tests.support.helpers import (
    DirectCheckpoints,
    execute,
    fetchval,
    running_daemon,
    wait_for,
    wait_status,
)

QUEUE = "attack_sticky"
CHAIN_QUEUE = "attack_chain"

STEP_RUNS: list[tuple[int, int]] = []
"""(task id, i) once per time the body of step s{i} actually ran."""
FINALLY_SEEN: list[tuple[int, int | None]] = []
"""(ctx.task_id, durable.current().id) as an unwinding run's finally block saw them."""


def add1(task_id: int, i: int, v: int) -> int:
    STEP_RUNS.append((task_id, i))
    return v + 1


@durable.workflow(queue=QUEUE)
async def wf_attack_entity(ctx: durable.Context, n: int) -> list[int]:
    out = []
    for i in range(n):
        v = await ctx.wait_for_event("e")
        out.append(await ctx.step(f"s{i}", add1, ctx.task_id, i, v))
    return out


@durable.workflow(queue=QUEUE)
async def wf_attack_evictee(ctx: durable.Context) -> str:
    try:
        return str(await ctx.wait_for_event("go"))
    finally:
        try:
            seen: int | None = durable.current().id
        except durable.DurableError:
            seen = None
        FINALLY_SEEN.append((ctx.task_id, seen))


@durable.workflow(queue=QUEUE)
async def wf_attack_sleeper(ctx: durable.Context) -> str:
    await ctx.sleep(0.05)
    await ctx.sleep_until(await ctx.now() + timedelta(seconds=0.05))
    return "woke"


@durable.workflow(queue=CHAIN_QUEUE)
async def wf_attack_acc(ctx: durable.Context, total: int, per_run: int, target: int) -> int:
    """Adds the events it is sent; continues as new every ``per_run`` events."""
    for _ in range(per_run):
        if total >= target:
            return total
        total += await ctx.wait_for_event("add")
    if total >= target:
        return total
    ctx.continue_as_new(total, per_run, target)


@durable.workflow(queue=CHAIN_QUEUE, version="1")
async def wf_attack_versioned(ctx: durable.Context, n: int) -> int:
    await ctx.wait_for_event("tick")
    if n >= 3:
        return n
    ctx.continue_as_new(n + 1)


@durable.workflow(queue=CHAIN_QUEUE, deadline=3600)
async def wf_attack_deadlined(ctx: durable.Context, n: int) -> int:
    await ctx.wait_for_event("tick")
    if n >= 3:
        return n
    ctx.continue_as_new(n + 1)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    STEP_RUNS.clear()
    FINALLY_SEEN.clear()


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
        self.runs = WorkflowRuns(store, DirectCheckpoints(store), lambda _: None, size=size)
        self.worker = uuid.uuid4()

    async def claim(self, names: list[str] | None = None, queue: str = QUEUE) -> Claimed:
        (task,) = await self.store.claim(
            queue, names or [wf_attack_entity.name], 1, 30.0, self.worker
        )
        return task

    async def run(self, task: Claimed) -> tuple[str, Any]:
        """Run the attempt's code; ('suspended', Suspend), ('continued', c) or result."""
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
        outcome = await self.run(task)
        return outcome[0], await self.finish(task, outcome)


_FNS = {
    wf_attack_entity.name: wf_attack_entity.fn,
    wf_attack_versioned.name: wf_attack_versioned.fn,
    wf_attack_acc.name: wf_attack_acc.fn,
    wf_attack_deadlined.name: wf_attack_deadlined.fn,
}


async def send(dsn: str, task_id: int, v: Any, name: str = "e", key: str | None = None) -> bool:
    async with durable.connect(dsn) as client:
        return await client.send_event(task_id, name, v, idempotency_key=key)


async def start(dsn: str, fn: Any, *args: Any, **options: Any) -> int:
    async with durable.connect(dsn) as client:
        return (await client.start(fn, *args, **options)).id


async def successor(dsn: str, task_id: int) -> int:
    """The run that continued ``task_id``, once it exists."""

    async def check() -> Any:
        return await fetchval(dsn, "select continued_as from durable.tasks where id = $1", task_id)

    return int(await wait_for(check))


# -- a parked run, and someone else advances the task ---------------------------------------


@pytest.mark.parametrize("how", ["reaped", "released"])
async def test_a_run_advanced_elsewhere_then_abandoned_is_never_continued_stale(
    dsn: str, store: Store, how: str
) -> None:
    """Daemon A parks the run at its first wait; daemon B resumes it, runs step s0 (its
    checkpoint commits), reaches the second wait and then dies (lease reaped) or shuts
    down (released) before writing its suspension. A's parked coroutine, at the first wait,
    must not be continued, and s0 must not run again."""
    a, b = Harness(store), Harness(store)
    tid = await start(dsn, wf_attack_entity, 2)
    assert await a.attempt() == ("suspended", "waiting")  # parked in a at wait 0
    assert await send(dsn, tid, 0)
    task_b = await b.claim()
    kind, _ = await b.run(task_b)  # cold in b: takes event 0, runs s0, parks at wait 1
    assert kind == "suspended" and [(tid, 0)] == STEP_RUNS
    if how == "reaped":
        await execute(
            dsn, "update durable.tasks set lease_until = now() - interval '1 s' where id = $1", tid
        )
        assert await store.reap_expired() == [(tid, "queued")]
    else:
        await store.release([(task_b.id, task_b.token)])
    b.runs.discard(task_b.id, task_b.token)
    assert await send(dsn, tid, 10)
    assert await a.attempt() == ("completed", [1, 11])
    assert (a.runs.counts.warm, a.runs.counts.cold) == (0, 1)
    assert [(tid, 0), (tid, 1)] == STEP_RUNS  # s0's committed checkpoint was replayed


async def test_a_stale_entry_that_is_warm_again_after_a_round_trip_is_not_used(
    dsn: str, store: Store
) -> None:
    """A parks, B resumes and parks, A resumes (cold) and parks, B claims: B's entry is
    two suspensions old; B must replay, and no step runs twice."""
    a, b = Harness(store), Harness(store)
    tid = await start(dsn, wf_attack_entity, 4)
    assert await a.attempt() == ("suspended", "waiting")
    for i, h in enumerate([b, a, b]):
        assert await send(dsn, tid, 10 * i)
        assert await h.attempt() == ("suspended", "waiting")
    assert await send(dsn, tid, 30)
    assert await a.attempt() == ("completed", [1, 11, 21, 31])
    assert sorted(STEP_RUNS) == [(tid, i) for i in range(4)]
    assert a.runs.counts.warm == 0 and b.runs.counts.warm == 0


async def test_an_event_sent_while_the_suspension_is_written_is_taken_by_the_warm_resume(
    dsn: str, store: Store
) -> None:
    """send_event blocks on the task's row lock held by the suspend statement's
    transaction (here: a transaction holding it open), and commits right after: the
    workflow must be woken and the warm resume must take the event."""
    a = Harness(store)
    tid = await start(dsn, wf_attack_entity, 1)
    task = await a.claim()
    kind, _ = await a.run(task)
    assert kind == "suspended"
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        # The suspend statement, inside a transaction left open.
        status = await conn.fetchval(
            "select durable.suspend($1, $2, $3, null, null, 'e')", task.id, task.token, 0
        )
        assert status == "waiting"
        sender = asyncio.create_task(send(dsn, tid, 41))

        async def blocked() -> bool:
            return bool(
                await fetchval(
                    dsn,
                    "select count(*) from pg_locks where not granted and locktype = 'transactionid'",
                )
            )

        await wait_for(blocked)  # send_event waits on the row lock
        await tx.commit()
    finally:
        await conn.close()
    assert await sender
    assert await wait_status(dsn, tid, "queued") == "queued"
    assert await a.attempt() == ("completed", [42])
    assert a.runs.counts.warm == 1


async def test_the_same_event_twice_with_one_key_around_a_warm_resume_is_taken_once(
    dsn: str, store: Store
) -> None:
    a = Harness(store)
    tid = await start(dsn, wf_attack_entity, 3)
    assert await a.attempt() == ("suspended", "waiting")
    assert await send(dsn, tid, 0, key="k0")
    task = await a.claim()
    # The producer retries while the warm resume runs (the task is running).
    assert await send(dsn, tid, 0, key="k0")
    assert await a.attempt(task) == ("suspended", "waiting")
    assert await send(dsn, tid, 0, key="k0")  # and again after
    assert await fetchval(dsn, "select status from durable.tasks where id = $1", tid) == "waiting"
    assert await send(dsn, tid, 10, key="k1")
    assert await a.attempt() == ("suspended", "waiting")
    assert await send(dsn, tid, 20, key="k2")
    assert await a.attempt() == ("completed", [1, 11, 21])
    assert a.runs.counts.warm == 3 and sorted(STEP_RUNS) == [(tid, i) for i in range(3)]


async def test_a_sleeping_workflow_is_kept_warm(dsn: str) -> None:
    """ctx.sleep parks as ctx.sleep_until does: both wake-ups resume the parked run."""
    async with (
        durable.connect(dsn) as client,
        running_daemon(dsn, queues=QUEUE, workflow_cache=10) as daemon,
    ):
        handle = await client.start(wf_attack_sleeper)
        assert await handle.result(timeout=30) == "woke"
        counts = daemon.metrics.workflows
    assert (counts.warm, counts.cold) == (2, 0)


# -- eviction ----------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [0, 1])
async def test_a_dropped_runs_finally_block_sees_its_own_task(dsn: str, cache: int) -> None:
    """Docs: finally blocks around a wait run 'when the run ends there' -- as at a cold
    suspension, where durable.current() is the workflow's own task."""
    async with (
        durable.connect(dsn) as client,
        running_daemon(dsn, queues=f"{QUEUE}=1", workflow_cache=cache),
    ):
        m = await client.start(wf_attack_evictee)
        await wait_status(dsn, m.id, "waiting")
        n = await client.start(wf_attack_evictee)  # parks too, and pushes m out of a table of 1
        await wait_status(dsn, n.id, "waiting")

        async def unwound() -> bool:
            return any(t == m.id for t, _ in FINALLY_SEEN)

        await wait_for(unwound)
    seen = [s for t, s in FINALLY_SEEN if t == m.id]
    assert seen[0] == m.id, f"run {m.id}'s finally saw durable.current().id == {seen[0]}"


async def test_many_runs_two_daemons_and_a_tiny_cache_run_each_step_once(dsn: str) -> None:
    """Two daemons with a table of 2 serve 16 entity workflows of 4 events each, events
    sent concurrently, each twice with its idempotency key: every workflow ends with the
    right results and no step body ran twice. Which daemon resumes which run is up to the
    race, so a last workflow on one daemon alone makes sure the warm path was taken too."""
    count, n = 16, 4
    async with (
        durable.connect(dsn) as client,
        running_daemon(dsn, queues=f"{QUEUE}=3", workflow_cache=2) as d1,
    ):
        async with running_daemon(dsn, queues=f"{QUEUE}=3", workflow_cache=2) as d2:
            ids = [(await client.start(wf_attack_entity, n)).id for _ in range(count)]
            for i in range(n):
                for t in ids:
                    await wait_status(dsn, t, "waiting")
                sends = [
                    client.send_event(t, "e", 100 * i + j, idempotency_key=f"{t}-{i}")
                    for j, t in enumerate(ids)
                    for _ in range(2)
                ]
                assert all(await asyncio.gather(*sends))
            results = [await client.result(t, timeout=60) for t in ids]
            evicted = sum(d.metrics.workflows.evicted for d in (d1, d2))
        last = (await client.start(wf_attack_entity, 2)).id
        for i in range(2):
            await wait_status(dsn, last, "waiting")
            assert await client.send_event(last, "e", i, idempotency_key=f"{last}-{i}")
        assert await client.result(last, timeout=60) == [1, 2]
        warm = d1.metrics.workflows.warm
    assert results == [[100 * i + j + 1 for i in range(n)] for j in range(count)]
    assert sorted(STEP_RUNS) == sorted(
        [(t, i) for t in ids for i in range(n)] + [(last, 0), (last, 1)]
    )
    assert warm > 0 and evicted > 0  # both paths were taken


# -- continue_as_new ----------------------------------------------------------------------


async def test_an_event_accepted_by_a_run_that_then_continues_is_delivered_to_the_chain(
    dsn: str,
) -> None:
    """Events accepted by a run it did not take before continuing are the next run's: the
    chain gets every event send_event said True to, each once, in order."""
    async with durable.connect(dsn) as client:
        first = await client.start(wf_attack_acc, 0, 1, 3)
        # All sent to the chain's current run, which waits: all accepted, one keyed.
        assert await client.send_event(first.id, "add", 1)
        assert await client.send_event(first.id, "add", 1, idempotency_key="k")
        assert await client.send_event(first.id, "add", 1)
        async with running_daemon(dsn, queues=CHAIN_QUEUE, workflow_cache=10):
            second = await successor(dsn, first.id)
            # A producer retrying the keyed event, to the run it sent it to or to the next:
            # delivered once either way.
            assert await client.send_event(first.id, "add", 1, idempotency_key="k")
            assert await client.send_event(second, "add", 1, idempotency_key="k")
            assert await client.result(first.id, timeout=30) == 3
            runs = await fetchval(dsn, "select count(*) from durable.tasks")
            keyed = await fetchval(
                dsn, "select count(*) from durable.signals where idempotency_key = 'k'"
            )
    # The keyed event as sent to the first run and as the second run's: no third copy.
    assert (runs, keyed) == (3, 2)


async def test_a_keyed_event_the_run_before_took_is_not_delivered_to_the_next_again(
    dsn: str,
) -> None:
    """An entity took a keyed event and continued as new. Its producer, whose reply was
    lost, finds the chain's current run again and resends the event there: the key holds
    across the chain, so the next run does not get it a second time."""
    async with durable.connect(dsn) as client:
        first = await client.start(wf_attack_acc, 0, 1, 3, idempotency_key="entity-7")
        assert await client.send_event(first.id, "add", 1, idempotency_key="k")
        async with running_daemon(dsn, queues=CHAIN_QUEUE, workflow_cache=10):
            second = await successor(dsn, first.id)  # the first run took "k"
            current = await client.start(wf_attack_acc, 0, 1, 3, idempotency_key="entity-7")
            assert current.id == second
            assert await client.send_event(current.id, "add", 1, idempotency_key="k")
            assert await client.send_event(current.id, "add", 1)
            third = await successor(dsn, second)
            assert await client.send_event(third, "add", 1)
            assert await client.result(first.id, timeout=30) == 3
        keyed = await fetchval(
            dsn, "select array_agg(task_id) from durable.signals where idempotency_key = 'k'"
        )
    assert keyed == [first.id]


async def test_a_versioned_runs_successor_stays_on_its_version(dsn: str, store: Store) -> None:
    v1 = Harness(store)
    name = wf_attack_versioned.name
    tid = await start(dsn, wf_attack_versioned, 0)
    assert await fetchval(dsn, "select version from durable.tasks where id = $1", tid) == "1"
    assert await send(dsn, tid, None, name="tick")
    v1_names = [name, name + "\x1f1"]
    kind, next_id = await v1.attempt(await v1.claim(v1_names, CHAIN_QUEUE))
    assert kind == "continued" and next_id
    # A daemon serving only version 2 of the workflow.
    v2_claims = await store.claim(CHAIN_QUEUE, [name, name + "\x1f2"], 1, 30.0, uuid.uuid4())
    version = await fetchval(dsn, "select version from durable.tasks where id = $1", next_id)
    assert (v2_claims, version) == ([], "1")


async def test_an_active_idempotency_key_finds_the_chains_current_run(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        first = await client.start(
            wf_attack_acc, 0, 1, 3, idempotency_key="acct", idempotency="active"
        )
        assert await client.send_event(first.id, "add", 1)
        async with running_daemon(dsn, queues=CHAIN_QUEUE, workflow_cache=10):
            second = await successor(dsn, first.id)
            await wait_status(dsn, second, "waiting")
            again = await client.start(
                wf_attack_acc, 0, 1, 3, idempotency_key="acct", idempotency="active"
            )
            live = await fetchval(
                dsn,
                "select count(*) from durable.tasks where status"
                " in ('queued', 'running', 'waiting')",
            )
    assert (again.id, again.created, live) == (second, False, 1)


async def test_a_forever_idempotency_key_finds_the_chains_current_run(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        first = await client.start(wf_attack_acc, 0, 1, 3, idempotency_key="acct")
        assert await client.send_event(first.id, "add", 1)
        async with running_daemon(dsn, queues=CHAIN_QUEUE, workflow_cache=10):
            second = await successor(dsn, first.id)
            await wait_status(dsn, second, "waiting")
            again = await client.start(wf_attack_acc, 0, 1, 3, idempotency_key="acct")
    assert (again.id, again.created) == (second, False)


async def test_a_deadlined_workflows_successor_has_its_deadline_and_labels(
    dsn: str, store: Store
) -> None:
    """The next run is the same workflow: its deadline (the chain's, unmoved), its tags
    and attributes."""
    tid = await start(dsn, wf_attack_deadlined, 0, tags=["vip"], attributes={"region": "eu"})
    assert await fetchval(dsn, "select deadline from durable.tasks where id = $1", tid) is not None
    assert await send(dsn, tid, None, name="tick")
    h = Harness(store)
    kind, next_id = await h.attempt(await h.claim([wf_attack_deadlined.name], CHAIN_QUEUE))
    assert kind == "continued" and next_id
    same = await fetchval(
        dsn,
        "select a.deadline = b.deadline and b.tags = array['vip']"
        ' and b.attributes = \'{"region": "eu"}\'::jsonb'
        " from durable.tasks a, durable.tasks b where a.id = $1 and b.id = $2",
        tid,
        next_id,
    )
    assert same is True


async def test_retrying_a_run_that_continued_does_not_fork_the_chain(dsn: str) -> None:
    """Run again, a run that continued would reach its continue_as_new again and start a
    second next run beside the chain's own: retry, replay and fork refuse it, in one line
    that names the run to restart."""
    async with durable.connect(dsn) as client:
        first = await client.start(wf_attack_acc, 0, 1, 5)
        assert await client.send_event(first.id, "add", 1)
        async with running_daemon(dsn, queues=CHAIN_QUEUE, workflow_cache=10):
            second = await successor(dsn, first.id)
            await wait_status(dsn, second, "waiting")
            for restart in (
                client.retry(first.id),
                client.replay(first.id),
                client.fork(first.id, 0),
            ):
                with pytest.raises(durable.DurableError, match=f"continued as task {second}"):
                    await restart
            live = await fetchval(
                dsn,
                "select count(*) from durable.tasks where status"
                " in ('queued', 'running', 'waiting')",
            )
            runs = await fetchval(dsn, "select count(*) from durable.tasks")
    assert (live, runs) == (1, 2), f"{live} live runs, {runs} runs in the chain"


async def test_continue_as_new_loses_to_a_cancel_asked_during_the_warm_resume(
    dsn: str, store: Store
) -> None:
    """A warm resume takes the last event and continues as new, while a cancel is asked
    between the claim and the chain statement: the run ends cancelled, no next run."""
    a = Harness(store)
    names = [wf_attack_acc.name]
    tid = await start(dsn, wf_attack_acc, 0, 2, 10)
    assert await a.attempt(await a.claim(names, CHAIN_QUEUE)) == ("suspended", "waiting")
    assert await send(dsn, tid, 1, name="add")
    assert await a.attempt(await a.claim(names, CHAIN_QUEUE)) == ("suspended", "waiting")
    assert await send(dsn, tid, 1, name="add")
    task = await a.claim(names, CHAIN_QUEUE)
    outcome = await a.run(task)
    assert outcome[0] == "continued" and a.runs.counts.warm == 2
    async with durable.connect(dsn) as client:
        await client.cancel(tid)
    assert await a.finish(task, outcome) == 0
    assert await fetchval(dsn, "select status from durable.tasks where id = $1", tid) == "cancelled"
    assert await fetchval(dsn, "select count(*) from durable.tasks") == 1
    assert len(a.runs) == 0

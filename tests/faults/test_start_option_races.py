"""Start options under races: debounce, idempotency scopes, deadlines, delays and
priorities, against a real Postgres, synchronised on database states and events."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import durable
from durable.validation import InvalidValue
from tests.apps import start_option_races_app as app
from tests.support.helpers import ROOT, daemon_env, fetchval, running_daemon, wait_for, wait_status


async def statuses(dsn: str, *ids: int) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select status from durable.tasks where id = any($1::bigint[]) order by id", list(ids)
        )
        return [r["status"] for r in rows]
    finally:
        await conn.close()


# -- debounce keys and rows going back to 'queued' ---------------------------------------


@pytest.mark.timeout(60)
async def test_debounced_workflow_woken_while_its_key_has_a_new_pending_task(dsn: str) -> None:
    """Docs: "Once it has been claimed, the next start makes a new task." The first
    task, a workflow now waiting for an event, must still be wakeable."""
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=app.QUEUE):
        first = await client.start(app.sor_wait, 1, debounce=0, debounce_key="dk")
        await wait_status(dsn, first.id, "waiting")
        second = await client.start(app.sor_wait, 2, debounce=3600, debounce_key="dk")
        assert second.id != first.id and second.created
        assert await client.send_event(first.id, "go", "p")
        assert await first.result(timeout=20) == [1, "p"]


def fresh_gates() -> None:
    """The gates are module globals read at call time: new ones for this test's loop."""
    app.STARTED = asyncio.Event()
    app.GATE = asyncio.Event()
    app.ran.clear()


@pytest.mark.timeout(60)
async def test_debounced_workflow_timer_while_its_key_has_a_new_pending_task(dsn: str) -> None:
    """The timer loop wakes a debounced workflow whose key has a newer pending task; and
    an unrelated task nobody serves still fails at its deadline (the same loop)."""
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=app.QUEUE):
        first = await client.start(app.sor_sleep, 1.0, debounce=0, debounce_key="dk")
        await wait_status(dsn, first.id, "waiting")
        second = await client.start(app.sor_sleep, 2.0, debounce=3600, debounce_key="dk")
        assert second.id != first.id
        unserved = await client.start(app.sor_other, 1, deadline=1.5)
        assert await wait_status(dsn, unserved.id, "failed", timeout=20) == "failed"
        assert await first.result(timeout=20) == 1.0


@pytest.mark.timeout(90)
async def test_debounced_task_retried_while_its_key_has_a_new_pending_task(dsn: str) -> None:
    """A debounced task whose first attempt fails goes back to the queue for its second
    attempt, though a later start of its key made a new pending task meanwhile."""
    fresh_gates()
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=app.QUEUE):
        first = await client.start(app.sor_gated_fail, 1, debounce=0, debounce_key="dk")
        await app.STARTED.wait()
        second = await client.start(app.sor_gated_fail, 2, debounce=3600, debounce_key="dk")
        assert second.id != first.id
        app.GATE.set()
        assert await first.result(timeout=30) == 1


@pytest.mark.parametrize("scope", ["active", "debounce"])
async def test_retry_of_a_finished_task_whose_key_was_taken_again(dsn: str, scope: str) -> None:
    """`durable retry` of a finished task whose "active" idempotency key (or debounce
    key) a newer unfinished task holds. An active key names one unfinished task: the
    retry is refused, in one line naming the holder. A debounce key is about starts: the
    task runs again without it, and later debounced starts still meet the newer task."""
    async with durable.connect(dsn) as client:
        options: dict[str, Any] = (
            {"idempotency_key": "k", "idempotency": "active"} if scope == "active"
            else {"debounce": 3600, "debounce_key": "k"}
        )
        first = await client.start(app.sor_echo, 1, **options)
        await client.cancel(first.id)  # finished: the key is free again
        second = await client.start(app.sor_echo, 2, **options)
        assert second.id != first.id and second.created
        if scope == "active":
            with pytest.raises(
                durable.DurableError, match=f"has the idempotency key of task {second.id}"
            ):
                await client.retry(first.id)
            assert await statuses(dsn, first.id, second.id) == ["cancelled", "queued"]
            return
        await client.retry(first.id)
        assert await statuses(dsn, first.id, second.id) == ["queued", "queued"]
        third = await client.start(app.sor_echo, 3, **options)
        assert (third.id, third.created) == (second.id, False)


async def test_a_huge_negative_deadline_is_refused_as_an_invalid_value(dsn: str) -> None:
    """Client.start checks its options and raises InvalidValue ("deadline must be within
    10 years"); a deadline thousands of years in the past is no better than NaN."""
    async with durable.connect(dsn) as client:
        with pytest.raises(InvalidValue, match="deadline"):
            await client.start(app.sor_echo, 1, deadline=-1e12)
    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.InvalidParameterValueError, match="deadline"):
            await conn.fetchval(
                "select durable.start('sor_echo', '[1]', queue => 'sor', deadline => -1e12)"
            )
    finally:
        await conn.close()


# -- guards: interleavings forced with row locks held open ------------------------------


async def lock_waiters(dsn: str) -> int:
    return int(await fetchval(
        dsn, "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
             " and query like '%durable.tasks%'",
    ))  # fmt: skip


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_active_key_start_racing_the_tasks_completion(dsn: str, outcome: str) -> None:
    """A start with an "active" key while the key's task is being completed (its row
    locked by the completing transaction): it waits, then returns the old task if the
    completion rolled back, or a new one if it committed; never two unfinished tasks."""
    async with durable.connect(dsn) as client:
        first = await client.start(app.sor_echo, 1, idempotency_key="ak", idempotency="active")
        holder = await asyncpg.connect(dsn)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "update durable.tasks set status = 'completed', finished_at = now(),"
                " result = '1' where id = $1", first.id,
            )  # fmt: skip
            racing = asyncio.create_task(
                client.start(app.sor_echo, 2, idempotency_key="ak", idempotency="active")
            )
            await wait_for(lambda: lock_waiters(dsn))
            assert not racing.done()
            await (tx.commit() if outcome == "commit" else tx.rollback())
            got = await racing
        finally:
            await holder.close()
        if outcome == "commit":
            assert got.created and got.id != first.id
            assert await statuses(dsn, first.id, got.id) == ["completed", "queued"]
        else:
            assert not got.created and got.id == first.id
        assert await fetchval(
            dsn, "select count(*) from durable.tasks where active_key = 'ak'"
                 " and status in ('queued', 'running', 'waiting')") == 1  # fmt: skip


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_debounced_start_racing_a_claim_of_the_pending_task(dsn: str, outcome: str) -> None:
    """A debounced start while a claim of the key's pending task is in flight (its row
    locked by the claiming transaction): after the claim commits the start makes a new
    task with its arguments and the claimed one keeps its own; after a rollback it
    updates the pending task. One queued task per key either way."""
    async with durable.connect(dsn) as client:
        first = await client.start(app.sor_echo, 1, debounce=3600, debounce_key="bk")
        holder = await asyncpg.connect(dsn)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "update durable.tasks set status = 'running', claim_token = durable.new_token(),"
                " lease_until = now() + interval '1 hour', started_at = now() where id = $1",
                first.id,
            )  # fmt: skip
            racing = asyncio.create_task(
                client.start(app.sor_echo, 2, debounce=3600, debounce_key="bk")
            )
            await wait_for(lambda: lock_waiters(dsn))
            assert not racing.done()
            await (tx.commit() if outcome == "commit" else tx.rollback())
            got = await racing
        finally:
            await holder.close()
        if outcome == "commit":
            assert got.created and got.id != first.id
            assert (await client.get(first.id)).args == [1]
            assert (await client.get(got.id)).args == [2]
        else:
            assert not got.created and got.id == first.id
            assert (await client.get(first.id)).args == [2]
        assert await fetchval(
            dsn, "select count(*) from durable.tasks where debounce_key = 'bk'"
                 " and status = 'queued'") == 1  # fmt: skip


# -- delay and priority from a process whose clock is an hour off ------------------------

LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), Path("/nonexistent"))

SKEWED_START = """
import asyncio, sys
import durable
from tests.apps.start_option_races_app import sor_echo

async def main() -> None:
    async with durable.connect(sys.argv[1]) as client:
        late = await client.start(sor_echo, 1, delay=60, priority=0)
        low = await client.start(sor_echo, 2, priority=1)
        high = await client.start(sor_echo, 3, priority=9)
        print(late.id, low.id, high.id)

asyncio.run(main())
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="libfaketime is not installed")
@pytest.mark.parametrize("skew", ["-1h", "+1h"])
async def test_delay_and_priority_from_a_skewed_client(dsn: str, skew: str) -> None:
    """A client whose clock is an hour off schedules `delay=60` sixty seconds of the
    database's time ahead (not an hour early or late), and a daemon runs its ready tasks
    by priority and never the delayed one early."""
    env = daemon_env(dsn, LD_PRELOAD=str(LIBFAKETIME), FAKETIME=skew,
                     FAKETIME_DONT_FAKE_MONOTONIC="1")  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SKEWED_START, dsn, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    late, low, high = (int(x) for x in out.split())
    ahead = await fetchval(
        dsn, "select extract(epoch from run_at - created_at) from durable.tasks where id = $1",
        late,
    )  # fmt: skip
    assert 55 < ahead <= 61, ahead
    app.ran.clear()
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=f"{app.QUEUE}=1"):
        assert await client.result(low, timeout=20) == 2
        assert await client.result(high, timeout=20) == 3
        assert (await client.get(late)).status == "queued"
    assert app.ran == [3, 2]

"""start(..., debounce=): later starts within the window replace the pending task's
arguments and options and push its run time, bounded by max_delay; racing starts make one
task, and a start racing a claim updates the task the claim then runs or makes a new one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from durable.store import queries
from durable.validation import InvalidValue
from tests.support.helpers import fetchval, running_daemon, wait_for

Q = queries()
WORKER = uuid.UUID(int=13)

ran: list[int] = []


@durable.task(name="db_index")
async def db_index(n: int) -> int:
    ran.append(n)
    return n


@durable.task(name="db_other")
async def db_other(n: int) -> int:
    return n


async def test_later_starts_replace_the_pending_one(dsn: str) -> None:
    ran.clear()
    async with durable.connect(dsn) as client:
        first = await client.start(db_index, 1, debounce=3600)
        due1 = (await client.get(first.id)).run_at
        second = await client.start(db_index, 2, debounce=3600)
        info = await client.get(first.id)
        assert (second.id, second.created) == (first.id, False)
        assert info.args == [2] and info.run_at > due1  # pushed back
        # Bounded: a max_delay ends the pushing.
        capped = await client.start(db_index, 3, debounce=3600, debounce_key="cap", max_delay=3600)
        limit = (await client.get(capped.id)).run_at
        again = await client.start(db_index, 4, debounce=3600, debounce_key="cap", max_delay=7200)
        assert again.id == capped.id
        assert (await client.get(capped.id)).run_at <= limit + timedelta(seconds=1)
        assert await fetchval(dsn, "select count(*) from durable.tasks") == 2
        with pytest.raises(InvalidValue, match="pending for a task other than 'db_other'"):
            await client.start(db_other, 5, debounce=10, debounce_key="cap")


async def test_the_debounced_task_runs_once_with_the_last_arguments(dsn: str) -> None:
    ran.clear()
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handles = [await client.start(db_index, n, debounce=0.5, max_delay=30) for n in (1, 2, 3)]
        assert len({h.id for h in handles}) == 1
        assert await handles[0].result(timeout=30) == 3
        # Once it was claimed, the next start is a new task.
        later = await client.start(db_index, 4, debounce=0.01)
        assert later.id != handles[0].id
        assert await later.result(timeout=30) == 4
    assert ran == [3, 4]


async def test_debounce_starts_racing_from_two_connections(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        a = await asyncpg.connect(dsn)
        got: list[durable.Handle] = []
        try:
            tx = a.transaction()
            await tx.start()
            first = await client.start(db_index, 1, debounce=3600, conn=a)  # not committed

            async def second() -> None:
                async with durable.connect(dsn) as other:
                    got.append(await other.start(db_index, 2, debounce=3600))

            async with anyio.create_task_group() as tg:
                tg.start_soon(second)

                async def waiting() -> bool:
                    n = await fetchval(
                        dsn,
                        "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                        " and query like '%insert into durable.tasks%'",
                    )
                    return bool(n)

                await wait_for(waiting)
                await tx.commit()
        finally:
            await a.close()
        assert got[0].id == first.id and not got[0].created
        assert await fetchval(dsn, "select count(*) from durable.tasks") == 1
        assert (await client.get(first.id)).args == [2]


async def test_bad_debounce_options(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"debounce": -1}, "debounce must be a number of seconds"),
            ({"debounce": "1"}, "debounce must be a number of seconds"),
            ({"debounce_key": "k"}, "need debounce=seconds"),
            ({"debounce": 10, "max_delay": 5}, "max_delay .5s. must be at least debounce"),
            ({"debounce": 1, "idempotency_key": "k"}, "cannot be combined"),
            ({"debounce": 1, "delay": 3}, "cannot be combined"),
        ]
        for kwargs, message in cases:
            with pytest.raises(InvalidValue, match=message):
                await client.start(db_index, 1, **kwargs)


# -- the last start's options win ---------------------------------------------------------

OPTIONS = "select queue, priority, max_attempts, timeout, deadline, concurrency_key, key_limit"


async def row(dsn: str, task_id: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetchrow(
            OPTIONS + ", args, created_at, run_at, debounce_until,"
            " extract(epoch from run_at - created_at) as due_in,"
            " extract(epoch from deadline - created_at) as deadline_in"
            " from durable.tasks where id = $1",
            task_id,
        )
    finally:
        await conn.close()
    assert found is not None
    return dict(found)


async def test_a_later_start_replaces_the_pending_tasks_options(dsn: str) -> None:
    """The last start wins, options as well as arguments (as Inngest's and Hatchet's
    debounce): an option it leaves out takes the definition's default again. The task
    keeps its id and created_at."""
    async with durable.connect(dsn) as client:
        first = await client.start(
            db_index, 1, debounce=3600, queue="dq1", priority=1, max_attempts=2, timeout=10,
            deadline=600,
        )  # fmt: skip
        before = await row(dsn, first.id)
        second = await client.start(
            db_index, 2, debounce=3600, queue="dq2", priority=9, max_attempts=7, timeout=30,
            deadline=7200,
        )  # fmt: skip
        assert (second.id, second.created) == (first.id, False)
        after = await row(dsn, first.id)
        assert (after["queue"], after["priority"], after["max_attempts"], after["timeout"]) == (
            "dq2", 9, 7, 30.0,
        )  # fmt: skip
        assert 7100 < after["deadline_in"] <= 7201
        assert after["args"] == "[2]" and after["created_at"] == before["created_at"]
        third = await client.start(db_index, 3, debounce=3600)
        assert third.id == first.id
        info = await client.get(first.id)
        assert (info.queue, info.priority, info.max_attempts, info.timeout, info.deadline) == (
            "default", 0, 3, None, None,
        )  # fmt: skip
        assert await fetchval(dsn, "select count(*) from durable.tasks") == 1


async def test_a_later_max_delay_brings_the_run_closer_never_later(dsn: str) -> None:
    """max_delay counts from the first start, whichever start gives it: a later start's
    shorter one brings the latest run time closer; a longer one, or none, never lifts the
    bound an earlier start set."""
    async with durable.connect(dsn) as client:
        first = await client.start(db_index, 1, debounce=60, max_delay=36000)
        assert 59 < (await row(dsn, first.id))["due_in"] <= 61
        # The first start an hour ago, as its own max_delay allows.
        await fetchval(
            dsn, "update durable.tasks set created_at = created_at - interval '1 hour',"
                 " debounce_until = debounce_until - interval '1 hour' where id = $1", first.id,
        )  # fmt: skip
        await client.start(db_index, 2, debounce=600, max_delay=1800)
        tight = await row(dsn, first.id)
        assert 1799 < tight["due_in"] <= 1800, tight  # half an hour ago: due now
        for later in (36000.0, None):
            await client.start(db_index, 3, debounce=600, max_delay=later)
            got = await row(dsn, first.id)
            assert got["run_at"] == tight["run_at"], later
            assert got["debounce_until"] == tight["debounce_until"], later


async def test_a_later_sql_start_replaces_the_options_too(dsn: str) -> None:
    """durable.start debounces into the same task as client.start, with the same rule,
    concurrency key and key limit included."""
    conn = await asyncpg.connect(dsn)
    try:
        start = (
            "select durable.start('db_index', $1::jsonb, queue => $2, priority => $3,"
            " max_attempts => $4, timeout => $5, concurrency_key => $6, key_limit => $7,"
            " deadline => $8, debounce => 3600, debounce_key => 'sqlk')"
        )
        first = await conn.fetchval(start, "[1]", "dq1", 1, 2, 10.0, "a", 5, 600.0)
        again = await conn.fetchval(start, "[2]", "dq2", 9, 7, 30.0, "b", 1, 7200.0)
    finally:
        await conn.close()
    assert again == first
    got = await row(dsn, first)
    assert (got["queue"], got["priority"], got["max_attempts"], got["timeout"]) == (
        "dq2", 9, 7, 30.0,
    )  # fmt: skip
    assert (got["concurrency_key"], got["key_limit"], got["args"]) == ("b", 1, "[2]")
    assert 7100 < got["deadline_in"] <= 7201


def insert_waiting(dsn: str) -> Callable[[], Awaitable[Any]]:
    """A check for wait_for: some session's insert into durable.tasks waits on a lock."""
    return lambda: fetchval(
        dsn, "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
             " and query like '%insert into durable.tasks%'",
    )  # fmt: skip


async def test_racing_starts_leave_the_latest_options(dsn: str) -> None:
    """Two debounced starts of one key at once: the second waits for the first's insert
    and then updates it with its own options; one task."""
    async with durable.connect(dsn) as client:
        a = await asyncpg.connect(dsn)
        got: list[durable.Handle] = []
        try:
            tx = a.transaction()
            await tx.start()
            first = await client.start(
                db_index, 1, debounce=3600, priority=1, max_attempts=2, timeout=10, conn=a
            )

            async def second() -> None:
                async with durable.connect(dsn) as other:
                    got.append(await other.start(
                        db_index, 2, debounce=3600, priority=9, max_attempts=7, timeout=30,
                    ))  # fmt: skip

            async with anyio.create_task_group() as tg:
                tg.start_soon(second)
                await wait_for(insert_waiting(dsn))
                await tx.commit()
        finally:
            await a.close()
        assert got[0].id == first.id and not got[0].created
        info = await client.get(first.id)
        assert (info.args, info.priority, info.max_attempts, info.timeout) == ([2], 9, 7, 30.0)
        assert await fetchval(dsn, "select count(*) from durable.tasks") == 1


@pytest.fixture
async def conns(dsn: str) -> AsyncIterator[list[asyncpg.Connection]]:
    """Three connections: [0] the test's own, [1..2] the actors."""
    opened = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        yield opened
    finally:
        for c in opened:
            await c.close()


async def claim(conn: asyncpg.Connection, queue: str, n: int = 1) -> list[asyncpg.Record]:
    """queries.sql `claim` as the daemon sends it."""
    return list(await conn.fetch(Q["claim"], queue, ["db_index"], n, 60.0, WORKER))


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_start_racing_a_claim_in_flight(
    dsn: str, conns: list[asyncpg.Connection], outcome: str
) -> None:
    """A debounced start while a claim of the key's pending task is uncommitted waits for
    it: after the commit it makes a new task with its options (the claimed one runs with
    its own); after a rollback the pending task takes them. One queued task either way."""
    _, claimer, _ = conns
    async with durable.connect(dsn) as client:
        first = await client.start(
            db_index, 1, debounce=0, queue="dq", priority=1, max_attempts=2, timeout=10
        )
        await claimer.execute("begin")
        (claimed,) = await claim(claimer, "dq")
        assert (claimed["id"], claimed["max_attempts"], claimed["timeout"]) == (first.id, 2, 10.0)
        racing = asyncio.ensure_future(client.start(
            db_index, 2, debounce=3600, queue="dq", priority=9, max_attempts=7, timeout=30,
        ))  # fmt: skip
        await wait_for(insert_waiting(dsn))
        assert not racing.done()
        await claimer.execute(outcome)
        got = await racing
        mine = await row(dsn, first.id)
        if outcome == "commit":
            assert got.created and got.id != first.id
            assert (mine["priority"], mine["max_attempts"], mine["timeout"]) == (1, 2, 10.0)
            pending = await row(dsn, got.id)
        else:
            assert not got.created and got.id == first.id
            pending = mine
        assert (pending["priority"], pending["max_attempts"], pending["timeout"]) == (9, 7, 30.0)
        assert pending["args"] == "[2]" and pending["due_in"] > 3000
        assert await fetchval(
            dsn, "select count(*) from durable.tasks where debounce_key = 'db_index'"
                 " and status = 'queued'") == 1  # fmt: skip


async def test_a_claim_after_a_racing_start_runs_its_options(
    dsn: str, conns: list[asyncpg.Connection]
) -> None:
    """A claim while a debounced start of the pending task is uncommitted passes it over
    (never waits, never takes the old options); once the start commits the claim runs
    the task with that start's arguments and options."""
    _, starter, claimer = conns
    async with durable.connect(dsn) as client:
        first = await client.start(
            db_index, 1, debounce=0, queue="dq", priority=1, max_attempts=2, timeout=10
        )
        tx = starter.transaction()
        await tx.start()
        again = await client.start(
            db_index, 2, debounce=0, queue="dq", priority=9, max_attempts=7, timeout=30,
            deadline=600, conn=starter,
        )  # fmt: skip
        assert again.id == first.id
        assert await claim(claimer, "dq") == []
        await tx.commit()
        (claimed,) = await claim(claimer, "dq")
    assert claimed["id"] == first.id and claimed["args"] == "[2]"
    assert (claimed["max_attempts"], claimed["timeout"]) == (7, 30.0)
    assert claimed["deadline"] is not None

"""start(..., debounce=): later starts within the window replace the pending task's
arguments and push its run time, bounded by max_delay; racing starts make one task."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from durable.validation import InvalidValue
from tests.support.helpers import fetchval, running_daemon, wait_for

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

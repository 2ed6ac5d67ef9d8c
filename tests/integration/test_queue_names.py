"""Queue names with quotes, spaces, SQL and non-ASCII letters work end to end: started
from Python and SQL, woken by NOTIFY (payload: the queue name, on the fixed channel
`durable_ready`), claimed and finished."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

import durable
from tests.support.helpers import running_daemon

NAMES = [
    "we'ird \"q\"",
    "spaced out queue",
    "ünï \"cødé\" 名前 😀",
    "q'; drop table durable.tasks; --",
    "durable_ready",
    "\\\\back\\slash",
    "x" * 200,
]


@durable.task(queue=NAMES[0])
async def qn_echo(x: object) -> object:
    return x


@pytest.mark.timeout(60)
async def test_any_queue_name_is_notified_claimed_and_served(dsn: str) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()
    listen = await asyncpg.connect(dsn)
    await listen.add_listener("durable_ready", lambda *a: heard.put_nowait(a[3]))
    sql = await asyncpg.connect(dsn)
    try:
        # A poll interval far beyond the test's patience: only notifications wake the daemon.
        queues = {name: 2 for name in NAMES}
        async with durable.connect(dsn) as client, running_daemon(
            dsn, queues=queues, poll_interval="300"
        ) as daemon:
            await daemon.ready.wait()
            for i, name in enumerate(NAMES):
                handle = await client.start(qn_echo, i, queue=name)
                assert await asyncio.wait_for(heard.get(), 10) == name
                assert await handle.result(timeout=10) == i
                assert (await client.get(handle.id)).queue == name
                task_id = await sql.fetchval(
                    "select durable.start('qn_echo', jsonb_build_array($1::text), queue => $2)",
                    name, name,
                )
                assert await asyncio.wait_for(heard.get(), 10) == name
                assert await durable.Handle(client, task_id).result(timeout=10) == name
            while not heard.empty():  # nothing else was announced, under any other name
                assert heard.get_nowait() in NAMES
        assert await sql.fetchval("select count(*) from durable.tasks") == 2 * len(NAMES)
    finally:
        await sql.close()
        await listen.close()

"""A ctx.transaction that loses its connection (or deadlocks) rolled back: nothing of it
happened, so it is not recorded as the transaction's outcome; the next attempt runs it."""

from __future__ import annotations

from typing import Any

import pytest

import durable
from tests.support.helpers import execute, fetchval, running_daemon

QUEUE = "tx-retry"
_runs: dict[int, int] = {}


async def _write(conn: Any, task_id: int) -> int:
    _runs[task_id] = _runs.get(task_id, 0) + 1
    await conn.execute("insert into tx_business (task_id) values ($1)", task_id)
    if _runs[task_id] == 1:
        # The connection dies mid-transaction, as in a server restart or a failover.
        await conn.execute("select pg_terminate_backend(pg_backend_pid())")
    return _runs[task_id]


@durable.workflow(queue=QUEUE, max_attempts=3, retry=durable.RetryPolicy(base=0.05, jitter=0))
async def tx_flow(ctx: durable.Context) -> int:
    return int(await ctx.transaction("write", _write, ctx.task_id))


@pytest.mark.timeout(60)
async def test_a_transaction_cut_off_by_a_lost_connection_runs_again(dsn: str) -> None:
    await execute(dsn, "create table tx_business (task_id bigint not null)")
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=QUEUE):
        handle = await client.start(tx_flow)
        assert await handle.result(timeout=30) == 2
        info = await client.get(handle.id)
        [event] = await client.history(handle.id)
    assert info.attempt == 2
    assert (event.kind, event.status, event.attempt) == ("transaction", "completed", 2)
    # The first run rolled back with its connection: one business row, from the second.
    assert await fetchval(dsn, "select count(*) from tx_business") == 1

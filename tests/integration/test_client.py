"""durable.Client and durable.start (SQL) against a real Postgres.

Task names start with ``qc_`` (the registry is process-wide).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from tests.support.helpers import fetchval, run_burst, running_daemon, wait_for

RAN: Counter[str] = Counter()


@durable.task
async def qc_double(x: int) -> int:
    RAN[f"double:{x}"] += 1
    return 2 * x


@durable.task
async def qc_join(*parts: str, sep: str = "-") -> str:
    return sep.join(parts)


@durable.task
async def qc_never(key: str) -> None:
    RAN[key] += 1


async def count_tasks(dsn: str, where: str = "true", *args: object) -> int:
    n = await fetchval(dsn, f"select count(*) from durable.tasks where {where}", *args)
    return int(n)


async def test_idempotency_key_returns_the_same_task(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        first = await client.start(qc_double, 1, idempotency_key="order-42")
        again = await client.start(qc_double, 1, idempotency_key="order-42")
        # Even with other arguments: the key names the task.
        other = await client.start(qc_double, 99, idempotency_key="order-42")
        fresh = await client.start(qc_double, 1, idempotency_key="order-43")
        unkeyed = await client.start(qc_double, 1)
        assert first.created and not again.created and not other.created
        assert first.id == again.id == other.id
        assert fresh.created and fresh.id != first.id
        assert unkeyed.created and unkeyed.id not in (first.id, fresh.id)
        assert await count_tasks(dsn) == 3
        assert (await client.get(first.id)).args == [1]
        assert (await client.get(first.id)).idempotency_key == "order-42"
        # The SQL function honours the same key.
        sql_id = await fetchval(
            dsn, "select durable.start('qc_double', '[5]', idempotency_key => 'order-42',"
            " allow_unknown => true)"
        )
        assert sql_id == first.id
        async with running_daemon(dsn):
            assert await first.result(timeout=10) == 2
        # After it finished, the key still returns it (and does not run it again).
        done = await client.start(qc_double, 1, idempotency_key="order-42")
        assert done.id == first.id and not done.created
        assert (await client.get(first.id)).status == "completed"
    assert await count_tasks(dsn) == 3


async def test_conn_enqueues_only_if_the_callers_transaction_commits(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("create table qc_orders (id int primary key)")
        async with durable.connect(dsn) as client:
            with pytest.raises(RuntimeError, match="changed my mind"):
                async with conn.transaction():
                    await conn.execute("insert into qc_orders values (1)")
                    rolled = await client.start(qc_double, 10, conn=conn)
                    # Inside the transaction the task exists...
                    assert (
                        await conn.fetchval(
                            "select count(*) from durable.tasks where id = $1", rolled.id
                        )
                        == 1
                    )
                    # ...but no one else sees it before commit.
                    assert await count_tasks(dsn) == 0
                    raise RuntimeError("changed my mind")
            assert await count_tasks(dsn) == 0
            assert await fetchval(dsn, "select count(*) from qc_orders") == 0

            async with conn.transaction():
                await conn.execute("insert into qc_orders values (2)")
                kept = await client.start(qc_double, 21, conn=conn)
            assert await count_tasks(dsn) == 1
            async with running_daemon(dsn):
                assert await kept.result(timeout=10) == 42
    finally:
        await conn.close()
    assert RAN["double:10"] == 0


async def test_sql_start_from_psql_runs_the_task(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        proc = await anyio.run_process(
            ["psql", dsn, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
             "-c", "select durable.start('qc_double', '[21]')"],
            check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        task_id = int(proc.stdout.decode().strip())
        assert await client.result(task_id, timeout=10) == 42
        # Keyword arguments, queue and priority from SQL as well.
        proc = await anyio.run_process(
            ["psql", dsn, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c",
             """select durable.start('qc_join', '["a", "b"]', '{"sep": "+"}', priority => 3)"""],
            check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        joined = int(proc.stdout.decode().strip())
        assert await client.result(joined, timeout=10) == "a+b"
        info = await client.get(joined)
        assert info.priority == 3 and info.queue == "default"
        # A malformed call is refused by the function, not stored.
        proc = await anyio.run_process(
            ["psql", dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1",
             "-c", """select durable.start('qc_double', '{"x": 1}')"""],
            check=False,
        )  # fmt: skip
        assert proc.returncode != 0
        assert "args must be a JSON array" in proc.stderr.decode()
    assert await count_tasks(dsn) == 2


async def test_start_many_enqueues_all_in_one_statement(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handles = await client.start_many(qc_double, [[i] for i in range(50)])
        pairs = await client.start_many(qc_join, [(["x", "y"], {"sep": "/"}), (["z"], {})])
        assert [h.created for h in handles] == [True] * 50
        ids = [h.id for h in handles]
        assert ids == sorted(ids) and len(set(ids)) == 50
        assert await count_tasks(dsn, "name = 'qc_double'") == 50
        # One statement, one transaction: every row carries the same xmin and now().
        assert (
            await fetchval(
                dsn, "select count(distinct xmin::text) from durable.tasks where name = 'qc_double'"
            )
            == 1
        )
        assert (
            await fetchval(
                dsn, "select count(distinct created_at) from durable.tasks where name = 'qc_double'"
            )
            == 1
        )
        # Arguments land in the order given.
        assert [(await client.get(i)).args for i in (ids[0], ids[17], ids[49])] == [[0], [17], [49]]
        assert await client.start_many(qc_double, []) == []
        # The options apply to every row alike.
        later = await client.start_many(qc_double, [[1], [2]], queue="later", priority=5, delay=3600)
        rows = await fetchval(
            dsn, "select array_agg(distinct (queue, priority, run_at > now() + interval '59 min',"
            " kind, max_attempts)::text) from durable.tasks where id = any($1)",
            [h.id for h in later],
        )  # fmt: skip
        assert rows == ["(later,5,t,task,3)"]
        await run_burst(dsn)
        assert [await h.result(timeout=10) for h in handles] == [2 * i for i in range(50)]
        assert [await h.result(timeout=10) for h in pairs] == ["x/y", "z"]


async def test_cancel_a_queued_task_and_it_never_runs(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        doomed = await client.start(qc_never, "cancelled-task")
        kept = await client.start(qc_never, "kept-task")
        assert (await client.cancel(doomed.id)).cancelled == (doomed.id,)
        info = await client.get(doomed.id)
        assert info.status == "cancelled" and info.finished_at is not None
        # Cancelling again, or a task that does not exist, touches nothing.
        again = await client.cancel(doomed.id)
        assert (again.cancelled, again.finished) == ((), "cancelled")
        missing = await client.cancel(10**9)
        assert (missing.cancelled, missing.finished, bool(missing)) == ((), None, False)
        await run_burst(dsn)
        with pytest.raises(durable.TaskCancelled):
            await doomed.result(timeout=10)
        assert await kept.result(timeout=10) is None
        assert (await client.get(doomed.id)).started_at is None
    assert RAN["cancelled-task"] == 0 and RAN["kept-task"] == 1


async def test_a_task_no_daemon_knows_stays_queued(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, poll_interval="0.05") as daemon:
        worker = daemon.workers["default"]
        stranger = await client.start("qc_deployed_elsewhere", 1, 2, allow_unknown=True)
        polls = daemon.poller.polls
        known = [await client.start(qc_double, i) for i in range(5)]
        assert [await h.result(timeout=10) for h in known] == [0, 2, 4, 6, 8]

        async def polled_twice_more() -> bool:
            # The daemon's poll looks at every queue; one whose loop could take the
            # stranger would be woken by it.
            return daemon.poller.polls >= polls + 2

        await wait_for(polled_twice_more, timeout=10)
        info = await client.get(stranger.id)
        assert info.status == "queued" and info.attempt == 1
        assert info.started_at is None and info.error is None and info.worker_id is None
        assert worker.claimed == 5
        # A daemon that does have the code picks it up (rolling deploy).
        more = await client.start(qc_double, 7)
        assert await more.result(timeout=10) == 14
        assert (await client.get(stranger.id)).status == "queued"


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (({1, 2},), {}),
        ((math.nan,), {}),
        ((math.inf,), {}),
        ((), {"when": object()}),
        (([1, {"deep": [math.nan]}],), {}),
        (("nul\x00byte",), {}),
    ],
    ids=["set", "nan", "inf", "object-kwarg", "nested-nan", "nul"],
)
async def test_non_json_arguments_raise_payload_error_and_insert_nothing(
    dsn: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    async with durable.connect(dsn) as client:
        with pytest.raises(durable.PayloadError, match="qc_double"):
            await client.start(qc_double, *args, **kwargs)
        with pytest.raises(durable.PayloadError):
            await client.start_many(qc_double, [[1], (list(args), kwargs)])
        assert issubclass(durable.PayloadError, durable.DurableError)
    assert await count_tasks(dsn) == 0


async def test_start_validates_its_options(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        options: dict[str, Any]
        for options in (
            {"delay": -1},
            {"priority": 2**31},
            {"max_attempts": 0},
            {"timeout": 0},
            {"queue": ""},
            {"idempotency_key": 5},
        ):
            with pytest.raises(durable.DurableError):
                await client.start(qc_double, 1, **options)
        with pytest.raises(durable.DurableError):
            await client.get(10**9)
    assert await count_tasks(dsn) == 0


async def test_result_gives_up_after_its_timeout(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handle = await client.start(qc_never, "nobody-runs-me")
        with pytest.raises(TimeoutError):
            await handle.result(timeout=0.2)
        with pytest.raises(durable.DurableError, match="no task"):
            await client.result(10**9, timeout=5)
        assert (await handle.get()).status == "queued"
    assert RAN["nobody-runs-me"] == 0

"""Task rows written by hand with a malformed shape fail at once with a clear error, and
the daemon goes on serving the well-formed tasks around them."""

from __future__ import annotations

import asyncpg
import pytest

import durable
from tests.support.helpers import running_daemon, wait_for

QUEUE = "malformed"


@durable.task(queue=QUEUE)
async def mal_ok(x: int) -> int:
    return x


@durable.task(queue=QUEUE)
async def mal_add(a: int, b: int) -> int:
    return a + b


@durable.workflow(queue=QUEUE)
async def mal_flow(ctx: durable.Context, n: int) -> int:
    return int(await ctx.step("double", lambda: n * 2))


# (name, kind, args, kwargs, what the error says)
MALFORMED = [
    ("mal_add", "task", '{"a": 1, "b": 2}', "{}", "args must be a JSON array, not dict"),
    ("mal_add", "task", '"1, 2"', "{}", "args must be a JSON array, not str"),
    ("mal_add", "task", "[1, 2]", "[]", "kwargs must be a JSON object, not list"),
    ("mal_add", "task", "[1, 2, 3]", "{}", "do not fit mal_add(a, b)"),
    ("mal_add", "task", "[1]", '{"c": 3}', "do not fit mal_add"),
    ("mal_add", "task", "[]", "{}", "missing 2 required positional arguments"),
    ("mal_flow", "workflow", "[]", "{}", "do not fit mal_flow"),
    ("mal_flow", "workflow", "[1]", '{"ctx": 2}', "multiple values for argument 'ctx'"),
]


async def test_malformed_rows_fail_at_once_and_the_daemon_serves_the_rest(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        insert = (
            "insert into durable.tasks (queue, name, kind, args, kwargs, max_attempts)"
            " values ($1, $2, $3, $4::jsonb, $5::jsonb, 5) returning id"
        )
        bad = {
            await conn.fetchval(insert, QUEUE, name, kind, args, kwargs): message
            for name, kind, args, kwargs, message in MALFORMED
        }
        # A kind nobody knows never gets in: nothing half-written for a daemon to trip on.
        before = await conn.fetchval("select count(*) from durable.tasks")
        with pytest.raises(asyncpg.CheckViolationError, match="task_kind_check"):
            await conn.fetchval(insert, QUEUE, "mal_ok", "bogus", "[1]", "{}")
        assert await conn.fetchval("select count(*) from durable.tasks") == before
        # A row whose kind disagrees with the code runs as the code says.
        mismatched = await conn.fetchval(insert, QUEUE, "mal_ok", "workflow", "[7]", "{}")
        async with durable.connect(dsn) as client:
            good = [await client.start(mal_ok, i) for i in range(5)]
            flow = await client.start(mal_flow, 21)
            async with running_daemon(dsn, queues=QUEUE):

                async def settled() -> bool:
                    left = await conn.fetchval(
                        "select count(*) from durable.tasks"
                        " where status not in ('completed', 'failed', 'cancelled')"
                    )
                    return bool(left == 0)

                await wait_for(settled, timeout=30)
            assert [await h.result(timeout=5) for h in good] == list(range(5))
            assert await flow.result(timeout=5) == 42
            assert await client.get(mismatched) is not None
            assert (await client.get(mismatched)).result == 7
            for task_id, message in bad.items():
                info = await client.get(task_id)
                assert info.status == "failed", (task_id, info.status, info.error)
                assert info.attempt == 1, f"task {task_id} was retried: {info.error}"
                assert info.error is not None
                assert info.error["type"] == "durable.errors.NonRetryable"
                assert message in info.error["message"], info.error["message"]
    finally:
        await conn.close()

"""durable behind PgBouncer in transaction mode: the daemon's and the client's statements
go through the pooler, the LISTEN connections straight to the server
(DURABLE_LISTEN_URL), and the queue and workflow basics hold."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

import durable
from tests.support.helpers import durable_cli, kill, running_daemon, spawn_daemon, wait_for
from tests.support.pgbouncer import installed, pgbouncer
from tests.support.roles import APP_ROLE, app_role, as_app

pytestmark = pytest.mark.skipif(not installed(), reason="pgbouncer is not installed")

QUEUE = "pooled"
tries: dict[str, int] = {}


@durable.task(queue=QUEUE)
async def pooled_double(x: int) -> int:
    return 2 * x


@durable.task(queue=QUEUE, max_attempts=3, retry=durable.RetryPolicy(base=0.01, max_delay=0.01))
async def pooled_flaky(key: str) -> str:
    tries[key] = tries.get(key, 0) + 1
    if tries[key] < 3:
        raise RuntimeError(f"try {tries[key]}")
    return f"ok after {tries[key]}"


@durable.workflow(queue=QUEUE)
async def pooled_flow(ctx: durable.Context, x: int) -> dict[str, object]:
    a = await ctx.step("add", lambda: x + 1)
    await ctx.sleep(0.05)
    b = await ctx.run(pooled_double, a)
    c, d = await ctx.gather(ctx.run(pooled_double, 1), ctx.run(pooled_double, 2))
    got = await ctx.wait_for_event("go", timeout=30)
    return {"a": a, "b": b, "fan": [c, d], "event": got}


@pytest.fixture
async def app(dsn: str) -> str:
    """The test's database as the least-privileged role (a password, as a pooler needs)."""
    await app_role(dsn)
    done = durable_cli("migrate", "--grant", APP_ROLE, dsn=dsn)
    assert done.returncode == 0, done.stderr
    return as_app(dsn)


@pytest.fixture
def pooled(app: str) -> Iterator[str]:
    with pgbouncer(app, pool_mode="transaction", pool_size=3) as url:
        yield url


@pytest.mark.timeout(90)
async def test_queue_and_workflow_basics_through_pgbouncer_in_transaction_mode(
    app: str, pooled: str
) -> None:
    tries.clear()
    async with (
        durable.connect(pooled, listen_dsn=app, statement_cache_size=0) as client,
        running_daemon(pooled, queues=QUEUE, listen_url=app, statement_cache="0"),
    ):
        plain = await client.start(pooled_double, 21)
        many = await client.start_many(pooled_double, [[i] for i in range(50)])
        flaky = await client.start(pooled_flaky, "k")
        flow = await client.start(pooled_flow, 1)
        assert await plain.result(timeout=20) == 42
        assert [await h.result(timeout=20) for h in many] == [2 * i for i in range(50)]
        assert await flaky.result(timeout=20) == "ok after 3"

        async def waiting() -> bool:
            return (await client.get(flow.id)).waiting_event == "go"

        await wait_for(waiting)
        assert await client.send_event(flow.id, "go", "ok")
        assert await flow.result(timeout=20) == {"a": 2, "b": 4, "fan": [2, 4], "event": "ok"}
        info = await client.get(flaky.id)
        assert (info.status, info.attempt) == ("completed", 3)


@pytest.mark.timeout(60)
async def test_pruning_through_pgbouncer_takes_and_releases_its_lock(app: str, pooled: str) -> None:
    """Pruning's one-at-a-time lock is a session lock: through a transaction pooler it
    must be taken and released on one server connection, or it leaks to whichever client
    gets that connection next."""
    async with durable.connect(pooled, listen_dsn=app, statement_cache_size=0) as client:
        async with running_daemon(pooled, queues=QUEUE, listen_url=app, statement_cache="0"):
            handle = await client.start(pooled_double, 1)
            assert await handle.result(timeout=20) == 2
        for _ in range(3):
            done = await client.store.prune(0.0)
            assert done is not None
        conn = await asyncpg.connect(app)
        try:
            held = await conn.fetchval(
                "select count(*) from pg_locks where locktype = 'advisory'"
                " and database = (select oid from pg_database where datname = current_database())"
            )
        finally:
            await conn.close()
        assert held == 0
        assert await client.store.prune(0.0) is not None


@pytest.mark.timeout(90)
async def test_a_daemon_and_a_client_configured_by_environment_work_through_pgbouncer(
    app: str, pooled: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`durable run` with DURABLE_DATABASE_URL through the pooler, DURABLE_LISTEN_URL at
    the server and DURABLE_STATEMENT_CACHE=0, as a deployment sets them; the client reads
    the same variables."""
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(
        pooled, "tests.integration.test_pgbouncer", log=log, DURABLE_LISTEN_URL=app,
        DURABLE_STATEMENT_CACHE="0", DURABLE_QUEUES=QUEUE,
    )  # fmt: skip
    try:
        monkeypatch.setenv("DURABLE_DATABASE_URL", pooled)
        monkeypatch.setenv("DURABLE_LISTEN_URL", app)
        monkeypatch.setenv("DURABLE_STATEMENT_CACHE", "0")
        async with durable.connect() as client:
            assert client.listen_dsn == app
            flow = await client.start(pooled_flow, 5)
            handles = await client.start_many(pooled_double, [[i] for i in range(20)])
            assert [await h.result(timeout=30) for h in handles] == [2 * i for i in range(20)]

            async def waiting() -> bool:
                return (await client.get(flow.id)).waiting_event == "go"

            await wait_for(waiting, timeout=30)
            assert await client.send_event(flow.id, "go", 7)
            assert await flow.result(timeout=30) == {"a": 6, "b": 12, "fan": [2, 4], "event": 7}
    finally:
        kill(proc, signal.SIGTERM)
        await anyio.to_thread.run_sync(proc.wait)
    assert "prepared statement" not in log.read_text()

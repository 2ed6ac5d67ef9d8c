"""Retention on a server whose autovacuum does not run: cycles of ingest, claim, finish
and prune leave the claim's index and the task table no larger than a few cycles'
worth when the prune pass vacuums, and growing without bound when it does not.

Each runs on an embedded server of its own: an emptied index page is reused only once no
transaction anywhere on the server began before it was emptied, and on a server shared
with other work that moment comes when it comes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import asyncpg
import pytest
from structlog.testing import capture_logs

from durable.embedded import EmbeddedServer
from durable.store import Store
from durable.store.schema import named_queries
from tests.support.helpers import durable_cli, fetchval, running_daemon, wait_for
from tests.support.roles import APP_ROLE, app_role, as_app

QUEUE = "bloat"
PER_CYCLE = 2000
CYCLES = 8

SIZES = """
select pg_relation_size('durable.tasks_ready_idx') as ready,
       pg_relation_size('durable.tasks_pkey') as pkey,
       pg_relation_size('durable.tasks') as heap
"""


async def _cycle(conn: asyncpg.Connection, store: Store, vacuum: str) -> None:
    """One cycle: PER_CYCLE tasks enqueued, claimed by durable.claim, completed, pruned."""
    await conn.execute(
        "insert into durable.tasks (queue, name, args)"
        " select $1, 'bloat.noop', jsonb_build_array(g) from generate_series(1, $2) g",
        QUEUE, PER_CYCLE,
    )  # fmt: skip
    claimed = 0
    while claimed < PER_CYCLE:
        rows = await conn.fetch(
            "select id from durable.claim($1, array['bloat.noop'], 100, 30, null)", QUEUE
        )
        assert rows, "the claim found nothing while tasks were queued"
        await conn.execute(
            "update durable.tasks set status = 'completed', finished_at = now(), result = 'null',"
            " claim_token = null, lease_until = null where id = any($1::bigint[])",
            [r["id"] for r in rows],
        )
        claimed += len(rows)
    done = await store.prune(0.0, vacuum=vacuum)
    assert done is not None and done.tasks == PER_CYCLE
    assert done.vacuumed is (True if vacuum == "on" else None)


async def _sizes(conn: asyncpg.Connection, store: Store, vacuum: str) -> list[dict[str, int]]:
    # Whatever the server's setting, autovacuum leaves these tables alone: what is measured
    # is what pruning (and its VACUUM) does.
    for table in ("tasks", "events", "signals"):
        await conn.execute(f"alter table durable.{table} set (autovacuum_enabled = false)")
    sizes = []
    for _ in range(CYCLES):
        await _cycle(conn, store, vacuum)
        sizes.append(dict(await conn.fetchrow(SIZES)))  # type: ignore[arg-type]
    return sizes


@pytest.mark.timeout(180)
async def test_pruning_that_vacuums_keeps_the_claim_index_and_the_table_flat(
    restartable_server: EmbeddedServer,
) -> None:
    dsn = restartable_server.ensure_started()
    conn = await asyncpg.connect(dsn)
    store = await Store.open(dsn, max_size=2)
    try:
        sizes = await _sizes(conn, store, "on")
    finally:
        await store.close()
        await conn.close()
    settled, end = sizes[1], sizes[-1]
    # Freed pages return to use a cycle or two later (an emptied index page is recycled
    # once no snapshot can still reach it): a bound of a few cycles, not one per cycle.
    for name in ("ready", "pkey", "heap"):
        assert end[name] <= settled[name] * 2, (name, [s[name] for s in sizes])


@pytest.mark.timeout(180)
async def test_pruning_alone_leaves_the_table_and_its_indexes_growing(
    restartable_server: EmbeddedServer,
) -> None:
    """The control: what the test above guards against happens without the VACUUM."""
    dsn = restartable_server.ensure_started()
    conn = await asyncpg.connect(dsn)
    store = await Store.open(dsn, max_size=2)
    try:
        sizes = await _sizes(conn, store, "off")
    finally:
        await store.close()
        await conn.close()
    settled, end = sizes[1], sizes[-1]
    assert end["heap"] > settled["heap"] * 2, [s["heap"] for s in sizes]
    assert end["pkey"] > settled["pkey"] * 2, [s["pkey"] for s in sizes]
    assert end["ready"] > settled["ready"] * 2, [s["ready"] for s in sizes]


@pytest.mark.timeout(60)
async def test_a_role_that_may_not_vacuum_prunes_and_says_so(dsn: str) -> None:
    await app_role(dsn)
    done = durable_cli("migrate", "--grant", APP_ROLE, dsn=dsn)
    assert done.returncode == 0, done.stderr
    store = await Store.open(as_app(dsn), max_size=2)
    try:
        result = await store.prune(0.0, vacuum="on")
        assert result is not None and result.vacuumed is False
        assert (await store.prune(0.0, vacuum="off")).vacuumed is None  # type: ignore[union-attr]
    finally:
        await store.close()
    cli = durable_cli("prune", "--older-than", "1s", "--vacuum", "--yes", dsn=as_app(dsn))
    assert cli.returncode == 1 and "VACUUM was not run" in cli.stderr, cli.stderr


async def _vacuums(dsn: str) -> int:
    # VACUUM writes its count to the statistics as it ends: no flush interval to wait for.
    return int(await fetchval(
        dsn, "select vacuum_count from pg_stat_user_tables"
        " where schemaname = 'durable' and relname = 'tasks'",
    ))  # fmt: skip


@pytest.mark.timeout(60)
async def test_a_daemon_under_retention_vacuums_when_told_and_says_once_when_it_may_not(
    dsn: str,
) -> None:
    before = await _vacuums(dsn)
    async with running_daemon(dsn, queues=QUEUE, retention="1d", retention_vacuum="on") as d:
        await wait_for(lambda: _true(d.prune_runs >= 1))
    assert await _vacuums(dsn) == before + 1
    async with running_daemon(dsn, queues=QUEUE, retention="1d", retention_vacuum="off") as d:
        await wait_for(lambda: _true(d.prune_runs >= 1))
    assert await _vacuums(dsn) == before + 1

    await app_role(dsn)
    done = durable_cli("migrate", "--grant", APP_ROLE, dsn=dsn)
    assert done.returncode == 0, done.stderr
    with capture_logs() as logs:
        async with running_daemon(
            as_app(dsn), queues=QUEUE, retention="1d", retention_vacuum="on"
        ) as d:
            d.housekeeping.retention_interval = 0.01  # type: ignore[union-attr]
            await wait_for(lambda: _true(d.prune_runs >= 3))
    refused = [e for e in logs if e["event"] == "vacuum_not_permitted"]
    assert len(refused) == 1, refused
    assert await _vacuums(dsn) == before + 1


async def _true(value: bool) -> bool:
    return value


async def _prune_batch_blocks(conn: asyncpg.Connection) -> int:
    """Pages one prune statement reads to delete the 1,000 oldest finished tasks (rolled
    back, so the next measure finds them again)."""
    roots = [r["id"] for r in await conn.fetch("select id from durable.tasks order by id limit 1000")]
    tr = conn.transaction()
    await tr.start()
    try:
        raw = await conn.fetchval(
            "explain (analyze, buffers, format json) " + named_queries("queries.sql")["prune_trees"],
            roots, datetime.now(UTC), 1000,
        )  # fmt: skip
    finally:
        await tr.rollback()
    top = json.loads(raw)[0]["Plan"]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


@pytest.mark.timeout(120)
async def test_a_prune_statement_reads_by_key_without_statistics(dsn: str) -> None:
    """With autovacuum off nothing analyzes the tables: each prune statement must still
    reach its rows by key, reading about as much in a table four times as large."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("alter table durable.tasks set (autovacuum_enabled = false)")

        async def finished(n: int) -> None:
            # As the daemon leaves them: enqueued, claimed, completed (each update a new
            # row version, the old one left dead).
            for _ in range(n // 5000):
                await conn.execute(
                    "insert into durable.tasks (queue, name) select $1, 'bloat.noop'"
                    " from generate_series(1, 5000)", QUEUE,
                )  # fmt: skip
                await conn.execute(
                    "update durable.tasks set status = 'running', claim_token = 1,"
                    " lease_until = now() where status = 'queued'"
                )
                await conn.execute(
                    "update durable.tasks set status = 'completed', claim_token = null,"
                    " lease_until = null, finished_at = now() - interval '1 day',"
                    " result = 'null' where status = 'running'"
                )

        await finished(10_000)
        small = await _prune_batch_blocks(conn)
        await finished(30_000)
        large = await _prune_batch_blocks(conn)
        assert await conn.fetchval(
            "select last_analyze is null and last_autoanalyze is null from pg_stat_user_tables"
            " where schemaname = 'durable' and relname = 'tasks'"
        )
    finally:
        await conn.close()
    assert large <= small * 1.5 + 500, (small, large)

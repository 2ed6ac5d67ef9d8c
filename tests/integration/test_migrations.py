"""The migrations applied from zero build exactly the catalog that sql/schema.sql describes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from functools import partial

import anyio
import asyncpg
import pytest

from durable.errors import DurableError
from durable.models import Checkpoint
from durable.store import migrate, schema_sql
from durable.store.schema import (
    PRE_RELEASE_MIGRATIONS,
    PRE_RELEASE_REVISION,
    migration_files,
    named_queries,
    sql_dir,
)
from tests.conftest import admin, database_dsn, quote_ident
from tests.support.helpers import durable_cli

CATALOG = {
    "columns": """
        select table_name, column_name, data_type, domain_name, is_nullable, column_default,
               ordinal_position
        from information_schema.columns where table_schema = 'durable'
        order by table_name, ordinal_position""",
    "domains": """
        select t.typname, format_type(t.typbasetype, t.typtypmod), t.typnotnull
        from pg_type t where t.typnamespace = 'durable'::regnamespace and t.typtype = 'd'
        order by 1""",
    "constraints": """
        select conrelid::regclass::text, contypid::regtype::text, conname,
               pg_get_constraintdef(oid), convalidated
        from pg_constraint where connamespace = 'durable'::regnamespace order by 1, 2, 3""",
    "indexes": """
        select tablename, indexname, indexdef from pg_indexes
        where schemaname = 'durable' order by 1, 2""",
    "functions": """
        select p.proname, pg_get_function_identity_arguments(p.oid), p.proconfig,
               pg_get_functiondef(p.oid)
        from pg_proc p where p.pronamespace = 'durable'::regnamespace order by 1, 2""",
    "triggers": """
        select tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) from pg_trigger
        where not tgisinternal and tgrelid::regclass::text like 'durable.%' order by 1, 2""",
    "types": """
        select udt_name, attribute_name, data_type, ordinal_position
        from information_schema.attributes where udt_schema = 'durable'
        order by 1, ordinal_position""",
    "sequences": """
        select sequence_name, data_type from information_schema.sequences
        where sequence_schema = 'durable' order by 1""",
}


def all_versions() -> list[int]:
    return [version for version, _name, _path in migration_files()]


@pytest.fixture
async def two_databases(server_dsn: str) -> AsyncIterator[tuple[str, str]]:
    names = [f"durable_mig_{secrets.token_hex(4)}" for _ in range(2)]
    for n in names:
        await admin(server_dsn, f"create database {quote_ident(n)}")
    try:
        yield database_dsn(server_dsn, names[0]), database_dsn(server_dsn, names[1])
    finally:
        for n in names:
            await admin(server_dsn, f"drop database if exists {quote_ident(n)} with (force)")


async def catalog(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {k: [tuple(r) for r in await conn.fetch(q)] for k, q in CATALOG.items()}
    finally:
        await conn.close()


async def test_migrations_build_the_schema(two_databases: tuple[str, str]) -> None:
    from_schema, from_migrations = two_databases
    await admin(from_schema, schema_sql())
    applied = await migrate(from_migrations)
    assert applied == all_versions()
    want, got = await catalog(from_schema), await catalog(from_migrations)
    assert want["columns"], "schema.sql created no tables"
    for part in CATALOG:
        assert got[part] == want[part], f"{part} differ between schema.sql and the migrations"


async def test_migrate_is_idempotent_and_recorded(two_databases: tuple[str, str]) -> None:
    dsn, _ = two_databases
    assert await migrate(dsn) == all_versions()
    assert await migrate(dsn) == []
    conn = await asyncpg.connect(dsn)
    try:
        versions = [r[0] for r in await conn.fetch("select version from durable.migrations")]
    finally:
        await conn.close()
    assert versions == all_versions()


async def test_concurrent_migrations_queue_on_the_lock(two_databases: tuple[str, str]) -> None:
    import anyio

    dsn, _ = two_databases
    results: list[list[int]] = []

    async def one() -> None:
        results.append(await migrate(dsn))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    assert sorted(map(len, results)) == [0, 0, len(all_versions())]


async def test_a_checkpoint_travels_as_the_row_type_field_for_field(dsn: str) -> None:
    """The daemon passes Checkpoint tuples as durable.checkpoint_epoch_row values, by
    position; the older durable.checkpoint_row keeps the same fields for daemons of the
    previous release."""
    conn = await asyncpg.connect(dsn)
    try:
        fields = await conn.fetch(
            "select attribute_name from information_schema.attributes"
            " where udt_schema = 'durable' and udt_name = $1 order by ordinal_position",
            "checkpoint_epoch_row",
        )
        old = await conn.fetch(
            "select attribute_name from information_schema.attributes"
            " where udt_schema = 'durable' and udt_name = $1 order by ordinal_position",
            "checkpoint_row",
        )
    finally:
        await conn.close()
    assert [r[0] for r in fields] == list(Checkpoint._fields)
    assert [r[0] for r in old] == list(Checkpoint._fields)


async def test_the_task_columns_refuse_what_their_checks_refuse(dsn: str) -> None:
    """The checks on one column live in domains, the ones relating columns on the
    table: each still refuses its bad value, whatever writes it."""
    conn = await asyncpg.connect(dsn)
    try:
        task = await conn.fetchval(
            "insert into durable.tasks (queue, name) values ('q', 'n') returning id"
        )
        bad = {
            "status = 'finished'": "task_status_check",
            "kind = 'job'": "task_kind_check",
            "queue = ''": "label_check",
            "name = repeat('n', 201)": "label_check",
            "attempt = 0": "positive_int_check",
            "max_attempts = 0": "positive_int_check",
            "key_limit = 0": "positive_int_check",
            "timeout = 0": "positive_seconds_check",
            "key_rate_limit = 5": "tasks_key_check",  # a rate limit without its period
            "key_rate_limit = 0, key_rate_period = 1": "positive_int_check",
            "key_rate_limit = 5, key_rate_period = -1": "positive_seconds_check",
            "status = 'running'": "tasks_claim_check",  # running without a claim token
            "status = 'running', claim_token = 1": "tasks_running_check",  # nor a lease
            "claim_token = 1": "tasks_claim_check",  # a token on a queued task
        }
        for change, check in bad.items():
            with pytest.raises(asyncpg.CheckViolationError, match=check):
                await conn.execute(f"update durable.tasks set {change} where id = $1", task)
        with pytest.raises(asyncpg.CheckViolationError, match="label_check"):
            await conn.execute("insert into durable.tasks (queue, name) values ('q', '')")
        # And what is right goes in.
        await conn.execute(
            "update durable.tasks set status = 'running', claim_token = 1,"
            " lease_until = now(), key_rate_limit = 5, key_rate_period = 0.5 where id = $1",
            task,
        )
    finally:
        await conn.close()


async def test_statements_take_base_types_so_a_client_looks_nothing_up(dsn: str) -> None:
    """A parameter typed as one of durable's domains makes asyncpg look the type up, one
    more query, on every new connection. The statements cast to base types instead."""
    conn = await asyncpg.connect(dsn)
    try:
        for i, query in enumerate(named_queries("queries.sql").values()):
            await conn.execute(f"prepare s{i} as {query}")
        found = await conn.fetch(
            "select s.statement, t.typname from pg_prepared_statements s,"
            " unnest(s.parameter_types) p join pg_type t on t.oid = p"
            " where t.typnamespace = 'durable'::regnamespace and t.typtype = 'd'"
        )
    finally:
        await conn.close()
    assert not found, [(r["typname"], r["statement"][:80]) for r in found]


async def pre_release(dsn: str, versions: range, *, drop: str | None = None) -> None:
    """A database as durable before 0.1.0 left it: the schema (which the fifteen old
    migrations built, catalog for catalog), versions recorded under their old names, a task."""
    statements = [
        # What 0001 builds is the fifteen old migrations' schema; later ones come on top.
        "create schema durable; create table durable.migrations (version integer primary"
        " key, name text not null, applied_at timestamptz not null default now())",
        (sql_dir() / "migrations" / "0001_initial.sql").read_text(),
        "insert into durable.tasks (queue, name) values ('q', 'kept')",
        *(
            f"insert into durable.migrations (version, name) values ({v}, '{PRE_RELEASE_MIGRATIONS[v - 1]}')"
            for v in versions
        ),
    ]
    if drop:
        statements.append(f"alter table durable.tasks drop column {drop}")
    await admin(dsn, *statements)


async def recorded(dsn: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [
            tuple(r)
            for r in await conn.fetch("select version, name from durable.migrations order by 1")
        ]
    finally:
        await conn.close()


async def test_a_database_with_every_pre_release_migration_is_recorded_at_0001(
    two_databases: tuple[str, str],
) -> None:
    old, fresh = two_databases
    await pre_release(old, range(1, 16))
    later = [v for v, _, _ in migration_files() if v > 1]
    assert await migrate(old) == later  # 2..15 free for later migrations
    assert [v for v, _ in await recorded(old)] == [1, *later]
    await migrate(fresh)
    assert await catalog(old) == await catalog(fresh)
    conn = await asyncpg.connect(old)
    try:
        assert await conn.fetchval("select name from durable.tasks") == "kept"
    finally:
        await conn.close()
    assert await migrate(old) == []


@pytest.mark.parametrize(
    ("versions", "drop", "shown"),
    [
        (range(1, 8), None, "1, 2, 3, 4, 5, 6, 7"),
        (range(2, 16), None, "2, 3"),
        (range(1, 2), "trace_context", "1 of"),
    ],
)
async def test_a_partial_pre_release_set_is_refused_with_the_way_out(
    two_databases: tuple[str, str], versions: range, drop: str | None, shown: str
) -> None:
    dsn, _ = two_databases
    await pre_release(dsn, versions, drop=drop)
    before = await recorded(dsn)
    with pytest.raises(DurableError, match=r"pre-0\.1\.0 migrations") as caught:
        await migrate(dsn)
    message = str(caught.value)
    assert shown in message and PRE_RELEASE_REVISION in message and "\n" not in message
    assert await recorded(dsn) == before


async def test_migrate_refuses_a_partial_pre_release_set_in_one_line(
    two_databases: tuple[str, str],
) -> None:
    dsn, _ = two_databases
    await pre_release(dsn, range(1, 5))
    proc = await anyio.to_thread.run_sync(partial(durable_cli, "migrate", dsn=dsn))
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith("durable: this database holds pre-0.1.0 migrations 1, 2, 3, 4 of 1-15")

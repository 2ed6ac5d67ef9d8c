"""The migrations applied from zero build exactly the catalog that sql/schema.sql describes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from durable.models import Checkpoint
from durable.store import latest_version, migrate, schema_sql
from tests.conftest import admin, database_dsn, quote_ident

CATALOG = {
    "columns": """
        select table_name, column_name, data_type, is_nullable, column_default, ordinal_position
        from information_schema.columns where table_schema = 'durable'
        order by table_name, ordinal_position""",
    "constraints": """
        select conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        from pg_constraint where connamespace = 'durable'::regnamespace order by 1, 2""",
    "indexes": """
        select tablename, indexname, indexdef from pg_indexes
        where schemaname = 'durable' order by 1, 2""",
    "functions": """
        select p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid)
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
    assert applied == list(range(1, latest_version() + 1))
    want, got = await catalog(from_schema), await catalog(from_migrations)
    assert want["columns"], "schema.sql created no tables"
    for part in CATALOG:
        assert got[part] == want[part], f"{part} differ between schema.sql and the migrations"


async def test_migrate_is_idempotent_and_recorded(two_databases: tuple[str, str]) -> None:
    dsn, _ = two_databases
    assert await migrate(dsn) == list(range(1, latest_version() + 1))
    assert await migrate(dsn) == []
    conn = await asyncpg.connect(dsn)
    try:
        versions = [r[0] for r in await conn.fetch("select version from durable.migrations")]
    finally:
        await conn.close()
    assert versions == list(range(1, latest_version() + 1))


async def test_concurrent_migrations_queue_on_the_lock(two_databases: tuple[str, str]) -> None:
    import anyio

    dsn, _ = two_databases
    results: list[list[int]] = []

    async def one() -> None:
        results.append(await migrate(dsn))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    assert sorted(map(len, results)) == [0, 0, latest_version()]


async def test_a_checkpoint_travels_as_the_row_type_field_for_field(dsn: str) -> None:
    """The daemon passes Checkpoint tuples as durable.checkpoint_row values, by position."""
    conn = await asyncpg.connect(dsn)
    try:
        fields = await conn.fetch(
            "select attribute_name from information_schema.attributes"
            " where udt_schema = 'durable' and udt_name = 'checkpoint_row'"
            " order by ordinal_position"
        )
    finally:
        await conn.close()
    assert [r[0] for r in fields] == list(Checkpoint._fields)

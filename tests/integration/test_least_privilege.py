"""`durable migrate --grant ROLE`: a role with exactly what the daemon and clients need
runs a daemon and clients, and can neither alter nor drop the schema."""

from __future__ import annotations

import asyncpg
import pytest

import durable
from tests.support.helpers import durable_cli, running_daemon, wait_for
from tests.support.roles import APP_ROLE, app_role, as_app

QUEUE = "least-privilege"


@durable.task(queue=QUEUE)
async def lp_double(x: int) -> int:
    return 2 * x


@durable.workflow(queue=QUEUE)
async def lp_flow(ctx: durable.Context, x: int) -> dict[str, object]:
    a = await ctx.step("add", lambda: x + 1)
    await ctx.sleep(0.05)
    b = await ctx.run(lp_double, a)
    c, d = await ctx.gather(ctx.run(lp_double, 1), ctx.run(lp_double, 2))
    when = await ctx.now()
    got = await ctx.wait_for_event("go", timeout=30)
    return {"a": a, "b": b, "fan": [c, d], "event": got, "when": when.isoformat()}


@pytest.mark.timeout(60)
async def test_a_granted_role_runs_the_daemon_and_clients_and_cannot_change_the_schema(
    dsn: str,
) -> None:
    await app_role(dsn)
    done = durable_cli("migrate", "--grant", APP_ROLE, dsn=dsn)
    assert done.returncode == 0, done.stderr
    assert f"granted '{APP_ROLE}'" in done.stdout
    app = as_app(dsn)

    async with durable.connect(app) as client, running_daemon(app, queues=QUEUE):
        plain = await client.start(lp_double, 21)
        flow = await client.start(lp_flow, 1)
        assert await plain.result(timeout=20) == 42

        async def waiting() -> bool:
            return (await client.get(flow.id)).waiting_event == "go"

        await wait_for(waiting)
        conn = await asyncpg.connect(app)
        try:  # the SQL API as that role
            assert await conn.fetchval("select durable.send_event($1, 'go', '\"ok\"')", flow.id)
            sql_id = await conn.fetchval("select durable.start('lp_double', '[5]', queue => $1)",
                                         QUEUE)
        finally:
            await conn.close()
        result = await flow.result(timeout=20)
        assert (result["a"], result["b"], result["fan"], result["event"]) == (2, 4, [2, 4], "ok")
        assert await durable.Handle(client, sql_id).result(timeout=20) == 10
        assert [e.kind for e in await client.history(flow.id)] == [
            "step", "sleep", "child", "child", "child", "memo", "event",
        ]

    conn = await asyncpg.connect(app)
    try:
        for statement in (
            "alter table durable.tasks add column x int",
            "drop table durable.tasks",
            "drop table durable.events cascade",
            "create table durable.intruder (i int)",
            "truncate durable.signals",
            "drop function durable.start(text, jsonb, jsonb, text, integer, timestamptz,"
            " integer, double precision, text, text, text, integer, boolean,"
            " double precision, text, double precision, text, double precision)",
            "create or replace function durable.ping() returns int language sql as 'select 1'",
            "insert into durable.migrations (version, name) values (999, 'evil')",
            "drop schema durable cascade",
            # No object in a schema on anyone's search_path (PostgreSQL 15 and later keep
            # CREATE on public from every role but the database owner)...
            "create table public.intruder (i int)",
            # ...so no look-alike of a built-in that a better argument match would pick.
            "create function public.unnest(a text[]) returns setof text language sql"
            " as 'select null::text'",
            "create function durable.unnest(a text[]) returns setof text language sql"
            " as 'select null::text'",
            "create operator durable.= (leftarg = durable.label, rightarg = text,"
            " function = pg_catalog.texteq)",
            "alter function durable.claim_delay(text) reset search_path",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        # Nothing beyond the four table privileges, no ownership, no create on the schema.
        extra = await conn.fetch(
            "select table_name, privilege_type from information_schema.role_table_grants"
            " where grantee = $1 and table_schema = 'durable'"
            "   and privilege_type not in ('SELECT', 'INSERT', 'UPDATE', 'DELETE')",
            APP_ROLE,
        )
        assert extra == []
        assert not await conn.fetchval("select has_schema_privilege($1, 'durable', 'create')",
                                       APP_ROLE)
        assert await conn.fetchval(
            "select count(*) from pg_class where relowner = $1::regrole", APP_ROLE
        ) == 0
        assert not await conn.fetchval(
            "select has_table_privilege($1, 'durable.migrations', 'insert')", APP_ROLE
        )
    finally:
        await conn.close()


async def test_grant_to_a_role_that_does_not_exist_is_one_clear_line(dsn: str) -> None:
    done = durable_cli("migrate", "--grant", 'no such "role"', dsn=dsn)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "role" in done.stderr and "does not exist" in done.stderr

"""durable's functions cannot be hijacked through search_path.

A role given `durable migrate --grant` that may also create objects in `public` (the
default up to PostgreSQL 14, kept by databases upgraded from it) plants functions and
operators there whose argument types match durable's calls better than the catalog's
(`public.unnest(text[])` beats `pg_catalog.unnest(anyarray)` for a `text[]`). When a
superuser then starts, claims, completes, cancels, restarts or wakes tasks, none of them
may run: they would run with the superuser's rights.
"""

from __future__ import annotations

import re

import asyncpg
import pytest

from durable.store import grant
from tests.support.helpers import durable_cli, execute, fetchval
from tests.support.roles import APP_ROLE, app_role, as_app

# Every planted routine records its name and the user it ran as, then behaves as the
# catalog's would, so that the superuser's statements go on as if nothing happened.
PLANTED = """
create table public.hijacked (fn text not null, ran_as text not null);
grant insert on public.hijacked to public;
create function public.hijack(fn text) returns void language sql
    as $$ insert into public.hijacked values (fn, current_user) $$;

create function public.unnest(a text[]) returns setof text language plpgsql as $$
begin perform public.hijack('unnest(text[])'); return query select pg_catalog.unnest(a); end $$;
create function public.unnest(a bigint[]) returns setof bigint language plpgsql as $$
begin perform public.hijack('unnest(bigint[])'); return query select pg_catalog.unnest(a); end $$;

create function public.agg_text(s text[], v text) returns text[] language plpgsql as $$
begin perform public.hijack('array_agg(text)'); return pg_catalog.array_append(s, v); end $$;
create aggregate public.array_agg(text) (sfunc = public.agg_text, stype = text[]);
create function public.agg_bigint(s bigint[], v bigint) returns bigint[] language plpgsql as $$
begin perform public.hijack('array_agg(bigint)'); return pg_catalog.array_append(s, v); end $$;
create aggregate public.array_agg(bigint) (sfunc = public.agg_bigint, stype = bigint[]);

create function public.pg_notify(c text, p durable.label) returns void language plpgsql as $$
begin perform public.hijack('pg_notify(text, label)'); perform pg_catalog.pg_notify(c, p); end $$;

create function public.cat(a text, b bigint) returns text language plpgsql as $$
begin perform public.hijack('||(text, bigint)'); return a operator(pg_catalog.||) b::text; end $$;
create operator public.|| (leftarg = text, rightarg = bigint, function = public.cat);

create function public.label_eq(a durable.label, b text) returns boolean language plpgsql as $$
begin perform public.hijack('=(label, text)'); return a::text operator(pg_catalog.=) b; end $$;
create operator public.= (leftarg = durable.label, rightarg = text, function = public.label_eq);

create function public.times(a double precision, b bigint) returns double precision
    language plpgsql as $$
begin perform public.hijack('*(float8, bigint)'); return a operator(pg_catalog.*) b::float8; end $$;
create operator public.* (leftarg = double precision, rightarg = bigint, function = public.times);
"""

# Functions that may leave search_path alone, because a SET clause would stop the planner
# from inlining them on the hot path; their bodies must name everything with its schema.
INLINED = {"durable.new_token()"}

QUEUE = "sp"


async def hijacks(dsn: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("select fn, ran_as from public.hijacked order by 1")
    finally:
        await conn.close()
    return [(r["fn"], r["ran_as"]) for r in rows]


@pytest.fixture
async def planted(dsn: str) -> str:
    """``dsn`` after the granted role planted its look-alikes in ``public``."""
    await app_role(dsn)
    await grant(dsn, APP_ROLE)
    await execute(dsn, f'grant create on schema public to "{APP_ROLE}"')
    await execute(as_app(dsn), PLANTED)
    return dsn


@pytest.mark.timeout(60)
async def test_planted_functions_never_run_for_a_superuser(planted: str) -> None:
    dsn = planted
    conn = await asyncpg.connect(dsn)  # a superuser, with public on its search_path
    try:
        assert await conn.fetchval("select rolsuper from pg_roles where rolname = current_user")
        assert "public" in await conn.fetchval("show search_path")

        # Start (the insert trigger notifies per queue), then claim as the daemon does.
        ids = [
            await conn.fetchval("select durable.start('sp_task', '[1]', queue => $1)", QUEUE)
            for _ in range(3)
        ]
        keyed = await conn.fetchval(
            "select durable.start('sp_task', queue => $1, concurrency_key => 'k', key_limit => 1)",
            QUEUE,
        )
        claimed = await conn.fetch(
            "select id, claim_token from durable.claim($1, array['sp_task'], 10, 30,"
            " gen_random_uuid())",
            QUEUE,
        )
        assert sorted(r["id"] for r in claimed) == sorted([*ids, keyed])

        # Complete one and the keyed one, cancel another: the update trigger's pass.
        await conn.execute(
            "update durable.tasks set status = 'completed', result = '1', finished_at = now(),"
            " claim_token = null, lease_until = null where id = any($1::bigint[])",
            [ids[0], keyed],
        )
        await conn.execute(
            "update durable.tasks set status = 'cancelled', finished_at = now(),"
            " claim_token = null, lease_until = null where id = $1",
            ids[1],
        )

        # A workflow waiting for a child that finishes: the wake-up pass.
        parent = await conn.fetchval(
            "select durable.start('sp_flow', queue => $1, kind => 'workflow')", QUEUE
        )
        flow = await conn.fetchrow(
            "select id, claim_token from durable.claim($1, array['sp_flow'], 1, 30,"
            " gen_random_uuid())",
            QUEUE,
        )
        assert flow is not None
        child = await conn.fetchval(
            "insert into durable.tasks (queue, name, parent_id, root_id) values ($1, 'sp_task',"
            " $2, $2) returning id",
            QUEUE, parent,
        )  # fmt: skip
        assert await conn.fetchval(
            "select durable.suspend($1, $2, 0, array[$3::bigint], null, null)",
            flow["id"], flow["claim_token"], child,
        ) == "waiting"  # fmt: skip
        await conn.execute(
            "update durable.tasks set status = 'completed', finished_at = now() where id = $1",
            child,
        )
        assert await conn.fetchval("select status from durable.tasks where id = $1", parent) == (
            "queued"
        )
        assert await conn.fetchval("select durable.send_event($1, 'go')", parent)
        assert await conn.fetchval("select durable.restart($1, 'retry')", ids[1]) == 0
        assert await conn.fetchval("select durable.claim_delay($1)", QUEUE) is None
    finally:
        await conn.close()

    # The command line, run by an administrator as the superuser.
    for command in (("cancel", str(ids[2])), ("retry", str(ids[0])), ("start", "sp_task", "--allow-unknown")):
        done = durable_cli(*command, dsn=dsn)
        assert done.returncode == 0, done.stderr

    assert await hijacks(dsn) == []
    # The look-alikes were live all along: a plain call from the session finds one.
    await fetchval(dsn, "select unnest(array['x']::text[])")
    assert await hijacks(dsn) == [("unnest(text[])", "postgres")]


async def test_every_durable_function_pins_its_search_path(dsn: str) -> None:
    """A function added later without `set search_path` fails here."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select p.oid::regprocedure::text as f, p.proconfig, p.prosrc,"
            " l.lanname from pg_proc p join pg_language l on l.oid = p.prolang"
            " where p.pronamespace = 'durable'::regnamespace and p.prokind in ('f', 'p')"
        )
        inlined = [
            r[0] for r in await conn.fetch("explain (verbose) select durable.new_token()")
        ]
    finally:
        await conn.close()
    assert rows
    pinned = {r["f"] for r in rows if "search_path=pg_catalog, pg_temp" in (r["proconfig"] or [])}
    unpinned = {r["f"] for r in rows} - pinned
    assert unpinned == INLINED, f"functions without a pinned search_path: {unpinned - INLINED}"
    for r in rows:
        if r["f"] in INLINED:
            assert r["lanname"] == "sql" and r["proconfig"] is None
            body = re.sub(r"operator\(pg_catalog\.[^)]+\)|::", " ", r["prosrc"])
            calls = set(re.findall(r"([\w.]+)\s*\(", body)) - {"select"}
            assert all(c.startswith("pg_catalog.") for c in calls), (r["f"], calls)
            assert not re.search(r"[-+*/<>=~!@#%^&|`?]", body), (r["f"], body)
    # And the planner still inlines it into the claim.
    assert "new_token" not in "\n".join(inlined) and "random()" in "\n".join(inlined)

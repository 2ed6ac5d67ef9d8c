"""Workflows and tasks for tests/faults/test_crash_races.py, run by subprocess daemons
(``durable run --app tests.apps.crash_races_app``).

The test holds *gates*: session advisory locks on the keys below. Code that passes a gate
waits for a shared lock on its key, so the test sees it blocked (pg_locks) at a chosen
point and kills the daemon, or the blocked connection, right there. The triggers in
``CRASH_TABLES`` put gates inside durable's own writes: the COMMIT of a transactional
step's business writes, the insert of a chosen checkpoint, and a task's completion.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg

import durable

QUEUE = "crash_races"
LIMITED = "crash_limited"

IN_TRANSACTION = 701
"""Inside a transactional step's function, after its business write."""
AT_COMMIT = 702
"""In the COMMIT of a transaction that wrote a business row (a deferred trigger)."""
NEXT_STEP = 703
"""Inside the step that follows (a step body waits on it when given the key)."""
AT_CHECKPOINT = 704
"""In the insert of a completed event whose name starts with 'gated' (a step's
checkpoint, a backoff's sleep)."""
AT_FAILED_CHECKPOINT = 705
"""In the insert of a failed event whose name starts with 'gated' (a failed try)."""
AT_COMPLETION = 706
"""In the update that completes the task named 'cr_gated_task'."""

CRASH_TABLES = f"""
create table cr_effects (
    id bigint generated always as identity primary key,
    task_id bigint not null,
    name text not null,
    pid integer not null,
    at timestamptz not null default clock_timestamp()
);
create table cr_business (
    id bigint generated always as identity primary key,
    task_id bigint not null,
    name text not null
);
create table cr_completions (task_id bigint not null, at timestamptz not null);
create table cr_live (i integer not null, backend integer not null, pid integer not null);
create table cr_seen (i integer not null, seen integer not null, pid integer not null);

create function public.cr_commit_gate() returns trigger language plpgsql as $$
begin
    perform pg_advisory_xact_lock_shared({AT_COMMIT});
    return null;
end $$;
create constraint trigger cr_business_gate after insert on cr_business
    deferrable initially deferred for each row execute function public.cr_commit_gate();

create function public.cr_event_gate() returns trigger language plpgsql as $$
begin
    if new.status::text = 'failed' then
        perform pg_advisory_xact_lock_shared({AT_FAILED_CHECKPOINT});
    else
        perform pg_advisory_xact_lock_shared({AT_CHECKPOINT});
    end if;
    return new;
end $$;
create trigger cr_event_gate before insert on durable.events for each row
    when (new.name::text like 'gated%') execute function public.cr_event_gate();

create function public.cr_completion_gate() returns trigger language plpgsql as $$
begin
    perform pg_advisory_xact_lock_shared({AT_COMPLETION});
    return new;
end $$;
create trigger cr_completion_gate before update on durable.tasks for each row
    when (new.status::text = 'completed' and new.name::text = 'cr_gated_task')
    execute function public.cr_completion_gate();

create function public.cr_completion_log() returns trigger language plpgsql as $$
begin
    insert into public.cr_completions values (new.id, clock_timestamp());
    return null;
end $$;
create trigger cr_completion_log after update on durable.tasks for each row
    when (new.status::text = 'completed' and old.status::text <> 'completed')
    execute function public.cr_completion_log();
"""


def _dsn() -> str:
    return os.environ["DURABLE_DATABASE_URL"]


async def _pass_gate(conn: asyncpg.Connection, key: int) -> None:
    await conn.execute("select pg_advisory_lock_shared($1::bigint)", key)
    await conn.execute("select pg_advisory_unlock_shared($1::bigint)", key)


async def effect(task_id: int, name: str, gate: int = 0) -> str:
    """A step's external effect (one row per run), then an optional gate."""
    conn = await asyncpg.connect(_dsn())
    try:
        await conn.execute(
            "insert into cr_effects (task_id, name, pid) values ($1, $2, $3)",
            task_id, name, os.getpid(),
        )  # fmt: skip
        if gate:
            await _pass_gate(conn, gate)
    finally:
        await conn.close()
    return name


async def business(conn: asyncpg.Connection, task_id: int) -> str:
    """A transactional step's business write; it waits at IN_TRANSACTION inside the
    transaction and at AT_COMMIT in its COMMIT (while the test holds those gates)."""
    await conn.execute("insert into cr_business (task_id, name) values ($1, 'biz')", task_id)
    await conn.execute("select pg_advisory_xact_lock_shared($1::bigint)", IN_TRANSACTION)
    return "biz"


TX_RETRY = durable.RetryPolicy(max_attempts=3, base=0.05, jitter=0)


@durable.workflow(
    queue=QUEUE, max_attempts=10, retry=durable.RetryPolicy(base=0.05, jitter=0)
)
async def cr_transaction(ctx: durable.Context, retried: bool) -> list[Any]:
    if retried:
        done = await ctx.transaction("biz", business, ctx.task_id, retry=TX_RETRY)
    else:
        done = await ctx.transaction("biz", business, ctx.task_id)
    after = await ctx.step("after", effect, ctx.task_id, "after", NEXT_STEP)
    return [done, after]


@durable.workflow(queue=QUEUE, max_attempts=10)
async def cr_steps(ctx: durable.Context) -> list[Any]:
    # The first step's checkpoint is gated (its name starts with 'gated').
    one = await ctx.step("gated_one", effect, ctx.task_id, "one")
    two = await ctx.step("two", effect, ctx.task_id, "two", NEXT_STEP)
    return [one, two]


async def flaky(task_id: int) -> int:
    """Fails its first run; every run is one row."""
    conn = await asyncpg.connect(_dsn())
    try:
        n: int = await conn.fetchval(
            "with i as (insert into cr_effects (task_id, name, pid) values ($1, 'flaky', $2))"
            " select count(*) + 1 from cr_effects where task_id = $1 and name = 'flaky'",
            task_id, os.getpid(),
        )  # fmt: skip
    finally:
        await conn.close()
    if n < 2:
        raise RuntimeError(f"run {n} fails")
    return n


BACKOFF = durable.RetryPolicy(max_attempts=3, base=6.0, factor=1.0, jitter=0)
"""A backoff longer than steps.INLINE_BACKOFF: the workflow suspends between tries."""


@durable.workflow(queue=QUEUE, max_attempts=10)
async def cr_backoff(ctx: durable.Context) -> int:
    # The backoff's sleep is named "gated_flaky (backoff)": its insert is gated.
    n: int = await ctx.step("gated_flaky", flaky, ctx.task_id, retry=BACKOFF)
    return n


@durable.task(name="cr_gated_task", queue=QUEUE, max_attempts=10)
async def cr_gated_task(i: int) -> str:
    conn = await asyncpg.connect(_dsn())
    try:
        await conn.execute(
            "insert into cr_effects (task_id, name, pid) values ($1, 'task', $2)", i, os.getpid()
        )
    finally:
        await conn.close()
    return f"done-{i}"


LIVE = (
    "select count(*) from cr_live l"
    " where exists (select 1 from pg_stat_activity a where a.pid = l.backend)"
)
"""Tasks running now: a row whose connection is gone belongs to a killed daemon."""


@durable.task(name="cr_limited", queue=LIMITED, max_attempts=20)
async def cr_limited(i: int, work: float) -> int:
    """Registers itself live on its own connection, counts the live ones, works, counts
    again, and unregisters (a killed daemon's rows lose their connection)."""
    conn = await asyncpg.connect(_dsn())
    try:
        await conn.execute(
            "insert into cr_live values ($1, pg_backend_pid(), $2)", i, os.getpid()
        )
        for _ in range(2):
            seen = await conn.fetchval(LIVE)
            await conn.execute("insert into cr_seen values ($1, $2, $3)", i, seen, os.getpid())
            await asyncio.sleep(work)  # the work itself
        await conn.execute("delete from cr_live where backend = pg_backend_pid()")
    finally:
        await conn.close()
    return i

"""Tasks for tests/faults/test_limit_kills.py, run by subprocess daemons
(``durable run --app tests.apps.limit_kills_app``) that the test SIGKILLs.

Every body records its run in ``lk_runs`` on a connection of its own: the start when it
begins and the end when it stops (both from the server's clock). A killed daemon's runs
keep no end; the test closes them at the instant it saw the daemon dead. The triggers in
``TABLES`` copy every claim of a task and every rate-log entry, which the claim prunes.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg

import durable

LIMITED = "lk_limited"
KEY_A = "lk_key_a"
KEY_B = "lk_key_b"
RATED = "lk_rated"
LEASE = 2.0
"""DURABLE_LEASE of the test's daemons: a claim stamped at t leases to t + LEASE."""

TABLES = f"""
create table lk_runs (
    id bigint generated always as identity primary key,
    task_id bigint not null,
    queue text not null,
    pid integer not null,
    started timestamptz not null default clock_timestamp(),
    ended timestamptz
);
create table lk_claims (task_id bigint not null, queue text not null, at timestamptz not null);
create table lk_rate (bucket text not null, at timestamptz not null);

create function public.lk_claim_log() returns trigger language plpgsql as $$
begin
    insert into public.lk_claims
        values (new.id, new.queue, new.lease_until - make_interval(secs => {LEASE}));
    return null;
end $$;
create trigger lk_claim_log after update on durable.tasks for each row
    when (new.status::text = 'running' and old.status::text <> 'running'
          and new.queue::text like 'lk_%')
    execute function public.lk_claim_log();

create function public.lk_rate_log() returns trigger language plpgsql as $$
begin
    insert into public.lk_rate values (new.bucket, new.at);
    return null;
end $$;
create trigger lk_rate_log after insert on durable.rate_log for each row
    execute function public.lk_rate_log();
"""


async def _run(task_id: int, queue: str, work: float) -> None:
    conn = await asyncpg.connect(os.environ["DURABLE_DATABASE_URL"])
    try:
        run = await conn.fetchval(
            "insert into lk_runs (task_id, queue, pid) values ($1, $2, $3) returning id",
            task_id, queue, os.getpid(),
        )  # fmt: skip
        try:
            await asyncio.sleep(work)  # the work itself
        finally:
            # A body stopped by the daemon (a lost lease) ends here too.
            await asyncio.shield(
                conn.execute("update lk_runs set ended = clock_timestamp() where id = $1", run)
            )
    finally:
        await conn.close()


@durable.task(name="lk_limited", queue=LIMITED, max_attempts=20)
async def lk_limited(ctx: durable.TaskContext, i: int, work: float) -> int:
    await _run(ctx.id, LIMITED, work)
    return i


def _key(key: str, i: int, work: float) -> str:
    return key


@durable.task(name="lk_key_a", queue=KEY_A, max_attempts=20, concurrency_key=_key, key_limit=2)
async def lk_key_a(ctx: durable.TaskContext, key: str, i: int, work: float) -> int:
    await _run(ctx.id, KEY_A, work)
    return i


@durable.task(name="lk_key_b", queue=KEY_B, max_attempts=20, concurrency_key=_key, key_limit=2)
async def lk_key_b(ctx: durable.TaskContext, key: str, i: int, work: float) -> int:
    await _run(ctx.id, KEY_B, work)
    return i


@durable.task(name="lk_rated", queue=RATED, max_attempts=20)
async def lk_rated(ctx: durable.TaskContext, i: int, work: float) -> int:
    await _run(ctx.id, RATED, work)
    return i

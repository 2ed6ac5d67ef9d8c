"""The claim under concurrent load: claims, cancels, completions and enqueues at once.

Sixteen connections work on four queues for a few rounds: `plain` (unkeyed tasks, no
limit), `limited` (a fleet-wide concurrency of 2 in durable.queues, keyed and unkeyed
tasks), and `keyed_a`, `keyed_b` (no queue limit; mostly unkeyed tasks, some keyed). The
keys are shared by all three keyed queues: k0 and k1 with key_limit 1, k2 with key_limit 2.

- claimers send queries.sql `claim` (batches of 1 to 3), alone or inside a transaction
  that commits one round trip later;
- finishers end what the claimers took with queries.sql `complete` (fenced on the claim
  token, without looking at `cancel_requested`, as a daemon that has not yet heard of a
  cancel does), or hand it back with `release`;
- cancellers send queries.sql `cancel` (what `client.cancel` sends), mostly at running
  tasks;
- enqueuers call `durable.start` in transactions of one to five tasks that stay open for a
  while and roll back one time in five.

After every round, when every committed task has finished, the audit below is checked.

The audit (test-only triggers on durable.tasks, installed in this test's database):

- `race_audit` gets a row for every update that changes a task's status or claim token,
  in the writing transaction (so a rolled-back write leaves none), with its xid.
- `race_commits` gives the global order of commits. A DEFERRABLE INITIALLY DEFERRED
  constraint trigger fires at commit in every transaction that inserted or updated a
  task; its first firing takes a transaction-level advisory lock, held until the
  transaction ends (after its commit is visible), and then, in a new statement (READ
  COMMITTED: a new snapshot, taken after the lock was granted), appends the transaction's
  xid with the number of running tasks per queue and per key. Every transaction that
  changes durable.tasks (and every cancel's, which inserts a row in `race_marks` for
  the purpose, whatever the cancel writes) commits while holding that lock, so their commits are totally
  ordered by `race_commits.seq`, and each snapshot sees exactly the commits ordered before
  it plus the transaction's own writes: the counts recorded are the committed state right
  after that commit. Since only these commits change the table, the recorded counts are
  every state the table was ever in, so "no limit exceeded at any instant" is "no
  recorded count above its limit". (Transactions that write no task row change nothing
  the checks look at; rolled-back ones never become visible.)

The invariants, checked on the whole audit after each round:

1. A claim (a write that sets `running` with a new claim token) only ever takes a queued
   task. A claim whose old row was already running with another token is a second live
   claim of the task (two daemons run it at once); one whose old row was cancelled (or
   any other status) revives a task that had ended.
2. No recorded count exceeds its limit: running tasks of `limited` <= 2, running tasks of
   each key <= its key_limit (counted across all queues, as key_limit is defined).
3. No acknowledged cancel is lost. A cancel is acknowledged when its transaction returned
   the task's id and committed. Any later write of that task row (its outcome included)
   waits for that commit, so the cancel commits before the task's outcome, and a cancel
   that commits first must win: every write that ends the task after the cancel's commit
   (audit rows of transactions later in `race_commits`) sets `cancelled`, and the task is
   `cancelled` at the end of the round.

A correct claim passes whatever the interleaving: the invariants hold in every execution,
and the workload always ends (every claimed task is finished or handed back, every key and
queue limit frees up as tasks finish). The test stops at the first round with a breach.
On 8974d60 it fails in round 1: always on invariant 3 (completions ignore
`cancel_requested`), usually on 2 as well (one key running twice across queues). With the
completion alone fixed (a patched query), it still failed in every run: on invariant 2
within the first five rounds, and on invariant 1 (a second live claim, or a cancelled task
claimed again) within the 25 rounds in 5 runs of 6.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from durable.store import queries
from tests.support.helpers import wait_for

Q = queries()
AUDIT_LOCK = 2020_0002
QUEUE_LIMITS = {"limited": 2}
KEY_LIMITS = {"k0": 1, "k1": 1, "k2": 2}
KEYED_QUEUES = ("limited", "keyed_a", "keyed_b")
QUEUES = ("plain", *KEYED_QUEUES)
# Keyed tasks are rare in keyed_a and keyed_b, so that their claimers often find none and
# take the plain path while a keyed claim runs in the same queue.
KEYED_SHARE = {"limited": 0.35, "keyed_a": 0.12, "keyed_b": 0.12}
FINAL = ("completed", "failed", "cancelled")
ROUNDS = 25
CLAIMERS, FINISHERS, CANCELLERS, ENQUEUERS = 6, 3, 2, 4
BATCHES = 8  # per enqueuer and round
RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)

AUDIT_SQL = f"""
create table race_audit (
    id         bigint generated always as identity primary key,
    xid        bigint not null,
    task_id    bigint not null,
    old_status text not null,
    new_status text not null,
    old_token  bigint,
    new_token  bigint
);
create table race_marks (xid bigint primary key default txid_current());
create table race_commits (
    seq           bigint generated always as identity primary key,
    xid           bigint not null unique,
    queue_running jsonb not null,
    key_running   jsonb not null
);
create function race_audit_row() returns trigger language plpgsql as $$
begin
    if new.status is distinct from old.status
       or new.claim_token is distinct from old.claim_token then
        insert into public.race_audit (xid, task_id, old_status, new_status, old_token, new_token)
        values (txid_current(), new.id, old.status, new.status, old.claim_token,
                new.claim_token);
    end if;
    return null;
end;
$$;
create trigger race_audit_row after update on durable.tasks
    for each row execute function race_audit_row();
create function race_audit_commit() returns trigger language plpgsql as $$
begin
    if current_setting('race.recorded', true) = 'on' then
        return null;
    end if;
    perform set_config('race.recorded', 'on', true);
    perform pg_advisory_xact_lock({AUDIT_LOCK});
    -- A new statement, so a new snapshot: every commit ordered before this one is seen.
    insert into public.race_commits (xid, queue_running, key_running)
    select txid_current(),
           coalesce((select jsonb_object_agg(r.queue, r.n)
                       from (select queue, count(*) as n from durable.tasks
                              where status = 'running' group by queue) r), '{{}}'),
           coalesce((select jsonb_object_agg(r.concurrency_key, r.n)
                       from (select concurrency_key, count(*) as n from durable.tasks
                              where status = 'running' and concurrency_key is not null
                              group by concurrency_key) r), '{{}}');
    return null;
end;
$$;
create constraint trigger race_audit_commit after insert or update on durable.tasks
    deferrable initially deferred
    for each row execute function race_audit_commit();
create constraint trigger race_marks_commit after insert on race_marks
    deferrable initially deferred
    for each row execute function race_audit_commit();
"""


@dataclass
class Round:
    rng: random.Random
    held: list[tuple[int, int]] = field(default_factory=list)  # (task, token) claimed
    acks: list[tuple[int, list[int]]] = field(default_factory=list)  # (xid, tasks) of cancels
    ids: list[int] = field(default_factory=list)  # tasks committed this round
    enqueuing: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def pause(rng: random.Random) -> None:
    # Pacing of the workload (no synchronisation depends on it).
    await asyncio.sleep(rng.random() * 0.004)


async def claimer(conn: asyncpg.Connection, r: Round, seed: int) -> None:
    rng = random.Random(seed)
    worker = uuid.UUID(int=seed)
    while not r.stop.is_set():
        queue = rng.choice(QUEUES)
        n = rng.randint(1, 3)
        try:
            if rng.random() < 0.3:
                async with conn.transaction():
                    rows = await conn.fetch(Q["claim"], queue, ["race"], n, 60.0, worker)
                    await conn.execute("select 1")
            else:
                rows = await conn.fetch(Q["claim"], queue, ["race"], n, 60.0, worker)
        except RETRYABLE:
            continue
        r.held.extend((row["id"], row["claim_token"]) for row in rows)
        if not rows:
            await pause(rng)


async def finisher(conn: asyncpg.Connection, r: Round, seed: int) -> None:
    rng = random.Random(seed)
    while not r.stop.is_set():
        if not r.held:
            await pause(rng)
            continue
        rng.shuffle(r.held)
        batch = [r.held.pop() for _ in range(min(len(r.held), rng.randint(1, 3)))]
        ids, tokens = [b[0] for b in batch], [b[1] for b in batch]
        try:
            if rng.random() < 0.85:
                await conn.fetch(Q["complete"], ids, tokens, ['"ok"'] * len(ids))
            else:
                await conn.fetch(Q["release"], ids, tokens)
        except RETRYABLE:
            r.held.extend(batch)


async def canceller(conn: asyncpg.Connection, r: Round, seed: int) -> None:
    rng = random.Random(seed)
    while not r.stop.is_set():
        await pause(rng)
        if rng.random() < 0.7 and r.held:
            target = rng.choice(r.held)[0]  # running, or about to finish
        elif r.ids:
            target = rng.choice(r.ids)
        else:
            continue
        try:
            async with conn.transaction():
                # The tasks it cancelled at once or asked to stop (not any it reports as
                # already finished).
                hit = [
                    row["id"]
                    for row in await conn.fetch(Q["cancel"], [target])
                    if not row["already_finished"]
                ]
                xid: int = await conn.fetchval(
                    "insert into race_marks default values returning xid"
                )
        except RETRYABLE:
            continue
        if hit:
            r.acks.append((xid, hit))
        await asyncio.sleep(rng.random() * 0.01)  # one cancel in a few dozen writes


class Rollback(Exception):
    pass


async def enqueuer(conn: asyncpg.Connection, r: Round, seed: int) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(BATCHES):
            added: list[int] = []
            try:
                async with conn.transaction():
                    for _ in range(rng.randint(1, 5)):
                        queue = rng.choice(QUEUES)
                        key = None
                        if rng.random() < KEYED_SHARE.get(queue, 0.0):
                            key = rng.choice(list(KEY_LIMITS))
                        added.append(
                            await conn.fetchval(
                                "select durable.start('race', queue => $1,"
                                " concurrency_key => $2, key_limit => $3)",
                                queue,
                                key,
                                KEY_LIMITS.get(key or ""),
                            )
                        )
                        await pause(rng)
                    if rng.random() < 0.2:
                        raise Rollback
            except Rollback:
                continue
            except RETRYABLE:
                continue
            r.ids.extend(added)
    finally:
        r.enqueuing -= 1


async def violations(conn: asyncpg.Connection, acks: list[tuple[int, list[int]]]) -> list[str]:
    """Every breach of the invariants in the module docstring, in the audit so far."""
    found: list[str] = []
    seq = {row["xid"]: row["seq"] for row in await conn.fetch("select xid, seq from race_commits")}
    audit = await conn.fetch("select * from race_audit order by id")
    for a in audit:
        claims = a["new_status"] == "running" and a["new_token"] != a["old_token"]
        if claims and a["old_status"] == "running":
            found.append(
                f"two live claims: task {a['task_id']} claimed again while running (token"
                f" {a['old_token']} -> {a['new_token']}, xid {a['xid']})"
            )
        elif claims and a["old_status"] != "queued":
            found.append(
                f"claim of a {a['old_status']} task: task {a['task_id']} (token"
                f" -> {a['new_token']}, xid {a['xid']})"
            )
    for c in await conn.fetch("select * from race_commits order by seq"):
        for queue, limit in QUEUE_LIMITS.items():
            n = _counts(c["queue_running"]).get(queue, 0)
            if n > limit:
                found.append(f"queue limit: {n} running in {queue} (limit {limit}), seq {c['seq']}")
        for key, n in _counts(c["key_running"]).items():
            if n > KEY_LIMITS[key]:
                found.append(
                    f"key limit: {n} running with key {key} (key_limit"
                    f" {KEY_LIMITS[key]}), seq {c['seq']}"
                )
    by_task: defaultdict[int, list[asyncpg.Record]] = defaultdict(list)
    for a in audit:
        by_task[a["task_id"]].append(a)
    status: dict[int, str] = {
        row["id"]: row["status"] for row in await conn.fetch("select id, status from durable.tasks")
    }
    for xid, hit in acks:
        if xid not in seq:
            found.append(f"lost cancel: the cancel of {hit} (xid {xid}) left no commit record")
            continue
        for task in hit:
            later = [
                a for a in by_task[task] if seq[a["xid"]] > seq[xid] and a["new_status"] in FINAL
            ]
            ends = sorted({a["new_status"] for a in later} - {"cancelled"})
            if ends or status[task] != "cancelled":
                found.append(
                    f"lost cancel: task {task}, cancel acknowledged at seq {seq[xid]},"
                    f" ended {ends or status[task]}"
                )
    return found


def _counts(value: Any) -> dict[str, int]:
    return dict(json.loads(value)) if isinstance(value, str) else dict(value)


async def run_round(conns: list[asyncpg.Connection], probe: asyncpg.Connection, r: Round) -> None:
    actors = (
        [claimer] * CLAIMERS
        + [finisher] * FINISHERS
        + [canceller] * CANCELLERS
        + [enqueuer] * ENQUEUERS
    )
    r.enqueuing = ENQUEUERS
    seeds = [r.rng.randrange(1, 2**31) for _ in actors]
    jobs = [
        asyncio.ensure_future(act(c, r, s)) for act, c, s in zip(actors, conns, seeds, strict=True)
    ]

    async def settled() -> bool:
        for job in jobs:
            if job.done() and job.exception() is not None:
                return True  # surfaced by the gather below
        if r.enqueuing or r.held:
            return False
        left: int = await probe.fetchval(
            "select count(*) from durable.tasks where status in ('queued', 'running')"
        )
        return left == 0

    try:
        await wait_for(settled, timeout=30, interval=0.02)
    finally:
        r.stop.set()
        await asyncio.gather(*jobs)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_claims_cancels_completions_and_enqueues_at_once_keep_every_guarantee(
    dsn: str,
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    conns = [
        await asyncpg.connect(dsn) for _ in range(CLAIMERS + FINISHERS + CANCELLERS + ENQUEUERS + 1)
    ]
    probe = conns.pop()
    try:
        await probe.execute(AUDIT_SQL)
        for queue, limit in QUEUE_LIMITS.items():
            await probe.execute(
                "insert into durable.queues (name, concurrency) values ($1, $2)", queue, limit
            )
        acks: list[tuple[int, list[int]]] = []
        started = time.monotonic()
        for number in range(ROUNDS):
            r = Round(random.Random(rng.randrange(2**32)))
            await run_round(conns, probe, r)
            acks.extend(r.acks)
            found = await violations(probe, acks)
            kinds = Counter(v.split(":")[0] for v in found)
            assert not found, (
                f"round {number + 1} of {ROUNDS} (seed {seed}, {time.monotonic() - started:.1f} s):"
                f" {dict(kinds)}\n" + "\n".join(found[:20])
            )
        claims = await probe.fetchval(
            "select count(*) from race_audit where new_status = 'running'"
        )
        cancelled = await probe.fetchval(
            "select count(*) from durable.tasks where status = 'cancelled'"
        )
        # The load did what it is for: many claims, and cancels among them.
        assert claims > 200 and cancelled > 10, (claims, cancelled)
    finally:
        for c in [*conns, probe]:
            await c.close()

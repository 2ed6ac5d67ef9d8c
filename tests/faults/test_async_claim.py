"""Claims commit asynchronously and that loses nothing: the setting stays inside the claim's
own transaction, tokens never follow a sequence, work made durable under a claim makes
the claim durable too, and a claim lost in a server crash only means the task runs again.

The crash tests stop their own embedded server with `immediate` (every backend dies at
once, nothing is flushed) and start it again.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

import asyncpg
import pytest

from durable.embedded import EmbeddedServer
from durable.models import Checkpoint
from durable.store import Store

NAMES = ["ac_task"]


async def _enqueue(dsn: str, n: int, kind: str = "task") -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "insert into durable.tasks (queue, name, kind) select 'ac', 'ac_task', $2"
            " from generate_series(1, $1) returning id",
            n,
            kind,
        )
        return [r["id"] for r in rows]
    finally:
        await conn.close()


async def _row(dsn: str, task_id: int) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "select status, claim_token, attempt from durable.tasks where id = $1", task_id
        )
        assert row is not None
        return row
    finally:
        await conn.close()


async def test_a_claim_commits_asynchronously_and_only_its_own_transaction(dsn: str) -> None:
    await _enqueue(dsn, 2)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("show synchronous_commit") == "on"
        async with conn.transaction():
            claimed = await conn.fetch(
                "select * from durable.claim('ac', $1::text[], 1, 30, $2)", NAMES, uuid.uuid4()
            )
            assert len(claimed) == 1
            assert await conn.fetchval("show synchronous_commit") == "off"
        # The next transaction on the same connection (a completion, a checkpoint) waits
        # for its WAL again.
        assert await conn.fetchval("show synchronous_commit") == "on"
        await conn.fetch(
            "select * from durable.claim('ac', $1::text[], 1, 30, $2)", NAMES, uuid.uuid4()
        )
        assert await conn.fetchval("show synchronous_commit") == "on"
    finally:
        await conn.close()


async def test_claim_tokens_are_random_not_a_sequence(dsn: str) -> None:
    await _enqueue(dsn, 500)
    store = await Store.open(dsn)
    try:
        claimed = await store.claim("ac", NAMES, 500, 30, uuid.uuid4())
    finally:
        await store.close()
    tokens = [c.token for c in claimed]
    assert len(claimed) == 500 and len(set(tokens)) == 500
    # A sequence would hand out neighbours; 62 random bits almost never come within a
    # million of each other.
    ordered = sorted(tokens)
    assert min(b - a for a, b in itertools.pairwise(ordered)) > 1_000_000
    assert all(0 <= t < 2**63 for t in tokens)


def _url(server: EmbeddedServer) -> str:
    url = server.url()
    assert url is not None
    return url


async def _restart(server: EmbeddedServer) -> str:
    return await asyncio.to_thread(server.restart, "immediate")


@pytest.mark.timeout(120)
async def test_a_checkpoint_that_committed_makes_its_claim_durable(
    restartable_server: EmbeddedServer,
) -> None:
    url = _url(restartable_server)
    (task_id,) = await _enqueue(url, 1, kind="workflow")
    store = await Store.open(url)
    try:
        (claim,) = await store.claim("ac", NAMES, 1, 300, uuid.uuid4())
        cp = Checkpoint(
            claim.id, claim.token, claim.branch, 0, "step", "first", "d" * 32, "completed",
            "1", None, claim.attempt, time.time(),
        )
        assert await store.checkpoint_many([cp]) == set()  # none refused
    finally:
        store.terminate()
    # Every backend dies at once: the asynchronous claim's WAL reached disk only because
    # the checkpoint's synchronous commit flushed everything before it.
    url = await _restart(restartable_server)
    row = await _row(url, task_id)
    assert row["status"] == "running" and row["claim_token"] == claim.token
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval(
            "select count(*) from durable.events where task_id = $1", task_id
        ) == 1
    finally:
        await conn.close()


@pytest.mark.timeout(120)
async def test_a_claim_lost_in_a_crash_leaves_the_task_to_run_again(
    restartable_server: EmbeddedServer,
) -> None:
    url = _url(restartable_server)
    task_ids = await _enqueue(url, 20)
    store = await Store.open(url)
    try:
        claimed = await store.claim("ac", NAMES, 20, 300, uuid.uuid4())
        assert len(claimed) == 20
    finally:
        store.terminate()
    url = await _restart(restartable_server)
    # Each claim either reached disk before the crash (still running, same token) or was
    # lost with the crash (queued, attempt unspent); nothing in between.
    for c in claimed:
        row = await _row(url, c.id)
        assert (row["status"], row["claim_token"]) in {("running", c.token), ("queued", None)}
        assert row["attempt"] == 1
    # The daemon that held the lost claims writes its completions late: only the claims
    # that survived are accepted.
    store = await Store.open(url)
    try:
        survived = {c.id for c in claimed if (await _row(url, c.id))["status"] == "running"}
        accepted = await store.complete_many([(c.id, c.token, "null") for c in claimed])
        assert set(accepted) == survived
        # The rest run again under fresh claims, with new tokens.
        again = await store.claim("ac", NAMES, 20, 300, uuid.uuid4())
        assert {c.id for c in again} == set(task_ids) - survived
        old = {c.id: c.token for c in claimed}
        assert all(c.token != old[c.id] for c in again)
        done = await store.complete_many([(c.id, c.token, "null") for c in again])
        assert done == {c.id: False for c in again}
    finally:
        await store.close()
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval(
            "select count(*) from durable.tasks where status = 'completed'"
        ) == 20
    finally:
        await conn.close()

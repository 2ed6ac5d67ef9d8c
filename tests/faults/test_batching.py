"""Batching loses nothing: a crash re-runs at most the unacknowledged batch, and a
checkpoint batch that fails to commit reports none of its steps durable."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import asyncpg
import pytest

import durable
from durable.models import Checkpoint
from durable.store import Store
from tests.apps import flow_app
from tests.support.helpers import execute, fetchval, kill, spawn_daemon, wait_for

CONCURRENCY = 16


@pytest.mark.timeout(120)
async def test_kill_between_running_and_acknowledging_reruns_at_most_a_batch(
    dsn: str, tmp_path: Path
) -> None:
    await execute(dsn, "create table batch_runs (i int not null)")
    n = 3000
    async with durable.connect(dsn) as client:
        await client.start_many(flow_app.batch_noop, [[i] for i in range(n)])
    env = {"DURABLE_QUEUES": f"batch_q={CONCURRENCY}", "DURABLE_LEASE": "2"}
    first = spawn_daemon(dsn, "tests.apps.flow_app", log=tmp_path / "first.log", **env)
    try:
        await wait_for(lambda: fetchval(dsn, "select count(*) >= 600 from batch_runs"), timeout=60)
    finally:
        kill(first, signal.SIGKILL)
        first.wait(timeout=30)
    second = spawn_daemon(dsn, "tests.apps.flow_app", log=tmp_path / "second.log", **env)
    try:
        await wait_for(
            lambda: fetchval(
                dsn,
                "select count(*) = $1 from durable.tasks where queue = 'batch_q'"
                " and status = 'completed'",
                n,
            ),
            timeout=90,
        )
    finally:
        second.terminate()
        second.wait(timeout=30)
    conn = await asyncpg.connect(dsn)
    try:
        missing = await conn.fetchval(
            "select count(*) from generate_series(0, $1 - 1) g"
            " where not exists (select 1 from batch_runs r where r.i = g)",
            n,
        )
        twice = await conn.fetchval(
            "select count(*) from (select i from batch_runs group by i having count(*) > 1) d"
        )
        most = await conn.fetchval(
            "select max(c) from (select count(*) c from batch_runs group by i) d"
        )
    finally:
        await conn.close()
    assert missing == 0, "a task never ran"
    assert most <= 2
    # Unacknowledged at the kill: the running tasks plus finished ones whose completion
    # rides on the next claim — never more than twice the slots.
    assert twice <= 2 * CONCURRENCY, f"{twice} tasks ran twice"


async def test_a_checkpoint_batch_that_fails_reports_none_of_its_steps(dsn: str) -> None:
    store = await Store.open(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        ids = [
            await conn.fetchval(
                "insert into durable.tasks (queue, name, kind, status, claim_token, lease_until)"
                " values ('q', 'wf', 'workflow', 'running', $1, now() + interval '1 hour')"
                " returning id",
                token,
            )
            for token in (11, 12)
        ]
        # A trigger that rejects one event makes the whole statement fail.
        await conn.execute(
            """
            create function reject_poison() returns trigger language plpgsql as $$
            begin
                if new.name = 'poison' then raise exception 'poisoned checkpoint'; end if;
                return new;
            end $$;
            create trigger poison before insert on durable.events
                for each row execute function reject_poison();
            """
        )
        now = time.time()
        batch = [
            Checkpoint(
                task_id=ids[0],
                token=11,
                branch=0,
                seq=0,
                kind="step",
                name="fine",
                digest="d",
                status="completed",
                result="1",
                error=None,
                attempt=1,
                started_at=now,
            ),
            Checkpoint(
                task_id=ids[1],
                token=12,
                branch=0,
                seq=0,
                kind="step",
                name="poison",
                digest="d",
                status="completed",
                result="2",
                error=None,
                attempt=1,
                started_at=now,
            ),
        ]
        with pytest.raises(asyncpg.RaiseError, match="poisoned checkpoint"):
            await store.checkpoint_many(batch)
        assert await conn.fetchval("select count(*) from durable.events") == 0
        # Without the poisoned one, the same good checkpoint commits.
        assert await store.checkpoint_many(batch[:1]) == set()  # none refused
    finally:
        await conn.close()
        await store.close()


async def test_a_checkpoint_whose_position_is_taken_is_left_out_and_the_rest_commit(
    dsn: str,
) -> None:
    store = await Store.open(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        task_id = await conn.fetchval(
            "insert into durable.tasks (queue, name, kind, status, claim_token, lease_until)"
            " values ('q', 'wf', 'workflow', 'running', 21, now() + interval '1 hour')"
            " returning id"
        )
        now = time.time()

        def at(seq: int, result: str) -> Checkpoint:
            return Checkpoint(task_id, 21, 0, seq, "step", "s", "d", "completed", result, None,
                              1, now)

        assert await store.checkpoint_many([at(0, "1")]) == set()  # none refused
        # Position 0 is taken: that row is left out, not an error, and the batch commits.
        assert await store.checkpoint_many([at(0, "2"), at(1, "3")]) == {(task_id, 0)}
        rows = await conn.fetch(
            "select seq, result::text from durable.events where task_id = $1 order by seq",
            task_id,
        )
        assert [tuple(r) for r in rows] == [(0, "1"), (1, "3")]
    finally:
        await conn.close()
        await store.close()

"""Replay against the event log: non-determinism, retry / replay / fork, transactions,
and memoised values."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import asyncpg
import pytest

import durable
from durable.models import Checkpoint
from durable.store import Store
from tests.support.helpers import execute, fetchval, running_daemon, wait_status

# workflow_cache=0 below: every resume replays the log (no suspended workflow kept in
# memory), for these tests change the code between attempts in one process and hold the
# replay to the log.

RUNS: Counter[str] = Counter()
"""How many times each step or child body ran, by a key unique to the test."""
FAIL: set[str] = set()
"""Keys whose step or child raises."""


def count(key: str) -> int:
    RUNS[key] += 1
    return RUNS[key]


def key() -> str:
    return uuid.uuid4().hex[:12]


# -- non-determinism -------------------------------------------------------------------

CODE: dict[str, int] = {}
"""The code version each variant of wf_nd_changes runs: the test "deploys" version 2."""


@durable.workflow(max_attempts=3)
async def wf_nd_changes(ctx: durable.Context, variant: str) -> str:
    v2 = CODE.get(variant, 1) == 2
    await ctx.step("a2" if v2 and variant == "rename" else "a", count, f"nd-{variant}-a")
    if v2 and variant == "insert":
        await ctx.step("x", count, f"nd-{variant}-x")
    if not (v2 and variant == "remove_middle"):
        arg = f"nd-{variant}-b2" if v2 and variant == "args" else f"nd-{variant}-b"
        await ctx.step("b", count, arg)
    if v2 and variant == "remove_tail":
        return "done"
    await ctx.wait_for_event("go")
    return "done"


NON_DETERMINISM = [
    # variant, position, what the log holds, what the code asked for
    ("rename", 0, "holds step 'a'", "asked for step 'a2'"),
    ("args", 1, "holds step 'b'", "asked for step 'b'"),
    ("insert", 1, "holds step 'b'", "asked for step 'x'"),
    ("remove_middle", 1, "holds step 'b'", "asked for event 'go'"),
    ("remove_tail", 2, "returned after 2 durable calls", "position 2 holds event 'go'"),
]


@pytest.mark.parametrize(("variant", "position", "held", "asked"), NON_DETERMINISM)
async def test_code_changed_while_suspended_fails_naming_the_position(
    dsn: str, variant: str, position: int, held: str, asked: str
) -> None:
    CODE[variant] = 1
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_nd_changes, variant)
        await wait_status(dsn, handle.id, "waiting")
        CODE[variant] = 2  # a deploy while the workflow waits
        assert await client.send_event(handle.id, "go")
        with pytest.raises(durable.TaskFailed) as caught:
            await handle.result(timeout=20)
        info = await client.get(handle.id)
    assert "NonDeterminismError" in caught.value.type
    assert f"position {position}" in caught.value.message
    assert held in caught.value.message and asked in caught.value.message
    # It fails the task at once: no retry of code that cannot match its log.
    assert info.status == "failed" and info.attempt == 1
    assert info.error is not None and "NonDeterminismError" in str(info.error["type"])


async def test_unchanged_code_resumes_after_the_same_suspension(dsn: str) -> None:
    CODE["same"] = 1
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_nd_changes, "same")
        await wait_status(dsn, handle.id, "waiting")
        assert await client.send_event(handle.id, "go")
        assert await handle.result(timeout=20) == "done"
    assert RUNS["nd-same-a"] == 1 and RUNS["nd-same-b"] == 1


@durable.workflow(max_attempts=3, retry=durable.RetryPolicy(base=0, jitter=0))
async def wf_nd_deploy_between_attempts(ctx: durable.Context, k: str) -> str:
    if CODE.get(k, 1) == 1:
        await ctx.step("reserve", count, f"{k}-reserve")
        CODE[k] = 2  # the code is replaced before attempt 2 runs
        raise RuntimeError("attempt 1 crashes")
    await ctx.step("reserve_stock", count, f"{k}-reserve")
    return "unreachable"


async def test_code_changed_between_attempts_fails_at_the_changed_position(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_nd_deploy_between_attempts, k)
        with pytest.raises(durable.TaskFailed) as caught:
            await handle.result(timeout=20)
        info = await client.get(handle.id)
    assert "NonDeterminismError" in caught.value.type
    assert "position 0" in caught.value.message and "'reserve_stock'" in caught.value.message
    assert info.status == "failed" and info.attempt == 2
    assert RUNS[f"{k}-reserve"] == 1


# -- retry, replay, fork ------------------------------------------------------------------


def maybe_fail(k: str) -> int:
    n = count(k)
    if k in FAIL:
        raise ValueError(f"{k} failed on run {n}")
    return n


@durable.workflow(max_attempts=1)
async def wf_rrf_four_steps(ctx: durable.Context, k: str) -> list[int]:
    out = [await ctx.step(f"s{i}", count, f"{k}:s{i}") for i in range(3)]
    out.append(await ctx.step("s3", maybe_fail, f"{k}:s3"))
    return out


def step_runs(k: str) -> list[int]:
    return [RUNS[f"{k}:s{i}"] for i in range(4)]


async def test_retry_keeps_history_and_reruns_only_the_failed_step(dsn: str) -> None:
    k = key()
    FAIL.add(f"{k}:s3")
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_rrf_four_steps, k)
        with pytest.raises(durable.TaskFailed) as caught:
            await handle.result(timeout=20)
        assert caught.value.type == "builtins.ValueError"
        assert step_runs(k) == [1, 1, 1, 1]
        before = await client.history(handle.id)
        assert [e.status for e in before] == ["completed"] * 3 + ["failed"]

        FAIL.discard(f"{k}:s3")
        assert await client.retry(handle.id) == 0
        assert await handle.result(timeout=20) == [1, 1, 1, 2]
        assert step_runs(k) == [1, 1, 1, 2]
        after = await client.history(handle.id)
        assert after[:3] == before[:3]  # the finished steps' events are untouched
        assert [(e.seq, e.status, e.attempt) for e in after[3:]] == [(3, "completed", 2)]
        assert await client.branches(handle.id) == [0]


async def test_replay_reruns_every_step_on_a_new_branch(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_rrf_four_steps, k)
        assert await handle.result(timeout=20) == [1, 1, 1, 1]
        old = await client.history(handle.id)

        assert await client.replay(handle.id) == 1
        assert await handle.result(timeout=20) == [2, 2, 2, 2]
        assert step_runs(k) == [2, 2, 2, 2]
        assert (await client.get(handle.id)).branch == 1
        assert await client.branches(handle.id) == [0, 1]
        assert await client.history(handle.id, branch=0) == old
        assert [e.result for e in await client.history(handle.id, branch=1)] == [2, 2, 2, 2]
        assert [e.result for e in await client.history(handle.id)] == [2, 2, 2, 2]


async def test_fork_at_n_keeps_the_first_n_events_and_reruns_the_rest(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_rrf_four_steps, k)
        assert await handle.result(timeout=20) == [1, 1, 1, 1]
        old = await client.history(handle.id)

        assert await client.fork(handle.id, at=2) == 1
        assert await handle.result(timeout=20) == [1, 1, 2, 2]
        assert step_runs(k) == [1, 1, 2, 2]  # positions 0 and 1 were not run again
        new = await client.history(handle.id, branch=1)
        assert [(e.seq, e.result) for e in new] == [(0, 1), (1, 1), (2, 2), (3, 2)]
        assert [(e.started_at, e.attempt) for e in new[:2]] == [
            (e.started_at, e.attempt) for e in old[:2]
        ]
        assert await client.history(handle.id, branch=0) == old

        # Forking the new branch at 3 re-runs position 3 only, on branch 2.
        assert await client.fork(handle.id, at=3) == 2
        assert await handle.result(timeout=20) == [1, 1, 2, 3]
        assert step_runs(k) == [1, 1, 2, 3]
        assert await client.branches(handle.id) == [0, 1, 2]
        assert await client.history(handle.id, branch=1) == new


@durable.task(max_attempts=1)
async def wf_rrf_child(k: str, part: str) -> str:
    n = count(f"{k}:{part}")
    if f"{k}:{part}" in FAIL:
        raise ValueError(f"child {part} failed")
    return f"{part}{n}"


@durable.workflow(max_attempts=1)
async def wf_rrf_parent(ctx: durable.Context, k: str) -> list[str]:
    a, b = await ctx.gather(ctx.run(wf_rrf_child, k, "a"), ctx.run(wf_rrf_child, k, "b"))
    c = await ctx.run(wf_rrf_child, k, "c")
    return [a, b, c]


async def test_retry_reruns_a_failed_child_as_a_new_child_keeping_the_others(dsn: str) -> None:
    k = key()
    FAIL.add(f"{k}:b")
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_rrf_parent, k)
        with pytest.raises(durable.TaskFailed) as caught:
            await handle.result(timeout=20)
        assert "child b failed" in caught.value.message
        first = await client.history(handle.id)
        assert [e.child_status for e in first] == ["completed", "failed"]
        failed_child = first[1].child_id
        assert failed_child is not None

        FAIL.discard(f"{k}:b")
        await client.retry(handle.id)
        assert await handle.result(timeout=20) == ["a1", "b2", "c1"]
        after = await client.history(handle.id)
        assert after[0] == first[0]  # child a: the same child, not run again
        assert after[1].child_id != failed_child and after[1].child_status == "completed"
        assert [RUNS[f"{k}:{p}"] for p in "abc"] == [1, 2, 1]
        assert (await client.get(failed_child)).status == "failed"  # the old child is kept


# -- transactions ----------------------------------------------------------------------------

BUSINESS = "create table wf_orders (k text not null, label text not null)"


async def insert_order(conn: asyncpg.Connection, k: str, label: str) -> str:
    await conn.execute("insert into wf_orders (k, label) values ($1, $2)", k, label)
    return label


async def insert_then_fail(conn: asyncpg.Connection, k: str, label: str) -> str:
    await insert_order(conn, k, label)
    raise ValueError("out of stock")


@durable.workflow(max_attempts=1)
async def wf_tx_commit(ctx: durable.Context, k: str) -> str:
    try:
        await ctx.transaction("bad", insert_then_fail, k, "bad")
    except ValueError as exc:
        assert str(exc) == "out of stock"
    return str(await ctx.transaction("good", insert_order, k, "good"))


async def orders(dsn: str, k: str) -> Counter[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("select label from wf_orders where k = $1", k)
    finally:
        await conn.close()
    return Counter(r["label"] for r in rows)


async def test_transaction_commits_with_its_checkpoint_or_not_at_all(dsn: str) -> None:
    await execute(dsn, BUSINESS)
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_tx_commit, k)
        assert await handle.result(timeout=20) == "good"
        assert await orders(dsn, k) == Counter({"good": 1})
        history = await client.history(handle.id)
        assert [(e.kind, e.name, e.status) for e in history] == [
            ("transaction", "bad", "failed"),
            ("transaction", "good", "completed"),
        ]
        assert history[0].error is not None and history[0].error["message"] == "out of stock"

        # A retry replays the committed transaction instead of running it again.
        await client.retry(handle.id)
        assert await handle.result(timeout=20) == "good"
        assert await orders(dsn, k) == Counter({"good": 1})


ENTERED: dict[str, asyncio.Event] = {}
GATE: dict[str, asyncio.Event] = {}


async def gated_order(conn: asyncpg.Connection, k: str) -> str:
    await insert_order(conn, k, "gated")
    ENTERED[k].set()
    await GATE[k].wait()
    return "committed"


@durable.workflow(max_attempts=5)
async def wf_tx_zombie(ctx: durable.Context, k: str) -> str:
    return str(await ctx.transaction("gated", gated_order, k))


async def steal_claim(dsn: str, task_id: int) -> int:
    """Simulate another daemon reclaiming the task: a new token and an expired lease, so
    the reaper hands it on. Returns the old token."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            old = await conn.fetchval(
                "select claim_token from durable.tasks where id = $1 and status = 'running'"
                " for update",
                task_id,
            )
            await conn.execute(
                "update durable.tasks set claim_token = durable.new_token(),"
                " lease_until = now() - interval '1 second' where id = $1",
                task_id,
            )
    finally:
        await conn.close()
    assert old is not None
    return int(old)


async def test_a_zombie_transaction_is_rolled_back(dsn: str) -> None:
    await execute(dsn, BUSINESS)
    k = key()
    ENTERED[k], GATE[k] = asyncio.Event(), asyncio.Event()
    async with durable.connect(dsn) as client, running_daemon(dsn, lease="3", workflow_cache=0):
        handle = await client.start(wf_tx_zombie, k)
        await asyncio.wait_for(ENTERED[k].wait(), 20)
        await steal_claim(dsn, handle.id)
        GATE[k].set()  # the zombie goes on to commit: its fence must refuse
        assert await handle.result(timeout=20) == "committed"
        info = await client.get(handle.id)
        history = await client.history(handle.id)
    assert info.attempt == 2  # the reclaimed attempt wrote the checkpoint
    assert [(e.name, e.attempt) for e in history] == [("gated", 2)]
    assert await orders(dsn, k) == Counter({"gated": 1})


# -- a zombie's checkpoint --------------------------------------------------------------------


async def gated_step(k: str) -> int:
    n = count(k)
    ENTERED[k].set()
    await GATE[k].wait()
    return n


@durable.workflow(max_attempts=5)
async def wf_zombie_step(ctx: durable.Context, k: str) -> int:
    return int(await ctx.step("gated", gated_step, k))


def checkpoint(task_id: int, token: int, branch: int, seq: int) -> Checkpoint:
    return Checkpoint(
        task_id=task_id,
        token=token,
        branch=branch,
        seq=seq,
        kind="step",
        name="zombie",
        digest="0" * 32,
        status="completed",
        result="1",
        error=None,
        attempt=1,
        started_at=time.time(),
    )


async def test_a_zombie_checkpoint_is_rejected(dsn: str) -> None:
    k = key()
    ENTERED[k], GATE[k] = asyncio.Event(), asyncio.Event()
    store = await Store.open(dsn, max_size=2)
    try:
        async with durable.connect(dsn) as client, running_daemon(dsn, lease="3", workflow_cache=0):
            handle = await client.start(wf_zombie_step, k)
            await asyncio.wait_for(ENTERED[k].wait(), 20)
            token = int(
                await fetchval(
                    dsn, "select claim_token from durable.tasks where id = $1", handle.id
                )
            )
            # While the claim holds, a checkpoint with its token is accepted (on a spare
            # branch, so the run itself is undisturbed)...
            assert await store.checkpoint_many([checkpoint(handle.id, token, 9, 0)]) == set()
            old = await steal_claim(dsn, handle.id)
            assert old == token
            # ...and once the task is reclaimed, the old token's checkpoints are not.
            refused = await store.checkpoint_many([checkpoint(handle.id, old, 9, 1)])
            assert refused == {(handle.id, 1)}
            refused = await store.checkpoint_many([checkpoint(handle.id, old, 0, 0)])
            assert refused == {(handle.id, 0)}
            assert not await fetchval(
                dsn,
                "select exists (select 1 from durable.events where task_id = $1"
                " and branch = 9 and seq = 1)",
                handle.id,
            )
            GATE[k].set()  # the zombie's own checkpoint is refused and it abandons the run
            assert await handle.result(timeout=20) == 2
            history = await client.history(handle.id)
    finally:
        await store.close()
    # The step ran twice (at least once semantics); the log holds the new claim's result.
    assert RUNS[k] == 2
    assert [(e.seq, e.result, e.attempt) for e in history] == [(0, 2, 2)]


# -- memoised values --------------------------------------------------------------------------

OBSERVED: dict[str, list[list[Any]]] = {}


@durable.workflow(max_attempts=1)
async def wf_memo_values(ctx: durable.Context, k: str) -> dict[str, Any]:
    before = [(await ctx.now()).isoformat(), str(await ctx.uuid4()), await ctx.random()]
    OBSERVED.setdefault(k, []).append(before)
    await ctx.sleep(0.2)
    after = [(await ctx.now()).isoformat(), str(await ctx.uuid4()), await ctx.random()]
    return {"before": before, "after": after}


async def test_now_uuid4_and_random_return_their_recorded_values_on_replay(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_memo_values, k)
        first = await handle.result(timeout=20)
        # Run 1 recorded the values and slept; run 2 (after the timer) read them back.
        assert len(OBSERVED[k]) == 2
        assert OBSERVED[k][0] == OBSERVED[k][1] == first["before"]
        assert first["before"] != first["after"]
        await client.retry(handle.id)
        assert await handle.result(timeout=20) == first
        assert OBSERVED[k][2] == first["before"]
        await client.replay(handle.id)  # a new branch draws new values
        fresh = await handle.result(timeout=20)
        assert fresh["before"][1] != first["before"][1]  # another uuid
        assert fresh["before"][2] != first["before"][2]  # another random number
    assert await event_kinds(dsn, handle.id) == ["memo"] * 3 + ["sleep"] + ["memo"] * 3


async def event_kinds(dsn: str, task_id: int) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select kind from durable.events where task_id = $1 and branch = 0 order by seq",
            task_id,
        )
    finally:
        await conn.close()
    return [r["kind"] for r in rows]

"""A resumed workflow sees exactly what its first run saw: values (dict order, floats,
errors), the failures it handled, its children's outcomes; and what ends an attempt
(non-determinism, a lost lease, durable calls run at once) cannot be caught away."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from typing import Any

import asyncpg
import pytest

import durable
from durable.acks import Acks
from durable.context import Context
from durable.metrics import Metrics
from durable.models import Checkpoint
from durable.store import Store
from tests.support.helpers import fetchval, running_daemon, wait_status

# workflow_cache=0 below: every resume replays the log (no suspended workflow kept in
# memory), for these tests change the code between attempts in one process and hold the
# replay to the log.

RUNS: Counter[str] = Counter()
SEEN: dict[str, list[Any]] = {}
"""What each workflow saw, by key, on every run (first run and replays)."""


def key() -> str:
    return uuid.uuid4().hex[:12]


def count(k: str) -> int:
    RUNS[k] += 1
    return RUNS[k]


def ident(value: Any) -> Any:
    return value


def fails_first(k: str, times: int = 1) -> str:
    RUNS[k] += 1
    if RUNS[k] <= times:
        raise ConnectionError(f"{k}: attempt {RUNS[k]} refused")
    return "ok"


# -- values: dict order and floats ------------------------------------------------------


def prices() -> dict[str, Any]:
    return {"zucchini": 1.5, "fig": 1e16, "apple": -0.0, "kiwi": [1e20, {"b": 1, "a": 2}]}


@durable.workflow(max_attempts=1)
async def wf_prices(ctx: Context, k: str) -> list[str]:
    got = await ctx.step("prices", prices)
    seen = [f"{name}={value!r}:{type(value).__name__}" for name, value in got.items()]
    SEEN.setdefault(k, []).append(seen)
    for name, value in got.items():  # one durable call per key, in the dict's order
        await ctx.step(f"price-{name}", ident, [value, type(value).__name__])
    await ctx.wait_for_event("go")
    return seen


async def test_a_dict_and_its_floats_replay_as_the_first_run_saw_them(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_prices, k)
        await wait_status(dsn, handle.id, "waiting")
        assert await client.send_event(handle.id, "go")
        result = await handle.result(timeout=20)  # NonDeterminismError before
    first, replayed = SEEN[k]
    assert first == replayed == result
    assert first[0].endswith(":float") and "1e+16:float" in " ".join(first)


@durable.task()
async def echo(value: Any) -> Any:
    return [value, type(value).__name__]


async def test_a_float_argument_and_result_stay_floats(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(echo, 1e16)
        assert await handle.result(timeout=20) == [
            1e16,
            "float",
        ]  # [10000000000000000, "int"] before


# -- retry keeps the failures the workflow handled ------------------------------------------


@durable.workflow(max_attempts=3, retry=durable.RetryPolicy(base=0.01, jitter=0))
async def wf_handles_a_step(ctx: Context, k: str) -> str:
    try:
        await ctx.step("charge", fails_first, f"{k}-charge")
        branch = "charged"
    except ConnectionError:
        branch = await ctx.step("fallback", ident, "fallback")
    await ctx.step("late", fails_first, f"{k}-late")  # fails once: the attempt ends
    return branch


async def test_an_automatic_retry_keeps_a_step_failure_the_workflow_handled(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_handles_a_step, k)
        assert await handle.result(timeout=20) == "fallback"  # NonDeterminismError before
        history = await client.history(handle.id)
    assert RUNS[f"{k}-charge"] == 1 and RUNS[f"{k}-late"] == 2
    assert [(e.name, e.status) for e in history] == [
        ("charge", "failed"),
        ("fallback", "completed"),
        ("late", "completed"),
    ]


@durable.task(max_attempts=1)
async def child_fails_first(k: str) -> str:
    return fails_first(k)


@durable.workflow(max_attempts=1)
async def wf_handles_a_child(ctx: Context, k: str) -> str:
    try:
        await ctx.run(child_fails_first, f"{k}-child")
        branch = "child ok"
    except durable.TaskFailed:
        branch = await ctx.step("compensate", ident, "compensated")
    await ctx.step("late", fails_first, f"{k}-late")
    return branch


async def test_durable_retry_keeps_a_child_failure_the_workflow_handled(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_handles_a_child, k)
        with pytest.raises(durable.TaskFailed, match="late: attempt 1 refused"):
            await handle.result(timeout=20)
        await client.retry(handle.id)
        assert await handle.result(timeout=20) == "compensated"  # NonDeterminismError before
        children = await fetchval(
            dsn, "select count(*) from durable.tasks where parent_id = $1", handle.id
        )
    assert children == 1 and RUNS[f"{k}-child"] == 1


# -- errors come back the same ------------------------------------------------------------


class HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class KwError(Exception):
    def __init__(self, *, code: str) -> None:
        super().__init__(code)
        self.code = code


def raise_http() -> None:
    raise HttpError(503)


def raise_kw() -> None:
    raise KwError(code="E42")


@durable.workflow(max_attempts=1)
async def wf_errors(ctx: Context, k: str) -> list[Any]:
    seen: list[Any] = []
    try:
        await ctx.step("http", raise_http)
    except HttpError as exc:
        seen.append(exc.status)
    try:
        await ctx.step("kw", raise_kw)
    except KwError as exc:
        seen.append(exc.code)
    except Exception as exc:
        seen.append(type(exc).__name__)
    await ctx.step("seen", ident, seen)
    SEEN.setdefault(k, []).append(seen)
    await ctx.wait_for_event("go")
    return seen


async def test_a_step_error_replays_as_the_first_run_saw_it(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_errors, k)
        await wait_status(dsn, handle.id, "waiting")
        assert await client.send_event(handle.id, "go")
        assert await handle.result(timeout=20) == [503, "E42"]  # NonDeterminismError before
    assert SEEN[k] == [[503, "E42"], [503, "E42"]]


# -- a restarted child does not rewrite its parent's past -----------------------------------


@durable.task(max_attempts=1)
async def child_counts(k: str) -> int:
    return count(k)


@durable.workflow(max_attempts=1)
async def wf_uses_a_child(ctx: Context, k: str) -> int:
    n: int = await ctx.run(child_counts, k)
    await ctx.step("use", ident, n)
    await ctx.wait_for_event("go")
    return n


async def test_replaying_a_child_leaves_what_its_parent_saw(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_uses_a_child, k)
        await wait_status(dsn, handle.id, "waiting")
        child = await fetchval(dsn, "select id from durable.tasks where parent_id = $1", handle.id)
        await client.replay(child)  # the child now returns 2
        await wait_status(dsn, child, "completed", "failed")
        assert await client.send_event(handle.id, "go")
        assert await handle.result(timeout=20) == 1  # NonDeterminismError before
    assert RUNS[k] == 2


# -- what ends an attempt cannot be caught away ---------------------------------------------

CODE: dict[str, int] = {}
ENDED: dict[str, asyncio.Event] = {}


@durable.workflow(max_attempts=1)
async def wf_swallows(ctx: Context, k: str) -> str:
    name = "renamed" if CODE.get(k) == 2 else "original"
    with contextlib.suppress(Exception):  # `except Exception: pass`
        await ctx.step(name, ident, 1)
    await ctx.wait_for_event("go")
    return "done"


async def test_a_workflow_cannot_swallow_a_non_determinism_error(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_swallows, k)
        await wait_status(dsn, handle.id, "waiting")
        CODE[k] = 2  # a deploy renames the step
        assert await client.send_event(handle.id, "go")
        with pytest.raises(durable.TaskFailed) as caught:
            await handle.result(timeout=20)  # completed before
    assert "NonDeterminismError" in caught.value.type and "position 0" in caught.value.message


def steal_claim(dsn: str, task_id: int) -> Any:
    async def steal() -> None:
        await fetchval(
            dsn,
            "update durable.tasks set claim_token = claim_token + 1 where id = $1 returning id",
            task_id,
        )

    return steal


@durable.workflow(max_attempts=1)
async def wf_swallows_lease_lost(ctx: Context, k: str, dsn: str) -> str:
    try:
        with contextlib.suppress(Exception):
            await ctx.step("stolen", steal_claim(dsn, ctx.task_id))
        await ctx.step("after", count, f"{k}-after")  # ran although the claim was lost, before
        return "done"
    finally:
        ENDED[k].set()


async def test_a_workflow_cannot_swallow_a_lost_lease(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        ENDED[k] = asyncio.Event()
        await client.start(wf_swallows_lease_lost, k, dsn)
        await asyncio.wait_for(ENDED[k].wait(), 20)  # the attempt ends in this process
    assert RUNS[f"{k}-after"] == 0


async def chain(ctx: Context, name: str) -> None:
    for i in range(2):
        await ctx.step(f"{name}-{i}", asyncio.sleep, 0.01)


@durable.workflow(max_attempts=3, retry=durable.RetryPolicy(base=0.01, jitter=0))
async def wf_concurrent(ctx: Context) -> str:
    await asyncio.gather(chain(ctx, "a"), chain(ctx, "b"))
    return "done"


async def test_durable_calls_run_at_once_fail_the_first_run(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_concurrent)
        with pytest.raises(durable.TaskFailed) as caught:
            await handle.result(timeout=20)  # completed before (and failed at its first replay)
        info = await client.get(handle.id)
    assert "NonDeterminismError" in caught.value.type and "ctx.gather" in caught.value.message
    assert info.attempt == 1  # not retried: the code must change


# -- names Postgres refuses ---------------------------------------------------------------


BAD_NAMES = {"nul": "nul\x00name", "surrogate": "lone \udc80"}


@durable.workflow(max_attempts=3)
async def wf_bad_name(ctx: Context, which: str) -> str:
    await ctx.step(BAD_NAMES[which], ident, 1)
    return "done"


@pytest.mark.parametrize("which", sorted(BAD_NAMES))
async def test_a_step_name_postgres_refuses_fails_at_the_call(dsn: str, which: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_bad_name, which)
        with pytest.raises(durable.TaskFailed) as caught:
            await handle.result(timeout=20)
        info = await client.get(handle.id)
    assert caught.value.type == "durable.errors.PayloadError"
    assert "the name of step" in caught.value.message
    assert info.attempt == 1  # the code must change: no retry


async def test_one_refused_checkpoint_fails_only_its_own_row(dsn: str) -> None:
    """A batch the server refuses is written again row by row: the innocent rows commit."""
    ids = []
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(3):
            ids.append(
                await conn.fetchval(
                    "insert into durable.tasks (queue, name, kind, status, claim_token, lease_until)"
                    " values ('default', 'wf', 'workflow', 'running', 7, now() + interval '1 hour')"
                    " returning id"
                )
            )
    finally:
        await conn.close()
    store = await Store.open(dsn, min_size=1, max_size=2)
    try:
        now = await fetchval(dsn, "select now()")
        rows = [
            Checkpoint(t, 7, 0, 0, "step", name, "d", "completed", "1", None, 1, now.timestamp())
            for t, name in zip(ids, ["good", "bad\x00", "good too"], strict=True)
        ]
        results = await Acks(store, Metrics()).checkpoint(rows)
    finally:
        await store.close()
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], Exception)
    assert await fetchval(dsn, "select count(*) from durable.events") == 2


async def test_bulk_retry_leaves_a_child_whose_parent_recorded_its_failure(dsn: str) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_handles_a_child, k)
        with pytest.raises(durable.TaskFailed):
            await handle.result(timeout=20)  # the child failed, was handled; then "late" failed
        ids = await client.store.select_tasks(["failed"])
        retried = await client.store.retry_many(ids, ["failed"])
        assert retried == [handle.id]  # the child as well, before
        assert await handle.result(timeout=20) == "compensated"
    assert RUNS[f"{k}-child"] == 1


async def test_durable_retry_reruns_the_last_failed_step_of_an_error_stored_without_positions(
    dsn: str,
) -> None:
    k = key()
    async with durable.connect(dsn) as client, running_daemon(dsn, workflow_cache=0):
        handle = await client.start(wf_handles_a_child, k)
        with pytest.raises(durable.TaskFailed):
            await handle.result(timeout=20)
        # As an earlier version stored it: no `replay` positions (nor args and attributes).
        await fetchval(
            dsn,
            "update durable.tasks set error = error - 'replay' - 'args' - 'attrs'"
            " where id = $1 returning id",
            handle.id,
        )
        await client.retry(handle.id)
        assert await handle.result(timeout=20) == "compensated"
    assert RUNS[f"{k}-late"] == 2

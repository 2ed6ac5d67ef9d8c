"""Per-step policies: ctx.step / ctx.transaction with retry= and timeout=, retried inside
the same run, each try in the event log and in `durable show`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import durable
from durable.steps import INLINE_BACKOFF
from tests.support.helpers import durable_cli, fetchval, running_daemon, wait_status

calls: dict[str, int] = {}


def flaky(fails: int, key: str) -> str:
    calls[key] = calls.get(key, 0) + 1
    if calls[key] <= fails:
        raise ConnectionError(f"refused (call {calls[key]})")
    return "charged"


FAST = durable.RetryPolicy(max_attempts=4, base=0.01, jitter=0)


@durable.workflow(name="sp_flaky", max_attempts=1)
async def sp_flaky(ctx: durable.Context, fails: int) -> list[Any]:
    before = await ctx.step("before", lambda: calls.setdefault("before", 0) or "ok")
    charged = await ctx.step("charge", flaky, fails, "charge", retry=FAST)
    after = await ctx.step("after", lambda: "after")
    return [before, charged, after]


async def test_a_flaky_step_completes_in_one_attempt(dsn: str) -> None:
    calls.clear()
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sp_flaky, 3)
        assert await handle.result(timeout=30) == ["ok", "charged", "after"]
        info = await client.get(handle.id)
        history = await client.history(handle.id)
    assert info.attempt == 1  # one workflow attempt
    assert calls["charge"] == 4  # three failures, then the fourth try
    tries = [(e.name, e.status, (e.error or {}).get("try")) for e in history]
    assert tries == [
        ("before", "completed", None),
        ("charge", "failed", 1),
        ("charge", "failed", 2),
        ("charge", "failed", 3),
        ("charge", "completed", None),
        ("after", "completed", None),
    ]
    shown = durable_cli("show", str(handle.id), dsn=dsn)
    assert shown.returncode == 0, shown.stderr
    for n in (1, 2, 3):
        assert f"failed (try {n} of 4): builtins.ConnectionError" in shown.stdout
    assert "status     completed" in shown.stdout


async def test_a_step_out_of_tries_fails_the_attempt_and_the_next_runs_all_tries(dsn: str) -> None:
    calls.clear()

    @durable.workflow(name="sp_exhaust", max_attempts=2, retry=durable.RetryPolicy(base=0.01, jitter=0))
    async def sp_exhaust(ctx: durable.Context) -> str:
        return str(await ctx.step("charge", flaky, 5, "exhaust",
                                  retry=durable.RetryPolicy(max_attempts=3, base=0.0)))

    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sp_exhaust)
        assert await handle.result(timeout=30) == "charged"
        info = await client.get(handle.id)
        history = await client.history(handle.id)
    # Attempt 1: three failed tries. Attempt 2 dropped them and ran the step again:
    # tries 4 and 5 failed, the sixth call succeeded.
    assert info.attempt == 2
    assert calls["exhaust"] == 6
    assert [(e.status, e.attempt) for e in history] == [
        ("failed", 2), ("failed", 2), ("completed", 2),
    ]


async def test_non_retryable_stops_the_tries(dsn: str) -> None:
    calls.clear()

    def refuse() -> None:
        calls["refuse"] = calls.get("refuse", 0) + 1
        raise durable.NonRetryable("card declined")

    @durable.workflow(name="sp_refuse", max_attempts=1)
    async def sp_refuse(ctx: durable.Context) -> None:
        await ctx.step("charge", refuse, retry=FAST)

    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sp_refuse)
        with pytest.raises(durable.TaskFailed, match="card declined"):
            await handle.result(timeout=30)
    assert calls["refuse"] == 1


async def test_a_try_that_outlives_its_timeout_is_retried(dsn: str) -> None:
    calls.clear()

    async def slow_then_fast() -> str:
        calls["slow"] = calls.get("slow", 0) + 1
        if calls["slow"] == 1:
            await asyncio.Event().wait()  # hangs until the timeout cancels it
        return "fast"

    @durable.workflow(name="sp_timeout", max_attempts=1)
    async def sp_timeout(ctx: durable.Context) -> str:
        return str(await ctx.step("call", slow_then_fast, retry=FAST, timeout=0.2))

    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sp_timeout)
        assert await handle.result(timeout=30) == "fast"
        history = await client.history(handle.id)
    assert [e.status for e in history] == ["failed", "completed"]
    assert history[0].error is not None
    assert history[0].error["type"] == "builtins.TimeoutError"
    assert "timeout of 0.2s" in history[0].error["message"]


async def test_a_long_backoff_suspends_and_frees_the_slot(dsn: str) -> None:
    calls.clear()
    long = durable.RetryPolicy(max_attempts=2, base=INLINE_BACKOFF * 2, jitter=0)

    @durable.workflow(name="sp_long", max_attempts=1)
    async def sp_long(ctx: durable.Context) -> str:
        return str(await ctx.step("charge", flaky, 1, "long", retry=long))

    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sp_long)
        await wait_status(dsn, handle.id, "waiting")
        history = await client.history(handle.id)
        assert [(e.kind, e.name, e.status) for e in history] == [
            ("step", "charge", "failed"),
            ("sleep", "charge (backoff)", "completed"),
        ]
        # The slot is free (the task is waiting, not running). Bring the timer forward
        # rather than wait ten seconds: the wake-up path is the timer's, as for ctx.sleep.
        await fetchval(
            dsn,
            "update durable.events set wake_at = now() where task_id = $1 and kind = 'sleep'",
            handle.id,
        )
        await fetchval(
            dsn, "update durable.tasks set wake_at = now() where id = $1", handle.id
        )
        assert await handle.result(timeout=30) == "charged"
        history = await client.history(handle.id)
    assert [(e.kind, e.status) for e in history] == [
        ("step", "failed"), ("sleep", "completed"), ("step", "completed"),
    ]
    assert calls["long"] == 2


async def test_transaction_tries_roll_back(dsn: str) -> None:
    calls.clear()

    async def insert_then_fail(conn: Any, value: int) -> int:
        await conn.execute("insert into sp_rows values ($1)", value)
        calls["tx"] = calls.get("tx", 0) + 1
        if calls["tx"] < 3:
            raise RuntimeError("constraint of the business")
        return value

    @durable.workflow(name="sp_tx", max_attempts=1)
    async def sp_tx(ctx: durable.Context) -> int:
        return int(await ctx.transaction("write", insert_then_fail, 7, retry=FAST))

    await fetchval(dsn, "create table sp_rows (v int)")
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sp_tx)
        assert await handle.result(timeout=30) == 7
        history = await client.history(handle.id)
    assert [e.status for e in history] == ["failed", "failed", "completed"]
    assert await fetchval(dsn, "select count(*) from sp_rows") == 1  # the failed tries rolled back


async def test_bad_options_are_refused_where_given(dsn: str) -> None:
    with pytest.raises(ValueError, match="max_attempts must be a whole number from 1 to 1000"):
        durable.RetryPolicy(max_attempts=0)
    with pytest.raises(durable.ConfigurationError, match="counts a step's tries"):

        @durable.task(name="sp_bad", retry=durable.RetryPolicy(max_attempts=3))
        async def sp_bad() -> None: ...

    @durable.workflow(name="sp_badtimeout", max_attempts=1)
    async def sp_badtimeout(ctx: durable.Context) -> None:
        await ctx.step("x", lambda: 1, timeout=-1)

    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(sp_badtimeout)
        with pytest.raises(durable.TaskFailed, match="timeout must be a positive number"):
            await handle.result(timeout=30)

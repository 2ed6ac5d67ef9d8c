"""A deadline bounds a whole task or workflow: attempts, sleeps, event waits. When it
passes the task fails with DeadlineExceeded and its unfinished children are cancelled;
a workflow waiting when it passes is woken for it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

import durable
from durable.validation import InvalidValue
from tests.support.helpers import durable_cli, fetchval, running_daemon

calls: dict[str, int] = {}


@durable.task(name="dl_unserved", queue="dl_nobody")
async def dl_unserved() -> None: ...


@durable.workflow(name="dl_sleeper", max_attempts=1)
async def dl_sleeper(ctx: durable.Context) -> str:
    await ctx.spawn(dl_unserved)  # a child that nobody runs: still queued at the deadline
    await ctx.sleep(3600)
    return "woke"


@durable.workflow(name="dl_waiter", max_attempts=1, deadline=1.0)
async def dl_waiter(ctx: durable.Context) -> object:
    return await ctx.wait_for_event("never")  # no timeout of its own


def always_fails() -> None:
    calls["fails"] = calls.get("fails", 0) + 1
    raise ConnectionError("down")


@durable.workflow(
    name="dl_retrier", max_attempts=1000, deadline=1.5,
    retry=durable.RetryPolicy(base=0.1, factor=1, jitter=0),
)
async def dl_retrier(ctx: durable.Context) -> None:
    await ctx.step("call", always_fails)


@durable.task(name="dl_hang", max_attempts=3)
async def dl_hang() -> None:
    await asyncio.Event().wait()


async def test_a_deadline_that_passes_while_the_workflow_sleeps(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(dl_sleeper, deadline=1.0)
        with pytest.raises(durable.TaskFailed, match="DeadlineExceeded"):
            await handle.result(timeout=30)  # woken by the deadline, not the hour's sleep
    child = await fetchval(dsn, "select status from durable.tasks where parent_id = $1", handle.id)
    assert child == "cancelled"
    shown = durable_cli("show", str(handle.id), dsn=dsn)
    assert "deadline   " in shown.stdout and "durable.errors.DeadlineExceeded" in shown.stdout


async def test_a_deadline_that_passes_while_waiting_for_an_event(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(dl_waiter)  # the decorator's deadline, relative
        with pytest.raises(durable.TaskFailed, match="DeadlineExceeded"):
            await handle.result(timeout=30)
        info = await client.get(handle.id)
    assert info.deadline is not None and info.created_at < info.deadline


async def test_a_deadline_bounds_every_attempt_together(dsn: str) -> None:
    calls.clear()
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(dl_retrier)
        with pytest.raises(durable.TaskFailed, match="DeadlineExceeded"):
            await handle.result(timeout=30)
        info = await client.get(handle.id)
    # Many attempts, each failing on its own, and then the deadline ended them all.
    assert 2 <= info.attempt < 1000
    assert info.error is not None and info.error["type"] == "durable.errors.DeadlineExceeded"


async def test_a_running_task_past_its_deadline_is_not_retried(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(dl_hang, deadline=datetime.now(UTC) + timedelta(seconds=0.5))
        with pytest.raises(durable.TaskFailed, match="DeadlineExceeded"):
            await handle.result(timeout=30)
        assert (await client.get(handle.id)).attempt == 1
        past = await client.start(dl_hang, deadline=datetime.now(UTC) - timedelta(seconds=1))
        with pytest.raises(durable.TaskFailed, match="DeadlineExceeded"):
            await past.result(timeout=30)


async def test_a_queued_task_nobody_serves_fails_at_its_deadline(dsn: str) -> None:
    """No daemon serves its queue, so no claim ever comes: the timer loop of a daemon that
    serves other queues fails it at its deadline, with the message the runner writes."""
    async with durable.connect(dsn) as client, running_daemon(dsn) as daemon:
        soon = await client.start(dl_unserved, deadline=0.3)
        later = await client.start(dl_unserved, deadline=30)
        # A deadline on a whole second, which Python prints without a fraction.
        await fetchval(dsn, "update durable.tasks set deadline = date_trunc('second', now())"
                            " + interval '1 second' where id = $1", later.id)
        for handle in (soon, later):
            with pytest.raises(durable.TaskFailed, match="DeadlineExceeded"):
                await handle.result(timeout=30)
        infos = [await client.get(h.id) for h in (soon, later)]
    assert daemon.metrics.deadlines_expired == 2
    assert b"durable_deadlines_expired_total 2.0" in daemon.metrics.render()
    for info in infos:
        assert info.status == "failed" and info.started_at is None  # it never ran
        assert info.deadline is not None and info.finished_at is not None
        assert info.finished_at >= info.deadline
        assert info.error is not None
        assert info.error["type"] == "durable.errors.DeadlineExceeded"
        # The runner's own words, so the two paths read alike (whole seconds print bare).
        assert info.error["message"] == f"the deadline {info.deadline.isoformat()} passed"
    assert "." not in infos[1].error["message"]  # type: ignore[index]


@durable.task(name="dl_counted")
async def dl_counted() -> None:
    calls["counted"] = calls.get("counted", 0) + 1


async def test_claims_and_the_timer_loop_race_for_expired_tasks_and_each_ends_once(
    dsn: str,
) -> None:
    """Tasks whose deadline passed before any daemon ran: the claim (which fails them
    unrun) and the timer loop (which fails them where they wait) both reach for them. Each
    ends exactly once, failed with DeadlineExceeded, and none runs its code."""
    calls.clear()
    n = 300
    async with durable.connect(dsn) as client:
        handles = await client.start_many(dl_counted, [[] for _ in range(n)])
        await fetchval(dsn, "update durable.tasks set deadline = now() - interval '1 second'"
                            " where name = 'dl_counted'")
        async with running_daemon(dsn, queues="default=50") as daemon:
            for h in handles:
                with pytest.raises(durable.TaskFailed, match="DeadlineExceeded"):
                    await h.result(timeout=30)
        expired = daemon.metrics.deadlines_expired
        series = daemon.metrics.task("default", "dl_counted")
    assert calls == {}  # no task past its deadline ran
    assert await fetchval(
        dsn, "select count(*) from durable.tasks where name = 'dl_counted' and status = 'failed'"
             " and error ->> 'type' = 'durable.errors.DeadlineExceeded'") == n
    # Each failed once, by one path or the other.
    assert expired + series.failed == n, (expired, series.failed)


async def test_bad_deadlines_are_refused(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        for bad in ("soon", float("nan"), 1e12, True, datetime(2030, 1, 1)):
            with pytest.raises(InvalidValue, match="deadline"):
                await client.start(dl_hang, deadline=bad)  # type: ignore[arg-type]
    with pytest.raises(durable.ConfigurationError, match="deadline must be a positive number"):

        @durable.workflow(name="dl_bad", deadline=-1)
        async def dl_bad(ctx: durable.Context) -> None: ...

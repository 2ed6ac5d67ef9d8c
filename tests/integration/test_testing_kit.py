"""durable.testing through its public API: run_until_idle, the moved clock, fail_once,
kill/resume, and the fixture users enable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from durable.testing import Env, InjectedFault
from tests.apps import testkit_flows as flows
from tests.support.helpers import execute, fetchval


@pytest.fixture(autouse=True)
def fresh_calls() -> Iterator[None]:
    flows.calls.clear()
    yield


@pytest.fixture
async def env(durable_dsn: str) -> AsyncIterator[Env]:
    async with Env(durable_dsn, registry=flows.registry) as e:
        yield e


async def status(env: Env, handle: durable.Handle) -> str:
    return (await handle.get()).status


async def test_a_day_long_workflow_runs_on_the_moved_clock(env: Env) -> None:
    # Its duration is reported by `pytest --durations`: the day and the six hours pass in
    # two moves of the clock.
    handle = await env.start("day_long", "o-1")
    await env.run_until_idle()
    assert await status(env, handle) == "waiting"
    assert flows.calls == {"charge": 1}

    await env.advance(hours=23, minutes=59)  # not yet
    await env.run_until_idle()
    assert await status(env, handle) == "waiting"
    assert (await handle.get()).waiting_event is None  # still the sleep

    await env.advance(minutes=1)
    await env.run_until_idle()
    info = await handle.get()
    assert (info.status, info.waiting_event) == ("waiting", "approved")

    await env.advance(hours=6)  # the event's timeout
    await env.run_until_idle()
    result = await env.result(handle)
    assert result["approval"] is None
    assert 30 <= result["hours"] < 30.1  # ctx.now() saw the moved clock
    assert flows.calls == {"charge": 1, "ship": 1}


async def test_an_event_sent_before_the_timeout_is_delivered(env: Env) -> None:
    handle = await env.start("day_long", "o-2")
    await env.run_until_idle()
    await env.advance(days=1)
    await env.run_until_idle()
    await env.advance(hours=5)
    assert await env.send_event(handle, "approved", {"by": "ops"})
    await env.run_until_idle()
    result = await env.result(handle)
    assert result["approval"] == {"by": "ops"}
    assert 29 <= result["hours"] < 29.1


async def test_sleep_until_takes_the_moved_clock(env: Env) -> None:
    await env.advance(days=3)  # ctx.now() is three days ahead of the database now
    handle = await env.start("until")
    await env.run_until_idle()
    assert await status(env, handle) == "waiting"
    await env.advance(hours=1, minutes=59)
    await env.run_until_idle()
    assert await status(env, handle) == "waiting"
    await env.advance(minutes=1)
    await env.run_until_idle()
    assert float(await env.result(handle)) == pytest.approx(7200, abs=5)


async def test_run_until_idle_leaves_future_work_and_runs_what_is_due(env: Env) -> None:
    later = await env.start("flaky", delay=3600)
    soon = await env.start("flaky", run_at=env.now() + timedelta(minutes=5))
    await env.run_until_idle()
    assert (await status(env, later), await status(env, soon)) == ("queued", "queued")
    await env.advance(minutes=5)  # run_at on the moved clock
    await env.run_until_idle()
    assert (await status(env, later), await status(env, soon)) == ("queued", "completed")
    await env.advance(hours=1)
    await env.run_until_idle()
    assert await status(env, later) == "completed"


async def test_run_until_idle_names_work_it_cannot_run(env: Env) -> None:
    handle = await env.start("tasks_elsewhere")
    with pytest.raises(durable.DurableError, match="cannot run them"):
        await env.run_until_idle()
    child = await fetchval(env.dsn, "select id from durable.tasks where parent_id = $1", handle.id)
    assert child is not None


async def test_run_until_idle_times_out_naming_what_is_busy(env: Env) -> None:
    await env.start("not_registered", queue=flows.QUEUE)
    with pytest.raises(durable.DurableError, match="cannot run"):
        await env.run_until_idle(timeout=5)


async def test_fail_once_fails_the_first_try_of_a_step(env: Env) -> None:
    env.fail_once("call")
    handle = await env.start("flaky")
    await env.run_until_idle()
    info = await handle.get()
    assert info.status == "queued" and info.attempt == 2  # retried after a backoff
    assert flows.calls == {}  # the injected fault came before the step's code
    # Recorded as the step's own failure, which the retry clears to run the step again.
    assert await env.client.history(handle.id) == []
    assert (info.error or {}).get("type") == f"{InjectedFault.__module__}.InjectedFault"
    await env.advance(seconds=5)
    await env.run_until_idle()
    assert await env.result(handle) == 1


async def test_a_step_with_its_own_retry_policy_is_failed_and_retried_in_one_attempt(
    env: Env,
) -> None:
    """fail_once reaches a step run under a retry policy too; the step's short backoffs
    (4 s, then 5 s: taken inside the run, not as durable sleeps) take no time under the
    test kit, so the bound below is far under the nine seconds they would wait."""
    env.fail_once("call", times=2)
    handle = await env.start("flaky_retried")
    with anyio.fail_after(4):
        await env.run_until_idle()
    assert await env.result(handle) == 1
    info = await handle.get()
    assert info.attempt == 1  # the step's retries, not the workflow's
    tries = [(e.kind, e.name, e.status) for e in await env.client.history(handle.id)]
    assert tries == [("step", "call", "failed")] * 2 + [("step", "call", "completed")]
    assert env.backoffs == [4.0, 5.0]
    assert flows.calls == {"call": 1}  # the injected faults came before its code


async def test_kill_at_reaches_a_step_with_a_retry_policy(env: Env) -> None:
    env.kill_at("call")
    handle = await env.start("flaky_retried")
    await env.run_until_idle()
    assert env.killed and flows.calls == {}
    await env.resume()
    await env.run_until_idle()
    assert await env.result(handle) == 1


async def test_fail_once_a_task_with_a_long_backoff(env: Env) -> None:
    env.fail_once("flaky_task", error=RuntimeError("boom"))
    handle = await env.start("flaky_task")
    await env.run_until_idle()
    assert await status(env, handle) == "queued"
    await env.advance(seconds=59)
    await env.run_until_idle()
    assert await status(env, handle) == "queued"
    await env.advance(seconds=1)  # the retry's backoff of 60 s, on the moved clock
    await env.run_until_idle()
    assert await env.result(handle) == "ok"
    assert flows.calls == {"flaky_task": 1}


def test_fail_once_refuses_bad_input(durable_dsn: str) -> None:
    env = Env(durable_dsn, registry=flows.registry)
    with pytest.raises(ValueError, match="times must be a whole number"):
        env.fail_once("x", times=0)
    with pytest.raises(ValueError, match="name must be"):
        env.fail_once("")
    with pytest.raises(ValueError, match="step must be"):
        env.kill_at("")


async def test_advance_refuses_to_go_back(env: Env) -> None:
    with pytest.raises(ValueError, match="only moves forward"):
        await env.advance(hours=-1)


async def test_kill_after_a_step_ran_runs_it_again_on_resume(env: Env) -> None:
    env.kill_at("first", after=True)  # ran, but its checkpoint never written
    handle = await env.start("two_steps")
    await env.run_until_idle()
    assert env.killed
    info = await handle.get()
    assert (info.status, info.attempt) == ("running", 1)  # claimed by the dead worker
    assert await env.client.history(handle.id) == []
    await env.resume()
    await env.run_until_idle()
    assert await env.result(handle) == 2  # at least once: the step ran again
    assert (await handle.get()).attempt == 2  # the lost attempt counted


async def test_kill_before_a_step_keeps_what_was_checkpointed(env: Env) -> None:
    env.kill_at("second")
    handle = await env.start("two_steps")
    await env.run_until_idle()
    assert env.killed
    assert [e.name for e in await env.client.history(handle.id)] == ["first"]
    await env.resume()
    await env.run_until_idle()
    assert await env.result(handle) == 1  # the first step's checkpoint held
    assert flows.calls == {"first": 1, "second": 1}


async def test_kill_from_the_test_and_resume(env: Env) -> None:
    first = env.worker
    await env.kill()
    handle = await env.start("flaky")
    await env.run_until_idle()  # no worker: returns at once
    assert await status(env, handle) == "queued"
    await env.resume()
    assert env.worker is not first and not env.killed
    await env.run_until_idle()
    assert await env.result(handle) == 1
    with pytest.raises(durable.DurableError, match="alive"):
        await env.resume()


async def test_cron_ticks_on_the_moved_clock(durable_dsn: str) -> None:
    async with Env(durable_dsn, registry=flows.cron_registry) as env:
        await env.run_until_idle()
        assert flows.calls == {}
        now = env.now()
        to_hour = timedelta(minutes=60 - now.minute, seconds=-now.second) + timedelta(seconds=1)
        await env.advance(to_hour)
        await env.run_until_idle()
        assert flows.calls == {"tick": 1}
        await env.advance(minutes=30)
        await env.run_until_idle()
        assert flows.calls == {"tick": 1}
        await env.advance(hours=3)  # the clock stops at each tick on the way
        assert flows.calls == {"tick": 4}
        ticks = await fetchval(
            durable_dsn, "select array_agg(idempotency_key order by id) from durable.tasks"
        )
        assert len(set(ticks)) == 4


async def test_one_advance_passes_a_sleep_and_then_a_timeout(env: Env) -> None:
    handle = await env.start("day_long", "o-4")
    await env.run_until_idle()
    await env.advance(hours=30)  # the day's sleep, then the six hours' wait, in order
    result = await env.result(handle)
    assert result["approval"] is None
    assert 30 <= result["hours"] < 30.1


async def test_the_fixture_gives_a_worker_for_the_decorated_definitions(
    durable_env: Env,
) -> None:
    assert "default" in durable_env.queues
    handle = await durable_env.start(flows.registry.get("flaky") or "flaky")
    assert handle.id >= 1


async def test_advance_moves_a_column_it_was_never_told_about(env: Env) -> None:
    # A column as another part of durable may add one (as the deadline was): found in the
    # catalog. A domain over timestamptz too, and a table of its own.
    await execute_all(
        env.dsn,
        "alter table durable.tasks add column expires_at timestamptz",
        "create domain durable.moment as timestamptz",
        "create table durable.extra (at durable.moment, past timestamptz)",
        "insert into durable.extra values (now() + interval '3 hours', now() - interval '1 hour')",
    )
    handle = await env.start("day_long", "o-3")
    await env.run_until_idle()
    await execute_all(
        env.dsn,
        f"update durable.tasks set expires_at = now() + interval '10 hours' where id = {handle.id}",
    )
    before = await fetchval(env.dsn, "select now()")
    await env.advance(hours=2)
    row = await fetchrow(
        env.dsn,
        "select (t.expires_at - now()) as deadline, (t.wake_at - now()) as wake,"
        " (x.at - now()) as at, (now() - x.past) as past"
        f" from durable.tasks t, durable.extra x where t.id = {handle.id}",
    )
    assert timedelta(hours=7, minutes=59) < row["deadline"] <= timedelta(hours=8)
    assert timedelta(hours=21, minutes=59) < row["wake"] <= timedelta(hours=22)
    assert timedelta(minutes=59) < row["at"] <= timedelta(hours=1)
    # A time already past stays where it was.
    assert timedelta(hours=1) <= row["past"] < timedelta(hours=1, minutes=1)
    # So does the event log's copy of the sleep's end, moved with the task's.
    wake = await fetchval(
        env.dsn, "select wake_at - now() from durable.events where task_id = $1 and kind = 'sleep'",
        handle.id,
    )
    assert timedelta(hours=21, minutes=59) < wake <= timedelta(hours=22)
    assert await fetchval(env.dsn, "select now()") > before


async def test_advance_leaves_leases_and_schedules_alone(env: Env) -> None:
    await execute_all(
        env.dsn,
        "insert into durable.tasks (queue, name, status, claim_token, lease_until, worker_id)"
        " values ('elsewhere', 'held', 'running', 1, now() + interval '30 seconds',"
        " gen_random_uuid())",
        "insert into durable.schedules (name, task_name, cron, next_run_at)"
        " values ('s', 'held', '0 * * * *', now() + interval '90 minutes')",
    )
    await env.advance(hours=1)
    lease = await fetchval(env.dsn, "select lease_until - now() from durable.tasks where name = 'held'")
    assert lease > timedelta(seconds=25)  # a live worker's lease is its own to extend
    nxt = await fetchval(env.dsn, "select next_run_at - now() from durable.schedules")
    assert nxt > timedelta(minutes=75)  # on the scheduler's clock, which moved instead
    assert env.now() - await fetchval(env.dsn, "select now()") > timedelta(minutes=59)


async def test_run_until_idle_waits_for_a_task_another_worker_holds(env: Env) -> None:
    await execute_all(
        env.dsn,
        "insert into durable.tasks (queue, name, status, claim_token, lease_until, worker_id)"
        " values ('elsewhere', 'held', 'running', 1, now() + interval '30 seconds',"
        " gen_random_uuid())",
    )
    with pytest.raises(TimeoutError, match=r"1 running, .*held by another worker"):
        await env.run_until_idle(timeout=0.3)


async def execute_all(dsn: str, *statements: str) -> None:
    for statement in statements:
        await execute(dsn, statement)


async def fetchrow(dsn: str, query: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(query)
    finally:
        await conn.close()

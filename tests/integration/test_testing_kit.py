"""durable.testing through its public API: run_until_idle, the moved clock, fail_once,
kill/resume, and the fixture users enable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest

import durable
from durable.testing import Env, InjectedFault
from tests.apps import testkit_flows as flows
from tests.support.helpers import fetchval


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
        await env.advance(hours=3)  # the latest missed tick runs once
        await env.run_until_idle()
        assert flows.calls == {"tick": 2}
        ticks = await fetchval(
            durable_dsn, "select array_agg(idempotency_key order by id) from durable.tasks"
        )
        assert len(ticks) == 2


async def test_the_fixture_gives_a_worker_for_the_decorated_definitions(
    durable_env: Env,
) -> None:
    assert "default" in durable_env.queues
    handle = await durable_env.start(flows.registry.get("flaky") or "flaky")
    assert handle.id >= 1

"""Attacks on durable.Client (result, start, start_many, close) and the test kit
(kill_at, fail_once, the moved clock, children and events), against a real Postgres."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import anyio
import pytest

import durable
from durable.codec import MAX_PAYLOAD
from durable.testing import Env
from tests.apps import client_kit_attacks_app as app
from tests.support.helpers import execute, fetchval, wait_for

pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def fresh_runs() -> Iterator[None]:
    app.runs.clear()
    yield


@pytest.fixture
async def env(durable_dsn: str) -> AsyncIterator[Env]:
    async with Env(durable_dsn, registry=app.registry) as e:
        yield e


async def count_tasks(dsn: str) -> int:
    return int(await fetchval(dsn, "select count(*) from durable.tasks"))


# -- Handle.result(timeout=) ------------------------------------------------------------


async def test_result_with_timeout_zero_returns_a_finished_tasks_result(env: Env) -> None:
    handle = await env.start("cka_echo", 7)
    await env.run_until_idle()
    assert (await handle.get()).status == "completed"
    assert await handle.result(timeout=0) == 7


async def test_result_with_a_nan_timeout_names_the_timeout(env: Env) -> None:
    handle = await env.start("cka_echo", 7)
    await env.run_until_idle()
    with pytest.raises(ValueError, match="timeout"):
        await handle.result(timeout=math.nan)


async def test_result_negative_timeout_gives_up_and_inf_waits(env: Env) -> None:
    waiting = await env.client.start("cka_echo", 1, queue="nobody-serves-this")
    with pytest.raises(TimeoutError):
        await waiting.result(timeout=-1)
    await env.client.cancel(waiting.id)
    done = await env.start("cka_echo", 2)
    await env.run_until_idle()
    assert await done.result(timeout=math.inf) == 2


async def test_result_of_failed_cancelled_and_continued_tasks(env: Env) -> None:
    failed = await env.start("cka_boom")
    chained = await env.start("cka_chained", 3)
    queued = await env.start("cka_echo", 1, delay=3600)
    waits = [asyncio.ensure_future(h.result(timeout=30)) for h in (failed, chained, queued)]
    await wait_for(lambda: fetchval(
        env.dsn, "select notify_finish from durable.tasks where id = $1", queued.id))
    await env.client.cancel(queued.id)
    await env.run_until_idle()
    outcomes = await asyncio.gather(*waits, return_exceptions=True)
    assert isinstance(outcomes[0], durable.TaskFailed)
    assert "boom-cka" in outcomes[0].message
    assert outcomes[1] == 1000  # the last run of the chain's
    assert isinstance(outcomes[2], durable.TaskCancelled)


async def test_result_of_a_task_deleted_while_waiting_says_no_task(env: Env) -> None:
    handle = await env.client.start("cka_echo", 1, queue="nobody-serves-this")
    waiting = asyncio.ensure_future(handle.result(timeout=20))
    await wait_for(lambda: fetchval(
        env.dsn, "select notify_finish from durable.tasks where id = $1", handle.id))
    await execute(env.dsn, "delete from durable.tasks where id = $1", handle.id)
    with pytest.raises(durable.DurableError, match="no task"):
        await waiting


async def test_hundreds_of_waiters_each_get_their_own_result_across_a_lost_listener(
    env: Env,
) -> None:
    n = 300
    handles = await env.client.start_many("cka_echo", [[i * 3] for i in range(n)], queue="held")
    waits = [asyncio.ensure_future(h.result(timeout=30)) for h in handles]
    await wait_for(lambda: fetchval(
        env.dsn, "select count(*) = $1 from durable.tasks where notify_finish", n))
    sub = env.client.outcomes._sub
    assert sub is not None
    await execute(env.dsn, "select pg_terminate_backend($1)", sub.backend_pid)
    await wait_for(lambda: asyncio.sleep(0, sub.is_closed()))
    await execute(env.dsn, "update durable.tasks set queue = 'cka' where queue = 'held'")
    await env.run_until_idle()
    results = await asyncio.gather(*waits)
    assert results == [i * 3 for i in range(n)]


async def test_result_is_woken_promptly_after_the_listener_came_back(env: Env) -> None:
    first = await env.client.start("cka_echo", "a", queue="held")
    waiting = asyncio.ensure_future(first.result(timeout=30))
    await wait_for(lambda: fetchval(
        env.dsn, "select notify_finish from durable.tasks where id = $1", first.id))
    sub = env.client.outcomes._sub
    assert sub is not None
    await execute(env.dsn, "select pg_terminate_backend($1)", sub.backend_pid)
    await wait_for(lambda: asyncio.sleep(0, sub.is_closed()))
    await execute(env.dsn, "update durable.tasks set queue = 'cka' where id = $1", first.id)
    await env.run_until_idle()
    assert (await first.get()).status == "completed"
    with anyio.fail_after(2.5):  # the notification, not the 5 s fallback poll
        assert await waiting == "a"


async def test_result_after_close_leaves_no_connection_behind(durable_dsn: str) -> None:
    async with durable.connect(durable_dsn) as client:
        handle = await client.start("cka_echo", 1, queue="cka")
    with pytest.raises(Exception):  # noqa: B017 - any error, as long as it does not leak
        await handle.result(timeout=2)
    listeners = await fetchval(
        durable_dsn,
        "select count(*) from pg_stat_activity where datname = current_database() "
        "and application_name = 'durable-listener'",
    )
    assert listeners == 0


# -- start / start_many input -----------------------------------------------------------


async def test_a_dict_whose_keys_meet_in_json_is_refused_and_nothing_enqueued(env: Env) -> None:
    """{1: .., "1": ..} would reach jsonb as one key twice, and one value would be lost."""
    value = {1: "int key", "1": "str key"}
    with pytest.raises(durable.PayloadError, match="the keys 1 and '1' of one dict"):
        await env.start("cka_echo", value)
    await env.run_until_idle()
    assert await count_tasks(env.dsn) == 0


@pytest.mark.parametrize("bad", [
    math.nan, math.inf, 10**5000, "a\x00b", "\ud800", object(), {(1, 2): 1},
], ids=["nan", "inf", "huge-int", "nul", "lone-surrogate", "object", "tuple-key"])
async def test_values_that_are_not_json_are_refused_naming_the_arguments(
    durable_dsn: str, bad: object
) -> None:
    async with durable.connect(durable_dsn) as client:
        with pytest.raises(durable.PayloadError, match="the arguments of 'cka_echo'") as info:
            await client.start(app.registry.get("cka_echo"), bad)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
        with pytest.raises(durable.PayloadError, match="the arguments of 'cka_echo'"):
            await client.start(app.registry.get("cka_echo"), x=[[bad]])  # type: ignore[arg-type]
    assert await count_tasks(durable_dsn) == 0


async def test_a_payload_at_the_limit_is_kept_and_one_byte_over_is_refused(
    durable_dsn: str,
) -> None:
    echo = app.registry.get("cka_echo")
    assert echo is not None
    fits = "x" * (MAX_PAYLOAD - len('[""]'))
    async with durable.connect(durable_dsn) as client:
        with pytest.raises(durable.PayloadError, match="limit is 16777216 bytes"):
            await client.start(echo, fits + "y")
        assert await count_tasks(durable_dsn) == 0
        handle = await client.start(echo, fits)
    stored = await fetchval(
        durable_dsn, "select octet_length(args::text) from durable.tasks where id = $1",
        handle.id,
    )
    assert stored >= MAX_PAYLOAD - 8  # jsonb's text form: '["xx..."]'


async def test_start_many_with_one_bad_row_in_the_middle_enqueues_nothing(
    durable_dsn: str,
) -> None:
    echo = app.registry.get("cka_echo")
    assert echo is not None
    for bad in (math.nan, "a\x00b", "\udfff", object()):
        calls: list[list[object]] = [[i] for i in range(5000)]
        calls[2500] = [bad]
        async with durable.connect(durable_dsn) as client:
            with pytest.raises(durable.PayloadError, match="the arguments of 'cka_echo'"):
                await client.start_many(echo, calls)
            kw_calls: list[tuple[list[object], dict[str, object]]] = [
                ([], {"v": i}) for i in range(5000)
            ]
            kw_calls[2500] = ([], {"v": bad})
            with pytest.raises(durable.PayloadError):
                await client.start_many(echo, kw_calls)
    assert await count_tasks(durable_dsn) == 0


async def test_connect_to_a_refusing_server_names_the_address_not_the_password() -> None:
    with pytest.raises(OSError) as info:
        async with durable.connect("postgresql://bob:s3cret-pw@127.0.0.1:1/nowhere"):
            pass
    assert "s3cret-pw" not in str(info.value)
    assert "127.0.0.1" in str(info.value)


# -- the test kit ------------------------------------------------------------------------


async def test_kill_at_makes_a_non_deterministic_workflow_fail_on_replay(env: Env) -> None:
    env.kill_at("after")
    handle = await env.start("cka_drifting")
    await env.run_until_idle()
    assert env.killed
    await env.resume()  # a new worker replays the log: its step is named differently now
    await env.run_until_idle()
    info = await handle.get()
    assert info.status in ("failed", "queued")
    while info.status == "queued":  # its retries all replay the same log
        await env.advance(minutes=10)
        await env.run_until_idle()
        info = await handle.get()
    with pytest.raises(durable.TaskFailed) as failed:
        await env.result(handle)
    assert failed.value.type.endswith("NonDeterminismError")


async def test_a_deadline_given_on_the_moved_clock_is_kept_on_it(env: Env) -> None:
    await env.advance(hours=5)
    handle = await env.start("cka_half_hour", deadline=env.now() + timedelta(minutes=10))
    await env.run_until_idle()
    await env.advance(hours=1)  # the deadline (10 min) passes before the sleep (30 min)
    await env.run_until_idle()
    with pytest.raises(durable.TaskFailed, match=r"[Dd]eadline"):
        await env.result(handle)


async def test_a_deadline_in_seconds_passes_on_the_moved_clock(env: Env) -> None:
    handle = await env.start("cka_half_hour", deadline=600)
    await env.run_until_idle()
    await env.advance(hours=1)
    await env.run_until_idle()
    with pytest.raises(durable.TaskFailed, match=r"[Dd]eadline"):
        await env.result(handle)


async def test_fail_once_on_a_child_and_an_event_in_a_parent(env: Env) -> None:
    env.fail_once("cka_child")
    handle = await env.start("cka_parent", 4)
    await env.run_until_idle()
    child = await fetchval(env.dsn, "select id from durable.tasks where name = 'cka_child'")
    with pytest.raises(durable.TaskFailed) as failed:  # max_attempts=1: the fault is final
        await env.result(child)
    assert failed.value.type.endswith("InjectedFault")
    assert app.runs.get("child") is None  # failed before its code ran
    with pytest.raises(durable.TaskFailed, match="InjectedFault"):
        await env.result(handle)  # the child's failure is the parent's


async def test_children_events_and_the_clock_in_one_run(env: Env) -> None:
    handle = await env.start("cka_parent", 4)
    await env.run_until_idle()
    info = await handle.get()
    assert (info.status, info.waiting_event) == ("waiting", "go")
    assert app.runs == {"child": 1}
    await env.advance(minutes=59)
    await env.run_until_idle()
    assert await env.send_event(handle, "go", {"by": "t"})
    await env.run_until_idle()
    assert await env.result(handle) == {"child": 40, "approval": {"by": "t"}}


async def test_faults_and_the_clock_do_not_leak_into_the_next_env(durable_dsn: str) -> None:
    async with Env(durable_dsn, registry=app.registry) as first:
        first.fail_once("cka_echo", times=5)
        first.kill_at("after")
        await first.advance(days=3)
        moved = first.now()
    async with Env(durable_dsn, registry=app.registry) as second:
        assert abs((second.now() - moved) / timedelta(days=1) + 3) < 0.01
        assert await second.result(await _run(second, "cka_echo", 5)) == 5
        assert second.backoffs == []


async def _run(env: Env, name: str, *args: object) -> durable.Handle:
    handle = await env.start(name, *args)
    await env.run_until_idle()
    return handle


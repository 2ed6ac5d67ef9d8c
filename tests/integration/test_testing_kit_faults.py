"""The test kit's faults attacked: a kill inside a transaction's window, a kill while a step
is blocked in its code, fail_once on a transaction, and bad arguments."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import durable
from durable.registry import Registry
from durable.testing import Env, InjectedFault
from tests.support.helpers import execute, fetchval

ENTERED = asyncio.Event()
RELEASE = asyncio.Event()
runs: list[str] = []


async def book(conn: asyncpg.Connection, order: str) -> str:
    await conn.execute("insert into booked (id) values ($1)", order)
    return order


async def booking(ctx: durable.Context, order: str) -> str:
    return str(await ctx.transaction("book", book, order))


async def blocked() -> str:
    runs.append("blocked")
    ENTERED.set()
    await RELEASE.wait()
    return "released"


async def stuck(ctx: durable.Context) -> Any:
    return await ctx.step("blocked", blocked)


def registry() -> Registry:
    reg = Registry()
    reg.add(durable.Definition(name="booking", fn=booking, kind="workflow"))
    reg.add(durable.Definition(name="stuck", fn=stuck, kind="workflow"))
    return reg


@pytest.fixture
async def env(durable_dsn: str) -> Any:
    await execute(durable_dsn, "create table booked (id text primary key)")
    runs.clear()
    ENTERED.clear()
    RELEASE.clear()
    async with Env(durable_dsn, registry=registry()) as e:
        yield e


async def test_a_kill_before_a_transaction_commits_nothing_of_it(env: Env) -> None:
    env.kill_at("book")
    handle = await env.start("booking", "o-1")
    await env.run_until_idle()
    assert env.killed
    assert await fetchval(env.dsn, "select count(*) from booked") == 0
    await env.resume()
    await env.run_until_idle()
    assert await env.result(handle) == "o-1"
    assert await fetchval(env.dsn, "select count(*) from booked") == 1  # exactly once


async def test_fail_once_fails_a_transaction_before_it_writes(env: Env) -> None:
    env.fail_once("book", error=ValueError("no stock"))
    handle = await env.start("booking", "o-2")
    await env.run_until_idle()
    info = await handle.get()
    assert (info.status, info.attempt) == ("queued", 2)
    assert (info.error or {}).get("message") == "no stock"
    assert await fetchval(env.dsn, "select count(*) from booked") == 0
    await env.advance(seconds=5)
    assert await env.result(handle) == "o-2"


async def test_a_kill_while_a_step_runs_cancels_its_code_and_resume_runs_it_again(
    env: Env,
) -> None:
    handle = await env.start("stuck")
    await asyncio.wait_for(ENTERED.wait(), 20)
    dead = env.worker.id
    await env.kill()
    assert env.killed
    info = await handle.get()
    # The dead worker's claim holds: the task is running, with no checkpoint written.
    assert (info.status, info.attempt) == ("running", 1)
    assert await fetchval(env.dsn, "select worker_id from durable.tasks where id = $1",
                          handle.id) == dead  # fmt: skip
    assert await env.client.history(handle.id) == []
    RELEASE.set()  # the killed attempt's code was cancelled: it cannot finish now
    await env.resume()
    await env.run_until_idle()
    assert await env.result(handle) == "released"
    assert runs == ["blocked", "blocked"]
    assert (await handle.get()).attempt == 2


async def test_injected_faults_are_spent_once(env: Env) -> None:
    env.fail_once("book", times=2)
    handle = await env.start("booking", "o-3")
    await env.run_until_idle()
    await env.advance(seconds=10)
    await env.run_until_idle()
    info = await handle.get()
    assert info.status == "completed" and info.attempt == 3
    assert InjectedFault.__name__ not in str(info.error)


async def test_an_env_not_opened_says_so(durable_dsn: str) -> None:
    env = Env(durable_dsn, registry=registry())
    with pytest.raises(durable.DurableError, match="not open"):
        await env.run_until_idle()
    with pytest.raises(durable.DurableError, match="not open"):
        env.client  # noqa: B018

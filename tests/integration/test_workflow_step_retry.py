"""A workflow's automatic retry runs a failed step again instead of replaying its error."""

from __future__ import annotations

from datetime import timedelta

import durable
from durable.registry import Registry
from durable.testing import Env

calls: dict[str, int] = {"flaky": 0, "before": 0}


def before() -> str:
    calls["before"] += 1
    return "done"


def flaky() -> str:
    calls["flaky"] += 1
    if calls["flaky"] < 3:
        raise ConnectionError("the payment API refused the connection")
    return "charged"


@durable.workflow(
    name="wf_step_retry", max_attempts=5, retry=durable.RetryPolicy(base=30, jitter=0)
)
async def wf_step_retry(ctx: durable.Context) -> list[str]:
    a = await ctx.step("before", before)
    b = await ctx.step("flaky", flaky)
    return [a, b]


async def test_a_failed_step_runs_again_on_the_next_attempt(durable_dsn: str) -> None:
    calls.update(flaky=0, before=0)
    reg = Registry()
    reg.add(wf_step_retry)
    async with Env(durable_dsn, registry=reg) as env:
        handle = await env.start(wf_step_retry)
        await env.run_until_idle()
        assert (await handle.get()).attempt == 2  # due after its 30 s backoff
        await env.advance(seconds=29)
        assert calls["flaky"] == 1
        # 30 s, then the second backoff of 60 s: the clock stops at each on the way.
        await env.advance(timedelta(seconds=1 + 60))
        assert await env.result(handle) == ["done", "charged"]
        info = await handle.get()
        history = await env.client.history(handle.id)
    assert info.attempt == 3
    assert calls == {"flaky": 3, "before": 1}  # the finished step was not run again
    assert [(e.name, e.status) for e in history] == [
        ("before", "completed"),
        ("flaky", "completed"),
    ]

"""A workflow's automatic retry runs a failed step again instead of replaying its error."""

from __future__ import annotations

import durable
from tests.support.helpers import running_daemon

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
    name="wf_step_retry", max_attempts=5, retry=durable.RetryPolicy(base=0.01, jitter=0)
)
async def wf_step_retry(ctx: durable.Context) -> list[str]:
    a = await ctx.step("before", before)
    b = await ctx.step("flaky", flaky)
    return [a, b]


async def test_a_failed_step_runs_again_on_the_next_attempt(dsn: str) -> None:
    calls.update(flaky=0, before=0)
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(wf_step_retry)
        assert await handle.result(timeout=20) == ["done", "charged"]
        info = await client.get(handle.id)
        history = await client.history(handle.id)
    assert info.attempt == 3
    assert calls == {"flaky": 3, "before": 1}  # the finished step was not run again
    assert [(e.name, e.status) for e in history] == [
        ("before", "completed"),
        ("flaky", "completed"),
    ]

"""Attacks on `durable verify`: histories a daemon replays without NonDeterminismError must
pass, and each verdict is compared with the replay machinery the daemon runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import durable
from durable.codec import digest, dumps
from durable.context import Context
from durable.models import Claimed, Event, History
from durable.replay import ContinueAsNew, Suspend
from durable.verify import check_history


def add(x: int) -> int:
    return x + 1


def step(seq: int, name: str, *args: Any, result: Any = 1) -> Event:
    return Event(seq, "step", name, digest("step", name, [args, {}]), "completed",
                 dumps(result), None, None, None)  # fmt: skip


def slept(seq: int, ago: timedelta = timedelta(days=1)) -> Event:
    wake = datetime.now(UTC) - ago
    return Event(seq, "sleep", "sleep", digest("sleep", "sleep", None), "completed", None, None,
                 None, wake)  # fmt: skip


def history(*events: Event, status: str = "completed") -> History:
    return History(7, "flow", [1], {}, status, 0, 1, tuple(events))


class _Writer:
    async def submit(self, item: Any, /) -> bool:
        raise AssertionError(f"a replay of a recorded history wrote {item.kind} at {item.seq}")


class _Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


async def daemon_replay(fn: Any, h: History) -> str:
    """What the daemon's replay of ``h`` does (Context over the real Journal): how it ends."""
    task = Claimed(
        id=h.task_id, queue="", name=h.name, kind="workflow", args="[]", kwargs="{}",
        attempt=h.attempt, max_attempts=h.attempt, timeout=None, token=0, branch=h.branch,
        parent_id=None, root_id=None, cancel_requested=False,
    )  # fmt: skip
    ctx = Context(_Clock(), task, h.events, _Writer(), lambda _n: None)  # type: ignore[arg-type]
    try:
        await fn(ctx, *h.args, **h.kwargs)
        ctx.check_consumed()
    except ContinueAsNew:
        return "continued"
    except Suspend:
        return "suspended"
    return "returned"


async def sleeps_last(ctx: durable.Context, x: int) -> int:
    a = int(await ctx.step("a", add, x))
    await ctx.sleep(60)
    return a


async def test_a_run_that_returned_after_its_last_sleep_passes() -> None:
    h = history(step(0, "a", 1, result=2), slept(1))
    assert await daemon_replay(sleeps_last, h) == "returned"
    v = await check_history(sleeps_last, h)
    assert v.ok and v.outcome == "returns", v


async def test_a_run_sleeping_now_still_waits() -> None:
    h = history(step(0, "a", 1, result=2), slept(1, ago=-timedelta(days=1)), status="waiting")
    v = await check_history(sleeps_last, h)
    assert v.ok and v.outcome == "waits at position 1", v


async def continues(ctx: durable.Context, x: int) -> int:
    a = int(await ctx.step("a", add, x))
    if a < 3:
        ctx.continue_as_new(a)
    return a


async def test_a_run_that_continued_as_new_passes_instead_of_raising() -> None:
    h = history(step(0, "a", 1, result=2))
    assert await daemon_replay(continues, h) == "continued"
    v = await check_history(continues, h)
    assert v.ok and v.outcome == "continues as new", v


async def continues_early(ctx: durable.Context, x: int) -> int:
    ctx.continue_as_new(x)


async def test_continuing_as_new_with_the_log_unreplayed_fails() -> None:
    v = await check_history(continues_early, history(step(0, "a", 1, result=2)))
    assert not v.ok and v.outcome == "returned early" and v.position == 0, v


async def reports(ctx: durable.Context, x: int) -> int:
    ctx.progress(0.5, "starting")
    assert durable.current().id == ctx.task_id
    return int(await ctx.step("a", add, x))


async def test_progress_and_current_work_in_a_replay_and_write_nothing() -> None:
    v = await check_history(reports, history(step(0, "a", 1, result=2)))
    assert v.ok and v.outcome == "returns", v


async def reports_badly(ctx: durable.Context, x: int) -> int:
    ctx.progress(object())
    return int(await ctx.step("a", add, x))


async def test_progress_a_real_run_refuses_is_still_refused() -> None:
    v = await check_history(reports_badly, history(step(0, "a", 1, result=2)))
    assert not v.ok and v.outcome == "raises early", v
    assert "PayloadError" in (v.call or ""), v


@pytest.mark.parametrize("status", ["completed", "waiting"])
async def test_durable_current_is_left_as_it_was(status: str) -> None:
    await check_history(reports, history(step(0, "a", 1, result=2), status=status))
    with pytest.raises(durable.DurableError):
        durable.current()

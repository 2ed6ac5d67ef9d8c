"""Replaying a recorded history on changed code, with no database: what passes, what fails
and where, `ctx.patched` and `ctx.deprecate_patch` over old and new logs, and the file
`durable show --json` writes."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import durable
from durable.codec import digest, dumps
from durable.errors import DurableError
from durable.models import Event, History
from durable.verify import HistoryMismatch, check_history, history_from_json, verify_history

RAN: Counter[str] = Counter()
"""Step bodies that ran: a replay must run none."""


def add(x: int) -> int:
    RAN["add"] += 1
    return x + 1


def step(seq: int, name: str, *args: Any, result: Any = 1) -> Event:
    return Event(seq, "step", name, digest("step", name, [args, {}]), "completed",
                 dumps(result), None, None, None)  # fmt: skip


def sleep(seq: int, name: str = "sleep") -> Event:
    when = datetime.now(UTC) + timedelta(days=1)
    return Event(seq, "sleep", name, digest("sleep", name, None), "completed", None, None, None, when)


def marker(seq: int, patch_id: str) -> Event:
    return Event(seq, "patch", patch_id, digest("patch", patch_id, None), "completed", "true",
                 None, None, None)  # fmt: skip


def history(*events: Event, status: str = "waiting", args: list[Any] | None = None) -> History:
    return History(7, "flow", [1] if args is None else args, {}, status, 0, 1, tuple(events))


async def v1(ctx: durable.Context, x: int) -> int:
    a = await ctx.step("a", add, x)
    await ctx.sleep(60)
    return int(await ctx.step("b", add, a))


async def v2_renamed(ctx: durable.Context, x: int) -> int:
    a = await ctx.step("a", add, x)
    await ctx.sleep(60)
    return int(await ctx.step("c", add, a))


async def v2_appended(ctx: durable.Context, x: int) -> int:
    b = await v1(ctx, x)
    return int(await ctx.step("d", add, b))


COMPLETED = history(step(0, "a", 1, result=2), sleep(1), step(2, "b", 2, result=3), status="completed")
WAITING = history(step(0, "a", 1, result=2), sleep(1))


async def test_unchanged_code_passes_and_runs_nothing() -> None:
    RAN.clear()
    done = await check_history(v1, COMPLETED)
    waiting = await check_history(v1, WAITING)
    assert done.ok and done.outcome == "returns" and done.replayed == 3
    assert waiting.ok and waiting.outcome == "waits at position 1"
    assert RAN["add"] == 0


async def test_a_renamed_step_fails_at_its_position_naming_both_calls() -> None:
    v = await check_history(v2_renamed, COMPLETED)
    assert not v.ok and v.position == 2
    assert v.recorded is not None and v.recorded.startswith("step 'b'")
    assert v.call is not None and v.call.startswith("step 'c'")
    assert "at position 2 the event log holds step 'b'" in v.message


async def test_the_change_passes_a_run_that_has_not_reached_it_yet() -> None:
    assert (await check_history(v2_renamed, WAITING)).ok


async def test_changed_arguments_fail_at_the_step() -> None:
    h = history(step(0, "a", 5, result=6), sleep(1))  # recorded with x=5, replayed with x=1
    v = await check_history(v1, History(7, "flow", [1], {}, "waiting", 0, 1, h.events))
    assert not v.ok and v.position == 0 and v.call is not None and "step 'a'" in v.call


async def test_a_completed_run_that_the_code_now_goes_past_fails() -> None:
    v = await check_history(v2_appended, COMPLETED)
    assert not v.ok and v.position == 3 and v.recorded == "the workflow returned"
    assert v.call is not None and v.call.startswith("step 'd'")
    # The same change is fine for a run still on its way: it will make that call.
    assert (await check_history(v2_appended, WAITING)).ok


async def test_returning_with_events_left_fails_at_the_first_left() -> None:
    async def short(ctx: durable.Context, x: int) -> int:
        return int(await ctx.step("a", add, x))

    v = await check_history(short, COMPLETED)
    assert not v.ok and v.position == 1 and v.call == "return"
    assert v.recorded is not None and v.recorded.startswith("sleep 'sleep'")


async def test_raising_with_events_left_fails_and_raising_at_the_end_passes() -> None:
    async def raises(ctx: durable.Context, x: int) -> int:
        await ctx.step("a", add, x)
        raise KeyError("gone")

    early = await check_history(raises, COMPLETED)
    assert not early.ok and early.position == 1 and early.call == "raise KeyError: 'gone'"
    failed = history(step(0, "a", 1, result=2), status="failed")
    assert (await check_history(raises, failed)).ok
    done = history(step(0, "a", 1, result=2), status="completed")
    assert not (await check_history(raises, done)).ok


async def test_arguments_that_no_longer_fit_fail_before_any_call() -> None:
    v = await check_history(v1, history(args=[1, 2]))
    assert not v.ok and v.position == 0 and "do not fit" in v.message


async def test_a_recorded_step_failure_is_raised_again_as_the_run_saw_it() -> None:
    async def caught(ctx: durable.Context, x: int) -> str:
        try:
            await ctx.step("a", add, x)
        except ValueError as exc:
            return str(await ctx.step("handled", str, str(exc)))
        return "no"

    err = '{"type": "builtins.ValueError", "message": "bad", "args": ["bad"], "attrs": {}}'
    failed = Event(0, "step", "a", digest("step", "a", [(1,), {}]), "failed", None, err, None, None)
    h = history(failed, step(1, "handled", "bad", result="bad"), status="completed")
    assert (await check_history(caught, h)).ok


# -- ctx.patched ---------------------------------------------------------------------------

TAKEN: list[bool] = []


async def patched_flow(ctx: durable.Context, x: int) -> int:
    a = await ctx.step("a", add, x)
    new = await ctx.patched("fraud-check")
    TAKEN.append(new)
    if new:
        await ctx.step("fraud", add, a)
    else:
        await ctx.step("old", add, a)
    assert await ctx.patched("fraud-check") is new  # asked again: the same answer, no position
    await ctx.sleep(60)
    return int(await ctx.step("b", add, a))


async def test_a_history_from_before_the_patch_takes_the_old_branch_to_its_end() -> None:
    TAKEN.clear()
    old = history(step(0, "a", 1, result=2), step(1, "old", 2), sleep(2), step(3, "b", 2),
                  status="completed")  # fmt: skip
    assert (await check_history(patched_flow, old)).ok
    assert TAKEN == [False]


async def test_a_history_with_the_marker_takes_the_new_branch() -> None:
    TAKEN.clear()
    new = history(step(0, "a", 1, result=2), marker(1, "fraud-check"), step(2, "fraud", 2),
                  sleep(3), status="waiting")  # fmt: skip
    assert (await check_history(patched_flow, new)).ok
    assert TAKEN == [True]


async def test_a_history_that_ends_before_the_patch_takes_the_new_branch() -> None:
    TAKEN.clear()
    v = await check_history(patched_flow, history(step(0, "a", 1, result=2), status="queued"))
    assert v.ok and TAKEN == [True]
    assert v.outcome.startswith("the log ends at position 2; next: step 'fraud'")


async def test_the_old_branch_on_a_new_history_fails_at_the_marker() -> None:
    async def unpatched(ctx: durable.Context, x: int) -> int:
        a = await ctx.step("a", add, x)
        await ctx.step("old", add, a)
        return 0

    new = history(step(0, "a", 1, result=2), marker(1, "fraud-check"), step(2, "fraud", 2))
    v = await check_history(unpatched, new)
    # The marker is stepped over (the code no longer asks for it); the next call differs.
    assert not v.ok and v.position == 2 and v.call is not None and "step 'old'" in v.call


async def deprecated_flow(ctx: durable.Context, x: int) -> int:
    a = await ctx.step("a", add, x)
    await ctx.deprecate_patch("fraud-check")
    await ctx.step("fraud", add, a)
    return 0


async def removed_flow(ctx: durable.Context, x: int) -> int:
    a = await ctx.step("a", add, x)
    await ctx.step("fraud", add, a)
    return 0


@pytest.mark.parametrize("fn", [deprecated_flow, removed_flow])
async def test_after_the_cleanup_runs_with_and_without_the_marker_replay(fn: Any) -> None:
    with_marker = history(step(0, "a", 1, result=2), marker(1, "fraud-check"),
                          step(2, "fraud", 2), status="completed")  # fmt: skip
    assert (await check_history(fn, with_marker)).ok
    # A run recorded on the deprecate_patch code: the marker is there too.
    ended = history(step(0, "a", 1, result=2), marker(1, "fraud-check"), status="failed")
    assert (await check_history(fn, ended)).ok


async def test_a_marker_left_at_the_end_does_not_count_as_an_event_left() -> None:
    async def returns(ctx: durable.Context, x: int) -> int:
        await ctx.step("a", add, x)
        return 0

    h = history(step(0, "a", 1, result=2), marker(1, "fraud-check"), status="completed")
    assert (await check_history(returns, h)).ok


async def test_asking_for_a_patch_whose_marker_was_stepped_over_fails() -> None:
    async def moved(ctx: durable.Context, x: int) -> int:
        a = await ctx.step("a", add, x)
        await ctx.step("fraud", add, a)
        await ctx.patched("fraud-check")
        return 0

    h = history(step(0, "a", 1, result=2), marker(1, "fraud-check"), step(2, "fraud", 2),
                step(3, "z", 0), status="completed")  # fmt: skip
    v = await check_history(moved, h)
    assert not v.ok and v.position == 3 and v.call == "patch 'fraud-check'"
    assert "marker the event log holds at position 1" in v.message


@pytest.mark.parametrize(
    ("patch_id", "error"),
    [("", ValueError), (" x", ValueError), ("x\n", ValueError), ("a\x00b", ValueError),
     ("\ud800", ValueError), ("x" * 201, ValueError), (5, TypeError), (None, TypeError)],
)  # fmt: skip
async def test_a_bad_patch_id_is_refused_where_it_is_given(patch_id: Any, error: type) -> None:
    async def bad(ctx: durable.Context, x: int) -> int:
        with pytest.raises(error, match="patch id"):
            ctx.patched(patch_id)
        with pytest.raises(error, match="patch id"):
            ctx.deprecate_patch(patch_id)
        return 0

    assert (await check_history(bad, history(status="completed"))).ok


async def test_a_patch_id_of_200_characters_is_taken() -> None:
    async def long(ctx: durable.Context, x: int) -> int:
        assert await ctx.patched("p" * 200)
        return 0

    assert (await check_history(long, history(status="completed"))).ok


async def test_patched_without_await_raises_instead_of_reading_true() -> None:
    async def forgot(ctx: durable.Context, x: int) -> int:
        if ctx.patched("fraud-check"):  # the mistake under test
            return 1
        return 0

    v = await check_history(forgot, history(status="failed"))
    assert v.outcome == "raises TypeError at the end of the log"


# -- verify_history and the history file ---------------------------------------------------------


@durable.workflow(name="flow")
async def flow(ctx: durable.Context, x: int) -> int:
    return await v1(ctx, x)


def exported(h: History) -> dict[str, Any]:
    """``h`` as `durable show --json` writes it."""
    return {
        "history_format": 1, "id": h.task_id, "name": h.name, "kind": "workflow",
        "args": h.args, "kwargs": h.kwargs, "status": h.status, "branch": 3,
        "branch_shown": h.branch, "attempt": h.attempt,
        "events": [
            {"seq": e.seq, "kind": e.kind, "name": e.name, "digest": e.digest,
             "status": e.status, "result": json.loads(e.result) if e.result else None,
             "error": None, "child_id": None, "child_status": None, "child_result": None,
             "child_error": None, "wake_at": str(e.wake_at) if e.wake_at else None}
            for e in h.events
        ],
    }  # fmt: skip


def test_verify_history_reads_a_file_and_returns_the_verdict(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    path.write_text(json.dumps(exported(COMPLETED)))
    assert history_from_json(path) == COMPLETED
    assert verify_history(flow, path).ok
    assert verify_history(flow, str(path)).ok


def test_verify_history_raises_an_assertion_naming_position_and_both_calls() -> None:
    with pytest.raises(HistoryMismatch) as caught:
        verify_history(v2_renamed, exported(COMPLETED))
    assert isinstance(caught.value, AssertionError)
    text = str(caught.value)
    assert "task 7 ('flow', branch 0, completed) does not replay at position 2" in text
    assert "recorded step 'b'" in text and "the code now: step 'c'" in text


def test_the_test_kit_exports_the_same_check() -> None:
    # A user's suite reaches it as durable.testing.verify_history.
    from durable import testing

    assert testing.verify_history(flow, exported(COMPLETED)).ok
    with pytest.raises(testing.HistoryMismatch, match="does not replay at position 2"):
        testing.verify_history(v2_renamed, exported(COMPLETED))


async def test_verify_history_works_inside_a_running_event_loop() -> None:
    assert verify_history(flow, COMPLETED).ok


def test_verify_history_refuses_another_workflows_history() -> None:
    @durable.workflow(name="other_flow_for_verify")
    async def other(ctx: durable.Context) -> None: ...

    with pytest.raises(HistoryMismatch, match="is of 'flow', not 'other_flow_for_verify'"):
        verify_history(other, COMPLETED)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["events"][1].pop("digest"), "events[1].digest is missing"),
        (lambda d: d["events"][0].update(seq="0"), "events[0].seq must be a whole number"),
        (lambda d: d.pop("history_format"), "history_format is missing"),
        (lambda d: d.update(history_format=2), "history_format 2 is not 1"),
        (lambda d: d.update(kind="task"), "kind must be workflow"),
        (lambda d: d.update(args={}), "args must be an array"),
        (lambda d: d["events"].reverse(), "in order of seq"),
        (lambda d: d["events"][1].update(wake_at="soon"), "events[1].wake_at is not a timestamp"),
        (lambda d: d["events"][1].update(wake_at="2026-01-01T00:00:00"),
         "events[1].wake_at has no time zone"),
    ],
)
def test_a_file_that_is_not_a_history_is_refused_naming_the_field(change: Any, message: str) -> None:
    data = exported(COMPLETED)
    change(data)
    with pytest.raises(DurableError, match=message.replace("[", r"\[").replace("]", r"\]")):
        history_from_json(data)


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DurableError, match="cannot read it"):
        history_from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DurableError, match="not JSON"):
        history_from_json(tmp_path / "bad.json")


# -- children and waits come from the log -------------------------------------------------------


@durable.workflow(name="verify_child")
async def child(x: int) -> int:
    RAN["child"] += 1
    return x


async def parent(ctx: durable.Context, x: int) -> int:
    got = await ctx.run(child, x)
    return int(await ctx.step("after", add, got))


def child_event(status: str, child_status: str | None, result: Any = None) -> Event:
    return Event(0, "child", "verify_child", digest("child", "verify_child", [[1], {}]), status,
                 None if result is None else dumps(result), None, 41, None, child_status,
                 None if result is None else dumps(result), None)  # fmt: skip


@pytest.mark.parametrize(
    ("event", "outcome"),
    [
        (child_event("pending", "running"), "waits at position 0"),
        (child_event("pending", "completed", 1), "the log ends at position 0; next: the outcome of its children"),
        (child_event("completed", "completed", 1), "the log ends at position 1; next: step 'after'"),
    ],
)  # fmt: skip
async def test_a_child_is_never_started_and_its_outcome_comes_from_the_log(
    event: Event, outcome: str
) -> None:
    RAN.clear()
    v = await check_history(parent, history(event))
    assert v.ok and v.outcome.startswith(outcome)
    assert RAN["child"] == 0 and RAN["add"] == 0


async def test_a_child_replaced_by_a_step_fails_at_the_child() -> None:
    async def changed(ctx: durable.Context, x: int) -> int:
        return int(await ctx.step("inline", add, x))

    v = await check_history(changed, history(child_event("completed", "completed", 1)))
    assert not v.ok and v.position == 0
    assert str(v.recorded).startswith("child 'verify_child'") and str(v.call).startswith("step 'inline'")

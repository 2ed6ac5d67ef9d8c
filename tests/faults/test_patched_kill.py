"""A daemon killed right after `ctx.patched` recorded its marker, while the new branch's
step runs: the run's next daemon reads the marker, stays on the new branch, and records
no second marker."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import durable
from tests.apps import ship_v1
from tests.support.helpers import fetchval, kill, spawn_daemon_logged, wait_for, wait_status

PATCHED = "tests.apps.ship_v2_patched"


@pytest.mark.timeout(120)
async def test_a_kill_after_the_marker_keeps_the_run_on_the_new_branch(
    dsn: str, tmp_path: Path
) -> None:
    fast = {"DURABLE_QUEUES": "ship=2", "DURABLE_LEASE": "2", "DURABLE_POLL_INTERVAL": "0.5"}
    first = spawn_daemon_logged(dsn, PATCHED, tmp_path / "a.log", SHIP_INSURE_HANGS="1", **fast)
    try:
        async with durable.connect(dsn) as client:
            run = await client.start(ship_v1.ship, "o-9")  # same name and queue as v2

            async def marked() -> bool:
                kinds = await fetchval(
                    dsn, "select array_agg(kind order by seq) from durable.events "
                    "where task_id = $1", run.id,
                )  # fmt: skip
                return bool(kinds == ["step", "patch"])

            await wait_for(marked, timeout=60)  # the marker is in; `insure` is running
            kill(first, signal.SIGKILL)
            first.wait(timeout=30)
            second = spawn_daemon_logged(dsn, PATCHED, tmp_path / "b.log", **fast)
            try:
                await wait_status(dsn, run.id, "waiting", timeout=60)
                assert await client.send_event(run.id, "picked")
                assert await run.result(timeout=60) == {"label": "L-o-9", "insured": True}
            finally:
                kill(second, signal.SIGTERM)
                second.wait(timeout=30)
    finally:
        kill(first)
    log = await fetchval(
        dsn, "select array_agg(kind || ':' || name order by seq) from durable.events "
        "where task_id = $1", run.id,
    )  # fmt: skip
    assert log == ["step:label", "patch:insure", "step:insure", "event:picked", "step:notify"]
    assert await fetchval(dsn, "select attempt from durable.tasks where id = $1", run.id) == 2


@pytest.mark.timeout(150)
async def test_a_marker_left_last_by_a_kill_is_asked_again_by_the_code_before_the_patch(
    dsn: str, tmp_path: Path
) -> None:
    """Killed right after the marker, the run goes to a daemon still on the code before the
    patch (a rollout in progress, or rolled back). That code must not record its branch
    behind the marker: the log would hold an answer of True followed by the old branch's
    calls, which the new code cannot replay. The marker is dropped at the cold start, the
    old branch recorded in its place, and the new code later replays the log to its end."""
    fast = {"DURABLE_QUEUES": "ship=2", "DURABLE_LEASE": "2", "DURABLE_POLL_INTERVAL": "0.5"}
    first = spawn_daemon_logged(dsn, PATCHED, tmp_path / "a.log", SHIP_INSURE_HANGS="1", **fast)
    try:
        async with durable.connect(dsn) as client:
            run = await client.start(ship_v1.ship, "o-10")

            async def marked() -> bool:
                return bool(await kinds_of(dsn, run.id) == ["step:label", "patch:insure"])

            await wait_for(marked, timeout=60)  # the marker is in; `insure` is running
            kill(first, signal.SIGKILL)
            first.wait(timeout=30)
            old = spawn_daemon_logged(dsn, "tests.apps.ship_v1", tmp_path / "b.log", **fast)
            try:
                await wait_status(dsn, run.id, "waiting", timeout=60)
            finally:
                kill(old, signal.SIGTERM)
                old.wait(timeout=30)
            assert await kinds_of(dsn, run.id) == ["step:label", "event:picked"]
            new = spawn_daemon_logged(dsn, PATCHED, tmp_path / "c.log", **fast)
            try:
                assert await client.send_event(run.id, "picked")
                assert await run.result(timeout=60) == {"label": "L-o-10", "insured": False}
            finally:
                kill(new, signal.SIGTERM)
                new.wait(timeout=30)
    finally:
        kill(first)
    assert await kinds_of(dsn, run.id) == ["step:label", "event:picked", "step:notify"]


async def kinds_of(dsn: str, task_id: int) -> list[str] | None:
    log = await fetchval(
        dsn, "select array_agg(kind || ':' || name order by seq) from durable.events "
        "where task_id = $1", task_id,
    )  # fmt: skip
    return list(log) if log is not None else None

"""A daemon whose clock is an hour off computes every deadline the database compares on
the database's clock: a sleep neither spins (behind) nor ends early (ahead), and an
event's timeout is not spent at once. The daemon runs under libfaketime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import durable
from tests.apps.clock_app import QUEUE, skew_sleep_then_wait
from tests.support.helpers import fetchval, kill, spawn_daemon_logged, wait_for

LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), Path("/nonexistent"))
SLEEP = 2.0


def suspensions(log: Path, task_id: int) -> int:
    count = 0
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "task_suspended" and record.get("task_id") == task_id:
            count += 1
    return count


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.skipif(
    not LIBFAKETIME.exists() and not os.environ.get("CI"),
    reason="libfaketime is not installed (Debian package faketime; .ci/run installs it)",
)
@pytest.mark.parametrize("skew", ["-1h", "+1h"])
async def test_a_skewed_daemon_keeps_the_databases_time(
    dsn: str, tmp_path: Path, skew: str
) -> None:
    log = tmp_path / "daemon.log"
    proc = spawn_daemon_logged(
        dsn, "tests.apps.clock_app", log, DURABLE_QUEUES=QUEUE,
        LD_PRELOAD=str(LIBFAKETIME), FAKETIME=skew, FAKETIME_DONT_FAKE_MONOTONIC="1",
    )  # fmt: skip
    try:
        async with durable.connect(dsn) as client:
            handle = await client.start(skew_sleep_then_wait, SLEEP)

            async def waiting_for_the_event() -> bool:
                return await fetchval(
                    dsn, "select waiting_event = 'go' from durable.tasks where id = $1",
                    handle.id,
                ) is True  # fmt: skip

            await wait_for(waiting_for_the_event, timeout=30)
            # By the database's clock, the sleep was over before the wait began.
            assert await fetchval(
                dsn, "select bool_and(e.wake_at <= now() and e.wake_at >= t.created_at"
                " + make_interval(secs => $2)) from durable.events e"
                " join durable.tasks t on t.id = e.task_id where e.task_id = $1 and"
                " e.kind = 'sleep'", handle.id, SLEEP - 0.05,
            )  # fmt: skip
            # The event's ten-minute timeout is ten minutes of the database's time.
            deadline = await fetchval(
                dsn, "select extract(epoch from wake_at - now()) from durable.tasks"
                " where id = $1", handle.id,
            )  # fmt: skip
            assert 590 < deadline <= 600
            assert await client.send_event(handle.id, "go", "went")
            assert await handle.result(timeout=30) == "went"
            # One suspension for the sleep, one for the wait: no claim-suspend spin.
            assert suspensions(log, handle.id) == 2
            assert proc.poll() is None
    finally:
        kill(proc)
        proc.wait(timeout=30)

"""A daemon that dies of an unexpected error leaves the traceback in its log, not only a
one-line summary on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.apps.secret_tasks import QUEUE
from tests.support.helpers import execute, kill, spawn_daemon_logged, wait_for


def records(path: Path) -> list[dict[str, object]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


@pytest.mark.timeout(60)
async def test_a_crashed_daemon_logs_why_with_its_traceback(dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    proc = spawn_daemon_logged(dsn, "tests.apps.secret_tasks", log, DURABLE_QUEUES=QUEUE,
                               DURABLE_LEASE="1")
    try:

        async def ready() -> bool:
            return any(r.get("event") == "daemon_ready" for r in records(log))

        await wait_for(ready, timeout=30)
        # Not a blip a retry would cure: the daemon's own table is gone.
        await execute(dsn, "alter table durable.workers rename to workers_gone")

        async def exited() -> bool:
            return proc.poll() is not None

        await wait_for(exited, timeout=30)
    finally:
        kill(proc)
        proc.wait(timeout=30)
    assert proc.returncode == 1
    [failed] = [r for r in records(log) if r.get("event") == "daemon_failed"]
    assert failed["level"] == "error"
    assert "UndefinedTableError" in str(failed["exception"])
    assert "Traceback" in str(failed["exception"])

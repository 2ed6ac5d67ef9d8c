"""`durable run` started while its server restarts waits for it instead of exiting."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

import durable
from durable.embedded import EmbeddedServer
from tests.apps.secret_tasks import QUEUE
from tests.helpers import kill, spawn_daemon_logged, wait_for


def events(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(str(json.loads(line).get("event")))
        except (ValueError, AttributeError):
            continue
    return out


@pytest.mark.timeout(90)
async def test_a_daemon_started_while_postgres_is_down_waits_and_then_serves(
    restartable_server: EmbeddedServer, tmp_path: Path
) -> None:
    url = restartable_server.url()
    assert url is not None
    await asyncio.to_thread(restartable_server.stop, "immediate")
    log = tmp_path / "daemon.log"
    proc = spawn_daemon_logged(url, "tests.apps.secret_tasks", log, DURABLE_QUEUES=QUEUE)
    try:

        async def waiting() -> bool:
            return events(log).count("database_unavailable") >= 2

        await wait_for(waiting, timeout=30)
        assert proc.poll() is None, log.read_text()
        await asyncio.to_thread(restartable_server.ensure_started)

        async def ready() -> bool:
            return "daemon_ready" in events(log)

        await wait_for(ready, timeout=30)
        async with durable.connect(url) as client:
            handle = await client.start("sec_echo", "up")
            assert await handle.result(timeout=20) == "up"
    finally:
        kill(proc, signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0, log.read_text()

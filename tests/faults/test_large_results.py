"""Results as large as the payload limit allows, many at once, leave the daemon's event
loop free enough to keep its leases: none is reaped while its attempt finishes."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import durable
from durable.store import Store
from tests.apps.hostile_tasks import QUEUE, hostile_big_result
from tests.support.helpers import kill, spawn_daemon_logged

MB = 15
"""Each result's size in MiB: just under the 16 MiB payload limit."""
COUNT = 12


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_many_large_results_at_once_keep_their_leases(dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    # A lease of 2 s: the daemon must extend it every 0.67 s while it encodes and sends
    # COUNT results of MB MiB each.
    proc = spawn_daemon_logged(
        dsn, "tests.apps.hostile_tasks", log, DURABLE_QUEUES=f"{QUEUE}={COUNT}",
        DURABLE_LEASE="2",
    )  # fmt: skip
    reaped: list[int] = []
    try:
        async with durable.connect(dsn) as client, anyio.create_task_group() as tg:
            store: Store = client.store

            async def reaper() -> None:
                # Another daemon's reaper, as eager as one can be.
                while True:
                    reaped.extend(i for i, _ in await store.reap_expired())
                    await anyio.sleep(0.05)

            tg.start_soon(reaper)
            handles = await client.start_many(hostile_big_result, [(MB,)] * COUNT)
            for h in handles:
                assert len(await h.result(timeout=120)) == MB * 1024 * 1024
            tg.cancel_scope.cancel()
        async with durable.connect(dsn) as client:
            attempts = [(await client.get(h.id)).attempt for h in handles]
        assert attempts == [1] * COUNT
        assert reaped == []
        assert proc.poll() is None
    finally:
        kill(proc)
        proc.wait(timeout=30)


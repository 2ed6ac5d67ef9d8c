"""`durable bench entity`: the resume latency of one long-lived workflow by the length of
its log, fed one event at a time, warm (the daemon keeps it in memory) and cold (every
resume replays the log: DURABLE_WORKFLOW_CACHE=0)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio

import durable
from durable.settings import Settings
from durable.tools.bench_app import QUEUE, entity, entity_steps

POLL = 0.0005
"""Seconds between reads of the workflow's status while it settles into waiting."""


def buckets(limit: int) -> list[tuple[int, int]]:
    pairs = [(0, 400), (400, 800), (1200, 1600), (2000, 2400), (2800, 3200), (4800, 5200),
             (9600, 10000)]  # fmt: skip
    return [(lo, min(hi, limit)) for lo, hi in pairs if lo < limit]


async def entity_run(
    server: str,
    events: int,
    warm: bool,
    scratch: Callable[[str], Any],
    progress_bar: Callable[[str, int, bool], Any],
    progress: bool,
) -> tuple[str, dict[str, Any], bool, list[str]]:
    """One run of ``events`` log positions (two per event: the wait and the step), in the
    scratch database ``scratch(server)`` gives: its name, figures, whether it verified,
    and notes (durable.tools.bench.Result's fields)."""
    from durable.daemon import Daemon
    from durable.registry import registry
    from durable.store import connect

    n = max(1, events // 2)
    entity_steps.clear()
    settings = Settings.from_env(
        {}, queues=f"{QUEUE}=4", poll_interval="1", lease="30", log_level="warning",
        workflow_cache=1000 if warm else 0, history_warning="off",
    )  # fmt: skip
    delivery: list[tuple[int, float]] = []
    settle: list[tuple[int, float]] = []
    label = "entity-" + ("warm" if warm else "cold")
    bar = progress_bar(label, n, progress)
    async with scratch(server) as dsn:
        daemon = Daemon(settings, registry, dsn, pool_size=6)
        conn = await connect(dsn)
        try:
            async with anyio.create_task_group() as tg, durable.connect(dsn) as client:
                await tg.start(daemon.run)
                handle = await client.start(entity, n)
                await _until_waiting(conn, handle.id)
                for i in range(n):
                    sent = time.perf_counter()
                    await client.send_event(handle.id, "e", i)
                    # The step appends its start time and signals nothing else.
                    while len(entity_steps) <= i:  # noqa: ASYNC110
                        await anyio.sleep(POLL)
                    delivery.append((2 * i, entity_steps[i] - sent))
                    if i + 1 < n:
                        await _until_waiting(conn, handle.id)
                        settle.append((2 * i + 1, time.perf_counter() - entity_steps[i]))
                    bar.update(i + 1)
                total = await handle.result(timeout=60)
                daemon.stop()
            counts = daemon.metrics.workflows
        finally:
            await conn.close()
    bar.close()
    figures: dict[str, Any] = {"events": 2 * n}
    for lo, hi in buckets(2 * n):
        d = [s for pos, s in delivery if lo <= pos < hi or (hi == 2 * n and pos == hi)]
        e = [s for pos, s in settle if lo <= pos < hi]
        if d:
            figures[f"delivery_ms_{lo}_{hi}"] = round(statistics.mean(d) * 1000, 2)
        if e:
            figures[f"settle_ms_{lo}_{hi}"] = round(statistics.mean(e) * 1000, 2)
    figures.update(warm=counts.warm, cold=counts.cold, events_loaded=counts.loaded,
                   events_replayed=counts.replayed)  # fmt: skip
    expected = sum(i + 1 for i in range(n))
    verified = (
        total == expected
        and len(entity_steps) == n
        and (counts.warm == n if warm else counts.cold == n)
    )
    return (
        label,
        figures,
        verified,
        ["delivery: send_event to the next step starting; settle: that step starting "
               "to the workflow waiting again (its checkpoint, the next wait, the suspend)"],
    )  # fmt: skip


async def _until_waiting(conn: Any, task_id: int) -> None:
    # A status the database holds: read until it says so (nothing notifies a suspension).
    while (  # noqa: ASYNC110
        await conn.fetchval("select status from durable.tasks where id = $1", task_id) != "waiting"
    ):
        await anyio.sleep(POLL)

"""How `durable bench` turns what the database recorded into its figures."""

from __future__ import annotations

import uuid

from durable.tools.bench import drain_once_all_serve
from durable.tools.bench_app import QUEUE
from tests.support.helpers import execute


async def _finished(dsn: str, rows: list[tuple[uuid.UUID, float, float]]) -> None:
    """Finished bench tasks: (daemon, first claimed, finished), in seconds from an origin."""
    for worker, started, finished in rows:
        await execute(
            dsn,
            "insert into durable.tasks (queue, name, status, worker_id, started_at, finished_at)"
            " values ($1, 'bench.noop', 'completed', $2,"
            " timestamptz '2026-01-01' + make_interval(secs => $3),"
            " timestamptz '2026-01-01' + make_interval(secs => $4))",
            QUEUE, worker, float(started), float(finished),
        )


async def test_scale_times_the_drain_from_the_moment_every_daemon_serves(dsn: str) -> None:
    # Daemon a claims first (t=0) and has finished two tasks when daemon b makes its first
    # claim (t=1); the last task finishes at t=3: six tasks in the two seconds in which
    # both served, 3 a second, whatever the processes spent starting.
    a, b = uuid.uuid4(), uuid.uuid4()
    rows = [(a, 0, 0.5), (a, 0, 1.0), (a, 1.5, 2.0), (a, 2, 3.0),
            (b, 1, 1.5), (b, 1, 2.5), (b, 1.5, 2.0), (b, 2, 2.8)]
    await _finished(dsn, rows)
    assert await drain_once_all_serve(dsn, 2, len(rows)) == 3.0
    # Only two daemons ever claimed: there is no moment when four served.
    assert await drain_once_all_serve(dsn, 4, len(rows)) is None


async def test_scale_has_no_drain_figure_when_all_was_done_before_the_last_daemon_served(
    dsn: str,
) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    await _finished(dsn, [(a, 0, 1.0), (a, 0, 1.5), (b, 2, 2.0)])
    assert await drain_once_all_serve(dsn, 2, 3) is None

"""The per-child cost tests/faults/test_fan_out.py holds a fan-out to counts the fan-out's
own statements, never those a daemon sends on a timer: however long the measure lasts (a
loaded server), the count is the same."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.apps import fan_out_app as app
from tests.faults.test_fan_out import seed_history, session, spent
from tests.support.helpers import BASE, wait_for

pytestmark = pytest.mark.slow

HELD = 3 * max(float(BASE["poll_interval"]), float(BASE["lease"]) / 3)
"""Seconds a measure is held open: past several polls and heartbeats of a test daemon."""


def held_open(dsn: str) -> Callable[[], Awaitable[None]]:
    """A hold of HELD seconds on the database's clock. What is tested is the passing of
    time itself: nothing the daemon does says when enough of it has."""

    async def hold() -> None:
        async with session(dsn) as conn:
            start = await conn.fetchval("select clock_timestamp()")

            async def passed() -> bool:
                return bool(await conn.fetchval(
                    "select clock_timestamp() - $1 > make_interval(secs => $2)", start, HELD
                ))  # fmt: skip

            await wait_for(passed, timeout=HELD + 30, interval=0.2)

    return hold


@pytest.mark.timeout(180)
async def test_a_measure_held_open_counts_what_one_stopped_at_once_counts(dsn: str) -> None:
    # The measure counted every statement the daemon sent while it ran: the poll, the
    # timers' and schedules' looks, heartbeats, the catalog's publication. Held open, a
    # daemon spent more blocks the longer it was held; so, on a loaded server, did a
    # fan-out of 400 children, per child, against one of 40.
    await seed_history(dsn)
    await spent(dsn, app.each, 0)  # the first start publishes the catalog
    at_once = await spent(dsn, app.each, 0)
    held = await spent(dsn, app.each, 0, held_open(dsn))
    assert held["blocks"] <= at_once["blocks"] + 10, (at_once, held)

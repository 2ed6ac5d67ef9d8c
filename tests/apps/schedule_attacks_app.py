"""A scheduled task for the schedule attacks' subprocess daemon (``--app
tests.apps.schedule_attacks_app``)."""

from __future__ import annotations

import durable

QUEUE = "sa_skew"


@durable.task(queue=QUEUE, schedule="* * * * *")
async def sa_every_minute() -> None:
    return None

"""A task that reports its daemon's garbage collector settings (``--app tests.apps.gc_tasks``)."""

from __future__ import annotations

import gc

import durable

QUEUE = "gc"


@durable.task(queue=QUEUE)
async def gc_settings() -> dict[str, object]:
    return {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count()}

"""The step functions every version of workflow `ship` calls (tests.apps.ship_*)."""

from __future__ import annotations

import os
import time

import anyio


async def label(order: str) -> str:
    gate = os.environ.get("SHIP_LABEL_GATE")
    if gate and order == "held":
        # Held while the file exists: the daemon running it is killed mid-step (tests/faults).
        while await anyio.Path(gate).exists():  # noqa: ASYNC110 (another process's file)
            await anyio.sleep(0.05)
    return f"L-{order}"


def notify(order: str) -> bool:
    return True


def insure(order: str) -> str:
    if os.environ.get("SHIP_INSURE_HANGS"):
        time.sleep(3600)  # a daemon killed while the step runs (tests/faults)
    return f"I-{order}"

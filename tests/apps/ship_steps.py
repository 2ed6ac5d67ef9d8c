"""The step functions every version of workflow `ship` calls (tests.apps.ship_*)."""

from __future__ import annotations

import os
import time


def label(order: str) -> str:
    return f"L-{order}"


def notify(order: str) -> bool:
    return True


def insure(order: str) -> str:
    if os.environ.get("SHIP_INSURE_HANGS"):
        time.sleep(3600)  # a daemon killed while the step runs (tests/faults)
    return f"I-{order}"

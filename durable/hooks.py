"""Seams through which the test kit (``durable.testing``) steers an in-process daemon: the
clock a test moves, and faults injected at a named call.

A daemon built without hooks (every daemon but a test's) skips each seam on a ``None``
check and pays nothing else.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

from durable.models import Claimed


class Hooks(Protocol):
    def shift(self) -> timedelta:
        """How far the test has moved the clock. The database keeps its own time and the
        test kit moves the stored deadlines instead; what a workflow reads as the time
        (``ctx.now()``, ``ctx.sleep_until``) adds this much."""
        ...

    async def before_call(self, task: Claimed, kind: str, name: str) -> None:
        """Before user code runs: a step's or transaction's function (``kind`` "step" or
        "transaction", ``name`` the step's), or a task's or workflow's function (``kind``
        "task" or "workflow", ``name`` its name). Raising fails that call as if the code
        had raised; it may also stop the worker and never return."""
        ...

    async def after_call(self, task: Claimed, kind: str, name: str) -> None:
        """After a step's function returned or raised, before its checkpoint is written:
        the window in which a crash makes the step run again."""
        ...

    async def backoff(self, seconds: float) -> None:
        """A step's backoff short enough to be waited inside the run (``steps``), in place
        of sleeping it. Longer ones are durable sleeps, on the moved clock."""
        ...

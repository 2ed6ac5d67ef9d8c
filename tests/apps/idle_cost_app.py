"""The app `bin/idle-cost` runs its daemons with (``durable run --app
tests.apps.idle_cost_app``): one task, and a count of every statement the process sends.

Every connection the process opens gets asyncpg's query logger; the count goes to the
file named by ``IDLE_COST_COUNT`` twice a second (written aside, then renamed over it).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import asyncpg.connection

import durable

_sent = [0]
_opened = asyncpg.connection.Connection.__init__


def _count(record: object) -> None:
    _sent[0] += 1


def _init(self: asyncpg.connection.Connection, *args: Any, **kwargs: Any) -> None:
    _opened(self, *args, **kwargs)
    self.add_query_logger(_count)


def _write(path: str) -> None:
    while True:
        with open(path + ".tmp", "w") as f:
            f.write(f"{_sent[0]}\n")
        os.replace(path + ".tmp", path)
        time.sleep(0.5)


if (_path := os.environ.get("IDLE_COST_COUNT")) is not None:
    # Patched on the class: the pool opens its connections deep inside asyncpg.
    asyncpg.connection.Connection.__init__ = _init  # type: ignore[method-assign,assignment]
    threading.Thread(target=_write, args=(_path,), daemon=True).start()


@durable.task(name="idle_noop", queue="q0")
async def idle_noop(x: int = 0) -> int:
    return x

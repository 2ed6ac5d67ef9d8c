"""Registered through a test entry point (tests/unit/test_registry.py)."""

from __future__ import annotations

import durable


@durable.task(name="ep_loaded_task")
async def ep_loaded_task() -> str:
    return "loaded through an entry point"

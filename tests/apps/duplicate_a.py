from __future__ import annotations

import durable


@durable.task(name="dup_clash")
async def first() -> None:
    return None

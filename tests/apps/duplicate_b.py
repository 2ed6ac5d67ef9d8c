from __future__ import annotations

import durable


@durable.task(name="dup_clash")
async def second() -> None:
    return None

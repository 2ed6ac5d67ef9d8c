from __future__ import annotations

import durable
from tests.support.helpers import running_daemon


@durable.task
async def smoke_hello(name: str) -> str:
    return f"hello {name}"


async def test_hello_world(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn):
        handle = await client.start(smoke_hello, "world")
        assert await handle.result(timeout=10) == "hello world"
        info = await client.get(handle.id)
        assert info.status == "completed" and info.attempt == 1

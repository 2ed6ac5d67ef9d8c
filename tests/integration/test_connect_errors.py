"""A failure to connect names the server it tried, never the password, on either loop:
under uvloop (the daemon's loop, and many applications') a refused connection said only
"[Errno 111] Connection refused"."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

import durable
from durable.store import connect

URL = "postgresql://bob:s3cret-pw@127.0.0.1:1/nowhere"
LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


async def _client() -> None:
    async with durable.connect(URL):
        pass


async def _connection() -> None:
    await connect(URL)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("opening", [_client, _connection])
def test_a_refused_connection_names_the_server_not_the_password(
    loop: str, opening: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    with pytest.raises(ConnectionRefusedError) as info:
        LOOPS[loop](opening())
    assert "s3cret-pw" not in str(info.value)
    assert "127.0.0.1:1" in str(info.value), str(info.value)
    assert info.value.errno is not None

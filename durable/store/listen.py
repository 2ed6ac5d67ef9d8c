"""A dedicated connection LISTENing for notifications (never from the pool)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

from durable.store.schema import connect, queries


class Subscription:
    """A dedicated connection LISTENing on channels (not from the pool)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(
        cls,
        dsn: str | None,
        channels: dict[str, Callable[[str], None]],
        on_lost: Callable[[], None],
        timeout: float = 10.0,
    ) -> Subscription:
        conn = await connect(
            dsn, timeout=timeout, server_settings={"application_name": "durable-listener"}
        )
        try:
            for channel, callback in channels.items():
                await conn.add_listener(channel, _relay(callback))
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(lambda _c: on_lost())
        return cls(conn)

    async def ping(self, timeout: float) -> None:
        """A round trip; raises if the server does not answer within ``timeout``."""
        await self._conn.fetchval(queries()["ping"], timeout=timeout)

    @property
    def backend_pid(self) -> int:
        return self._conn.get_server_pid()

    def is_closed(self) -> bool:
        return self._conn.is_closed()

    async def close(self) -> None:
        if self._conn.is_closed():
            return
        try:
            await self._conn.close(timeout=2)
        except Exception:
            self._conn.terminate()

    def terminate(self) -> None:
        self._conn.terminate()


def _relay(callback: Callable[[str], None]) -> Callable[..., None]:
    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        callback(payload)

    return on_notify

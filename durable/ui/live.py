"""Live updates: one LISTEN connection per dashboard on the channels the daemons use,
fanned out to every open page as server-sent events.

A page is told *that* something changed (a queue got work, a task someone waits for
finished, a cancel), never sent rows: it then reloads the parts of itself that show it,
each from an index. A notification is a hint, as for the daemons; pages also refresh on a
slow tick (TICK) because completions notify only the tasks someone waits for, and a task
page re-reads its own row while the task runs, since a workflow's steps notify nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskStatus

from durable.logs import get_logger, redact
from durable.store import Subscription

log = get_logger("durable.ui")

CHANNELS = ("durable_ready", "durable_done", "durable_control")
TICK = 5.0
"""Seconds between the refreshes a page makes without a notification."""
QUEUE_SIZE = 64


class LiveHub:
    """Relays notifications to the pages subscribed; reconnects when its connection goes."""

    def __init__(self, dsn: str | None) -> None:
        self.dsn = dsn
        self.connected = False
        self.closing = False
        """The server is stopping: every page's stream ends (see close)."""
        self._subscribers: set[asyncio.Queue[tuple[str, str]]] = set()

    def close(self) -> None:
        """End the pages' streams, each at its next read: left open, they outlast the
        server's grace period for its connections and are cancelled, which it logs as an
        error with a traceback. A page reconnects on its own (to the next server)."""
        self.closing = True
        self.publish("closing", "")

    def publish(self, channel: str, payload: str) -> None:
        for queue in list(self._subscribers):
            # A page that is behind drops the event: it reloads on the next one it reads.
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait((channel, payload))

    def _relay(self, channel: str) -> Callable[[str], None]:
        return lambda payload: self.publish(channel, payload)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[tuple[str, str]]]:
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        delay = 0.1
        while True:
            lost = anyio.Event()
            try:
                sub = await Subscription.open(
                    self.dsn, {c: self._relay(c) for c in CHANNELS}, lost.set
                )
            except Exception as exc:
                log.warning("ui_listen_failed", error=redact(f"{type(exc).__name__}: {exc}"))
                if not started:
                    started = True
                    task_status.started()  # the pages work without it, refreshing on ticks
                await anyio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.1
            self.connected = True
            # Whatever changed while no connection listened: every page looks again.
            self.publish("reconnected", "")
            if not started:
                started = True
                task_status.started()
            try:
                while not lost.is_set() and not sub.is_closed():
                    with anyio.move_on_after(10.0):
                        await lost.wait()
                    if not lost.is_set():
                        try:
                            await sub.ping(5.0)
                        except Exception:
                            sub.terminate()
                            break
            finally:
                self.connected = False
                with anyio.CancelScope(shield=True):
                    await sub.close()


def sse(event: str, data: dict[str, object]) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()

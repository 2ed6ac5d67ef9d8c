"""The dedicated LISTEN connection: keepalives, reconnect with backoff, catch-up."""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from durable.logs import get_logger, redact
from durable.store import Subscription, is_transient

log = get_logger("durable.listener")

READY_CHANNEL = "durable_ready"
CONTROL_CHANNEL = "durable_control"


class Listener:
    """Delivers `durable_ready` (payload: queue) and `durable_control` notifications.

    A notification is only a hint to look again; after every reconnect ``on_reconnect``
    runs so the daemon polls once for what it may have missed while disconnected.
    """

    def __init__(
        self,
        dsn: str | None,
        *,
        on_ready: Callable[[str], None],
        on_control: Callable[[str], None],
        on_reconnect: Callable[[], None],
        keepalive: float = 10.0,
        ping_timeout: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.on_ready = on_ready
        self.on_control = on_control
        self.on_reconnect = on_reconnect
        self.keepalive = keepalive
        self.ping_timeout = ping_timeout
        self.connected = False
        self.reconnects = 0
        self.backend_pid: int | None = None
        self.last_error: str | None = None
        """Why the last connect failed, while the listener is down (shown on /readyz)."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        first = True
        delay = 0.1
        while True:
            # One event per connection: a connection's termination callback comes later
            # (call_soon), often after the next one is open, and must not mark that one lost.
            lost = anyio.Event()
            try:
                sub = await Subscription.open(
                    self.dsn,
                    {READY_CHANNEL: self.on_ready, CONTROL_CHANNEL: self.on_control},
                    lost.set,
                )
            except Exception as exc:
                # At startup an error that is not a blip is a misconfiguration: stop and
                # say so. Once serving, keep trying whatever the error (a rotated
                # password, a revoked CONNECT): running tasks go on meanwhile, claims
                # fall back to polling, and /readyz reports it.
                if first and not is_transient(exc):
                    raise
                error = redact(f"{type(exc).__name__}: {exc}")
                (log.warning if is_transient(exc) else log.error)(
                    "listener_connect_failed", error=error, retry_in=round(delay, 2),
                )
                self.last_error = error
                await anyio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.1
            self.last_error = None
            self.connected = True
            self.backend_pid = sub.backend_pid
            if first:
                first = False
                log.info("listener_started", backend_pid=sub.backend_pid)
                task_status.started()
            else:
                self.reconnects += 1
                log.info("listener_reconnected", backend_pid=sub.backend_pid)
                self.on_reconnect()
            try:
                await self._watch(sub, lost)
            except BaseException:
                # Stopping: no goodbye. On a path that stopped answering a graceful close
                # would wait for its timeout after the stop's last writes, past its bound;
                # the server just sees the socket close.
                self.connected = False
                sub.terminate()
                raise
            self.connected = False
            with anyio.CancelScope(shield=True):
                await sub.close()
            log.warning("listener_lost")

    async def _watch(self, sub: Subscription, lost: anyio.Event) -> None:
        """Return when the connection is gone or stops answering (a half-open socket)."""
        while True:
            with anyio.move_on_after(self.keepalive):
                await lost.wait()
            if lost.is_set() or sub.is_closed():
                return
            try:
                await sub.ping(self.ping_timeout)
            except Exception as exc:
                # Whatever the error, this connection is done for: open another.
                log.warning("listener_ping_failed", error=redact(f"{type(exc).__name__}: {exc}"))
                sub.terminate()
                return

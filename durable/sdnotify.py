"""The systemd notify protocol, spoken directly: one datagram to $NOTIFY_SOCKET per message.

``durable run`` under a ``Type=notify`` unit sends ``READY=1`` once it serves its queues,
``STOPPING=1`` when shutdown begins, and ``WATCHDOG=1`` every half ``WatchdogSec`` while it
is healthy. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify", "socket_address", "watchdog_interval"]


def socket_address(env: Mapping[str, str] | None = None) -> str | None:
    """The AF_UNIX address from $NOTIFY_SOCKET: a path, or an abstract name ('@' -> NUL)."""
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, empty, or a transport we do not speak (vsock:...)


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``STATUS=...``, newline-separated) to systemd.

    Returns False, doing nothing, when $NOTIFY_SOCKET is unset or the send fails: the
    service manager's bookkeeping must never take the daemon down.
    """
    address = socket_address(env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A full receive buffer would block the event loop; drop the message instead.
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of $WATCHDOG_USEC), or None when the
    watchdog is off or meant for another process ($WATCHDOG_PID names a different pid)."""
    env = os.environ if env is None else env
    owner = env.get("WATCHDOG_PID", "").strip()
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "").strip())
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000

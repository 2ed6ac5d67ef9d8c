"""The names the dashboard answers to: its defence against DNS rebinding.

A web page the operator visits can point a name of its own at 127.0.0.1 once the browser
has loaded it (DNS rebinding); its scripts then reach the dashboard as if from the same
origin, and read whatever a read-only dashboard shows: task arguments, results, errors.
The request still names the attacker's host in its ``Host`` header, which is what this
checks. A dashboard listening on a loopback address answers only to loopback names
(``localhost``, ``*.localhost``, 127.0.0.0/8, ``::1``) and to the names of
DURABLE_UI_ALLOWED_HOSTS (a reverse proxy that keeps the visitor's ``Host``). Listening
elsewhere, it answers to any name unless DURABLE_UI_ALLOWED_HOSTS is set.

The daemon's probes (/healthz, /readyz, /metrics, with DURABLE_UI=on) are not checked:
machines call them by whatever address reaches the pod or host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def name_of(header: str) -> str | None:
    """The host name of a ``Host`` header (no port, no brackets, lower case), or None
    when it is not of the form host[:port]."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and not _port(text[end + 1 :])):
            return None
        return text[1:end] or None
    host, colon, port = text.partition(":")
    if colon and not _port(colon + port):
        return None
    return host.rstrip(".") or None


def _port(text: str) -> bool:
    return text.startswith(":") and text[1:].isascii() and text[1:].isdigit() and len(text) <= 6


def is_loopback(name: str) -> bool:
    """A name that can only mean this machine: ``localhost`` and its subdomains (RFC
    6761), a loopback address."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Hosts:
    """Whether a request's ``Host`` names this dashboard, listening on ``bound``."""

    def __init__(self, bound: str, allowed: Iterable[str] = ()) -> None:
        self.allowed = frozenset(name.lower().rstrip(".") for name in allowed)
        self.checked = bool(self.allowed) or is_loopback(bound.lower())
        """Listening on a loopback address, or told which names to answer to."""

    def answers(self, header: str | None) -> bool:
        if not self.checked or header is None:
            # No browser sends a request without Host; a missing one is no rebinding.
            return True
        name = name_of(header)
        return name is not None and (is_loopback(name) or name in self.allowed)


class HostCheck:
    """ASGI middleware: 403 for a request whose ``Host`` the dashboard does not answer to,
    outside ``exempt`` (the probes)."""

    def __init__(self, app: ASGIApp, hosts: Hosts, exempt: Iterable[str] = ()) -> None:
        self.app = app
        self.hosts = hosts
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.exempt:
            header = _header(scope, b"host")
            if not self.hosts.answers(header):
                refused: Any = PlainTextResponse(
                    f"refused: this dashboard does not answer to the host {header!r} "
                    "(DURABLE_UI_ALLOWED_HOSTS names those it answers to besides localhost)",
                    403,
                )
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _header(scope: Scope, key: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == key:
            return bytes(value).decode("latin-1")
    return None

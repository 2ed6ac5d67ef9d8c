"""Serving the dashboard: uvicorn on a socket bound before it starts (so a port in use
stops the start with one line), inside the caller's task group, without taking over its
signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from starlette.applications import Starlette

from durable.errors import DurableError
from durable.logs import get_logger
from durable.settings import Settings
from durable.store import Store
from durable.ui.app import Probe, create_app
from durable.ui.auth import Auth
from durable.ui.hosts import Hosts
from durable.ui.live import LiveHub

log = get_logger("durable.ui")

DASHBOARD_SESSION = {"plan_cache_mode": "force_custom_plan", "search_path": "pg_catalog, pg_temp"}
"""The dashboard's pool plans each statement for its parameters: a filter left out drops
out of the plan, so one given can use its index (see sql/dashboard.sql)."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The process that runs us (the daemon, `durable ui`) handles its signals.
        yield


def auth_from(settings: Settings) -> Auth | None:
    """The secret that enables actions, from DURABLE_UI_TOKEN_FILE or
    DURABLE_UI_PASSWORD_FILE (not both)."""
    if settings.ui_token_file is not None and settings.ui_password_file is not None:
        raise DurableError("DURABLE_UI_TOKEN_FILE and DURABLE_UI_PASSWORD_FILE are both set: give one")
    if settings.ui_token_file is not None:
        return Auth.from_file("DURABLE_UI_TOKEN_FILE", settings.ui_token_file, "token")
    if settings.ui_password_file is not None:
        return Auth.from_file("DURABLE_UI_PASSWORD_FILE", settings.ui_password_file, "password")
    return None


class UiServer:
    """The dashboard on host:port, over its own small pool and LISTEN connection."""

    def __init__(
        self, host: str, port: int, dsn: str | None, auth: Auth | None,
        probes: dict[str, Probe] | None = None, allowed_hosts: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        self.host = host
        self.hosts = Hosts(host, allowed_hosts)
        self.port = port
        self.dsn = dsn
        self.auth = auth
        self.probes = probes
        self._socket: socket.socket | None = None
        self._server: _Server | None = None

    async def listen(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), self.port))
        except OSError as exc:
            sock.close()
            raise DurableError(
                f"dashboard: cannot listen on {self.host or '*'}:{self.port}: {exc.strerror or exc}"
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._socket = sock

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self._socket is None:
            await self.listen()
        assert self._socket is not None
        store = await Store.open(self.dsn, min_size=1, max_size=4, name="durable-ui",
                                 server_settings=DASHBOARD_SESSION)  # fmt: skip
        hub = LiveHub(self.dsn)
        app: Starlette = create_app(store, hub, self.auth, self.probes, self.hosts)
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=1, log_level=logging.WARNING,
        )  # fmt: skip
        self._server = _Server(config)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(hub.run)
                serving = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
                try:
                    # uvicorn says it started only by a flag.
                    while not self._server.started and not serving.done():  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                    if serving.done():
                        serving.result()
                    log.info("ui_started", host=self.host or "*", port=self.port,
                             actions=self.auth is not None)  # fmt: skip
                    task_status.started()
                    await asyncio.shield(serving)
                finally:
                    hub.close()
                    self._server.should_exit = True
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await asyncio.wait([serving])
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
            self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._socket is not None:
            self._socket.close()


def url_of(host: str, port: int) -> str:
    shown = host if host and host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/"



async def daemon_endpoint(settings: Settings, dsn: str | None, probes: Any) -> UiServer:
    """DURABLE_HTTP with DURABLE_UI=on: the dashboard and the daemon's probes on one port."""
    assert settings.http is not None
    host, port = settings.http
    server = UiServer(host, port, dsn, auth_from(settings), probes.routes(),
                      settings.ui_allowed_hosts)
    await server.listen()
    return server

"""The daemon's HTTP endpoint (``DURABLE_HTTP``): /healthz, /readyz and /metrics.

A deliberately tiny HTTP/1.1 server on ``asyncio.start_server``: GET and HEAD only, one
request per connection, bounded reads. Enough for Kubernetes probes and Prometheus.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
from anyio.abc import TaskStatus

from durable.errors import DurableError
from durable.logs import get_logger, redact
from durable.store import latest_version, schema_problem

if TYPE_CHECKING:
    from durable.metrics import ListenerState, Metrics
    from durable.settings import Settings
    from durable.store import Store
    from durable.ui.server import UiServer

log = get_logger("durable.http")

Response = tuple[int, str, bytes]
"""(status code, content type, body)."""

Route = Callable[[], Awaitable[Response]]
Endpoint: TypeAlias = "HttpServer | UiServer"
"""What serves DURABLE_HTTP: this module's server, or the dashboard's (DURABLE_UI=on)."""

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
"""What ``generate_latest`` writes: the classic text format every Prometheus reads."""
PROBE_TIMEOUT = 2.0
"""Seconds the database gets to answer a probe's query."""


class HttpServer:
    """Serves ``routes`` (path -> handler) on host:port until cancelled."""

    def __init__(
        self, host: str, port: int, routes: Mapping[str, Route], *, read_timeout: float = 5.0
    ) -> None:
        self.host = host
        self.port = port
        """The port asked for; once listening, the port bound (port 0 picks one)."""
        self.routes = routes
        self.read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def listen(self) -> None:
        """Bind the socket (an OSError says why not); ``run`` then serves it."""
        # An empty host listens on every interface (IPv4 and IPv6).
        self._server = await asyncio.start_server(self._handle, self.host or None, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("http_started", host=self.host or "*", port=self.port, paths=sorted(self.routes))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self._server is None:
            await self.listen()
        assert self._server is not None
        try:
            task_status.started()
            await self._server.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for handler in list(self._handlers):
            handler.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return  # a client that sent no complete request gets nothing
            method, path = _request_line(head)
            status, ctype, body = await self._respond(method, path)
            extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
            writer.write(
                (
                    f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    f"Cache-Control: no-store\r\n{extra}Connection: close\r\n\r\n"
                ).encode("latin-1")
                + (b"" if method == "HEAD" else body)
            )
            # A client that stops reading would hold this task, and the socket, for ever.
            async with asyncio.timeout(self.read_timeout):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            # close() would wait for a buffer the client never reads: drop it instead.
            writer.transport.abort()
        except asyncio.CancelledError:
            # close(): nothing awaits this task (and Python 3.11's stream callback logs
            # a cancelled one as an error).
            writer.transport.abort()
        finally:
            writer.close()
            if task is not None:
                self._handlers.discard(task)

    async def _respond(self, method: str | None, path: str | None) -> Response:
        if method is None or path is None:
            return 400, JSON, _json({"error": "malformed request"})
        route = self.routes.get(path)
        if route is None:
            return 404, JSON, _json({"error": f"no such path; try {', '.join(sorted(self.routes))}"})
        if method not in ("GET", "HEAD"):
            return 405, JSON, _json({"error": "only GET and HEAD"})
        try:
            return await route()
        except Exception:
            log.exception("http_handler_error", path=path)
            return 500, JSON, _json({"error": "internal error"})


def _request_line(head: bytes) -> tuple[str | None, str | None]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None, None
    return parts[0], parts[1].split("?", 1)[0]


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


class Probes:
    """The handlers: liveness, readiness and metrics of one daemon."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        listener: Callable[[], ListenerState | None],
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.listener = listener
        self.stopping = stopping

    def routes(self) -> dict[str, Route]:
        return {"/healthz": self.healthz, "/readyz": self.readyz, "/metrics": self.scrape}

    async def healthz(self) -> Response:
        """200 while the database answers a round trip within PROBE_TIMEOUT, else 503."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT * 2):
                await self.store.ping(PROBE_TIMEOUT)
        except Exception as exc:
            error = redact(f"{type(exc).__name__}: {exc}")
            return 503, JSON, _json({"status": "unhealthy", "database": False, "error": error})
        return 200, JSON, _json({"status": "ok", "database": True})

    async def readyz(self) -> Response:
        """200 while the listener is connected and the schema is the one this code needs
        (or newer), until the daemon begins to stop (it claims nothing more)."""
        listener = self.listener()
        connected = listener is not None and listener.connected
        expected = latest_version()
        version: int | None = None
        error = None
        try:
            async with asyncio.timeout(PROBE_TIMEOUT * 2):
                version = await self.store.schema_version(PROBE_TIMEOUT)
        except Exception as exc:
            error = redact(f"{type(exc).__name__}: {exc}")
        # A newer schema is served (a rolling deploy migrates before it replaces daemons).
        stopping = self.stopping()
        ready = connected and error is None and schema_problem(version) is None and not stopping
        body: dict[str, Any] = {
            "status": "ready" if ready else "unready",
            "listener": connected,
            "schema": version,
            "expected_schema": expected,
            "stopping": stopping,
        }
        if error is not None:
            body["error"] = error
        if listener is not None and listener.last_error is not None and not connected:
            body["listener_error"] = listener.last_error
        return (200 if ready else 503), JSON, _json(body)

    async def scrape(self) -> Response:
        await self.metrics.refresh_depth(self.store)
        return 200, PROMETHEUS, self.metrics.render()


async def endpoint(
    host: str,
    port: int,
    store: Store,
    metrics: Metrics,
    listener: Callable[[], ListenerState | None],
    ui: tuple[Settings, str | None] | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> Endpoint:
    """DURABLE_HTTP's server, its socket bound now so that a port in use stops the start
    cleanly, with one line saying why. With ``ui`` (DURABLE_UI=on: the settings and the
    database URL) the dashboard's server, which serves the same probes beside it."""
    probes = Probes(store, metrics, listener, stopping)
    if ui is not None:
        from durable.ui.server import daemon_endpoint

        return await daemon_endpoint(ui[0], ui[1], probes)
    server = HttpServer(host, port, probes.routes())
    try:
        await server.listen()
    except OSError as exc:
        # asyncio's bind error reads "error while attempting to bind on ...: <reason>".
        reason = (exc.strerror or str(exc)).rpartition(": ")[2] or repr(exc)
        raise DurableError(
            f"DURABLE_HTTP: cannot listen on {host or '*'}:{port}: {reason}"
        ) from None
    return server

"""The daemon's HTTP endpoint (``DURABLE_HTTP``): /healthz, /readyz and /metrics.

A deliberately tiny HTTP/1.1 server on ``asyncio.start_server``: GET and HEAD only, one
request per connection, bounded reads, a bounded number of connections at once. Enough for
Kubernetes probes and Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import re
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
READ_TIMEOUT = 5.0
"""Seconds a client gets to send its request, and again to take the answer (read when an
endpoint starts)."""
MAX_CONNECTIONS = 64
"""Connections served at once, unless DURABLE_HTTP_MAX_CONNECTIONS says otherwise."""


class HttpServer:
    """Serves ``routes`` (path -> handler) on host:port until cancelled."""

    def __init__(
        self, host: str, port: int, routes: Mapping[str, Route], *,
        read_timeout: float = READ_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
    ) -> None:  # fmt: skip
        self.host = host
        self.port = port
        """The port asked for; once listening, the port bound (port 0 picks one)."""
        self.routes = routes
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.refused = 0
        """New connections answered 503, unread: max_connections were being answered."""
        self.dropped = 0
        """Connections closed (with a 503) to make room: the oldest still without a request."""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._waiting: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        """The connections whose request has not arrived yet, oldest first."""

    @property
    def open_connections(self) -> int:
        return len(self._handlers)

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
        # Each connection holds a descriptor for up to twice the read timeout; unbounded, a
        # flood of them leaves none for the daemon's own database connections.
        if len(self._handlers) >= self.max_connections and not self._make_room():
            self.refused += 1
            _turn_away(writer)
            return
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            self._waiting[task] = writer
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return  # a client that sent no complete request gets nothing
            finally:
                if task is not None:
                    self._waiting.pop(task, None)
            if writer.is_closing():
                return  # dropped to make room, its request arrived meanwhile
            method, path = _request_line(head)
            status, ctype, body = await self._respond(method, path)
            if not _send(writer, _answer(status, ctype, body, head_only=method == "HEAD")):
                return  # the client hung up while its answer was made
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

    def _make_room(self) -> bool:
        """Drop the connection that has waited longest for its request; False if every
        connection has sent one (the server is busy answering them)."""
        # Idle connections make way for new ones: a flood of silent clients, or a few
        # renewed every read timeout, cannot keep a liveness probe from its answer.
        if not self._waiting:
            return False
        task = next(iter(self._waiting))
        writer = self._waiting.pop(task)
        self._handlers.discard(task)
        self.dropped += 1
        _turn_away(writer)  # its handler then sees the end of the stream and returns
        return True

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


def _answer(status: int, ctype: str, body: bytes, *, head_only: bool = False) -> bytes:
    extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
    return (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\n{extra}Connection: close\r\n\r\n"
    ).encode("latin-1") + (b"" if head_only else body)


BUSY = _answer(503, JSON, _json({"error": "too many connections; try again"}))


def _send(writer: asyncio.StreamWriter, data: bytes) -> bool:
    """Write ``data``; False, writing nothing, once the connection is going. uvloop (the
    daemon's loop) raises RuntimeError on a write to a transport whose connection was lost,
    where asyncio's own loop drops the bytes."""
    if writer.is_closing():
        return False
    writer.write(data)
    return True


def _turn_away(writer: asyncio.StreamWriter) -> None:
    """Answer 503 and close, reading nothing: the answer fits the socket's buffer, so the
    descriptor is released on the loop's next turn."""
    _send(writer, BUSY)
    writer.close()


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
        return 200, PROMETHEUS, await self.metrics.render_off_loop()


async def endpoint(
    settings: Settings,
    dsn: str | None,
    store: Store,
    metrics: Metrics,
    listener: Callable[[], ListenerState | None],
    stopping: Callable[[], bool] = lambda: False,
) -> Endpoint:
    """DURABLE_HTTP's server, its socket bound now so that a port in use stops the start
    cleanly, with one line saying why. With DURABLE_UI=on the dashboard's server (on the
    database at ``dsn``), which serves the same probes beside it."""
    assert settings.http is not None
    host, port = settings.http
    probes = Probes(store, metrics, listener, stopping)
    if settings.ui:
        from durable.ui.server import daemon_endpoint

        return await daemon_endpoint(settings, dsn, probes)
    server = HttpServer(host, port, probes.routes(), read_timeout=READ_TIMEOUT,
                        max_connections=settings.http_max_connections)  # fmt: skip
    metrics.http = server
    try:
        await server.listen()
    except OSError as exc:
        # asyncio's bind error reads "error while attempting to bind on ...: <reason>", and
        # from Python 3.13 the reason starts with "[errno 98] ".
        reason = (exc.strerror or str(exc)).rpartition(": ")[2] or repr(exc)
        reason = re.sub(r"^\[errno \d+\] ", "", reason, flags=re.IGNORECASE)
        raise DurableError(
            f"DURABLE_HTTP: cannot listen on {host or '*'}:{port}: {reason}"
        ) from None
    return server

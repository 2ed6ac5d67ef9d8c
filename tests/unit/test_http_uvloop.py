"""The daemon's HTTP endpoint under uvloop, the loop ``durable run`` uses, when a client
resets its connection before its answer is written.

uvloop raises RuntimeError on a write to a transport whose connection is lost, where
asyncio's own loop drops the bytes: a probe or scrape that timed out and hung up while
its answer was computed made the handler fail with an unhandled error.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import anyio
import uvloop

from durable.http import HttpServer, Response
from tests.support.helpers import wait_for


class _Watched(HttpServer):
    """Records each connection's streams, and whatever its handler raised."""

    def __init__(self, routes: dict[str, Callable[[], Awaitable[Response]]], **kw: int) -> None:
        super().__init__("127.0.0.1", 0, routes, **kw)
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.errors: list[BaseException] = []
        self.handled = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.streams.append((reader, writer))
        try:
            await super()._handle(reader, writer)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        finally:
            self.handled += 1


def _reset(sock: socket.socket) -> None:
    """Close with a reset (RST), as a client that gives up does, not a polite FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _on_uvloop(main: Callable[[], Awaitable[None]]) -> None:
    anyio.run(main, backend_options={"use_uvloop": True})


def test_a_client_that_resets_while_its_answer_is_computed_costs_no_error() -> None:
    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        arrived, release = asyncio.Event(), asyncio.Event()

        async def slow() -> Response:
            arrived.set()
            await release.wait()
            return 200, "text/plain", b"late\n"

        async def fast() -> Response:
            return 200, "text/plain", b"fast\n"

        server = _Watched({"/slow": slow, "/fast": fast})
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
            await arrived.wait()
            _reset(client)
            reader, _ = server.streams[0]

            async def lost() -> bool:
                return reader.exception() is not None

            await wait_for(lost)  # the server's loop has seen the reset
            release.set()
            await wait_for(lambda: _done(server, 1))
            assert server.errors == []
            # And the endpoint goes on answering.
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"GET /fast HTTP/1.1\r\n\r\n")
            assert (await r.read()).startswith(b"HTTP/1.1 200 ")
            w.close()
            tg.cancel_scope.cancel()

    _on_uvloop(main)


def test_making_room_past_a_connection_that_was_just_reset_costs_no_error() -> None:
    async def main() -> None:
        server = _Watched({}, max_connections=1)
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            idle = socket.create_connection(("127.0.0.1", server.port))  # sends nothing

            async def holding() -> bool:
                return server.open_connections == 1

            await wait_for(holding)
            # Both before the loop looks again: the new client's connection is accepted,
            # and its handler runs, before the idle one's handler has seen its reset.
            new = socket.create_connection(("127.0.0.1", server.port))
            _reset(idle)
            new.sendall(b"GET /none HTTP/1.1\r\n\r\n")
            await wait_for(lambda: _done(server, 2))
            assert server.errors == []
            assert server.dropped == 1
            new.setblocking(False)
            r, w = await asyncio.open_connection(sock=new)
            assert (await r.read()).startswith(b"HTTP/1.1 404 ")
            w.close()
            tg.cancel_scope.cancel()

    _on_uvloop(main)


async def _done(server: _Watched, n: int) -> bool:
    return server.handled >= n

"""The soak's TCP proxy under uvloop, the loop ``durable run`` and the tests use, when an
end of a connection goes away while a stall holds bytes for it.

uvloop raises RuntimeError on a write to a transport whose connection is gone, where
asyncio's own loop drops the bytes: the held bytes, written once the stall ended, made
the proxy's pump fail with an unhandled error.
"""

from __future__ import annotations

import asyncio
import contextlib

import anyio
import uvloop

from durable.tools.soak.faults import LISTENER_TAG, Proxy, _Link
from tests.support.helpers import wait_for


class _Watched(Proxy):
    """Records whatever a pump raised."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.errors: list[Exception] = []

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    link: _Link | None = None) -> None:
        try:
            await super()._pump(src, dst, link)
        except Exception as exc:
            self.errors.append(exc)
            raise


def test_a_listener_cut_as_a_stall_ends_costs_no_error() -> None:
    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        accepted: list[asyncio.StreamWriter] = []

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
            writer.close()

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        proxy = _Watched(server.sockets[0].getsockname()[1])
        await proxy.start()
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            async def linked() -> bool:
                return bool(accepted)

            await wait_for(linked)
            proxy.stall()
            # A listener's startup packet: the proxy reads it and holds it back.
            writer.write(b"application_name\0" + LISTENER_TAG + b"\0")
            [link] = proxy._links

            async def held() -> bool:
                return link.listener

            await wait_for(held)
            assert proxy.cut_listeners() == 1
            # At once: the pump holding the packet writes it before the cut's callbacks
            # have told the proxy that its upstream end is gone.
            proxy.resume()

            async def ended() -> bool:
                return not proxy._links

            await wait_for(ended)
            assert proxy.errors == []
        finally:
            writer.close()
            await proxy.close()
            server.close()
            await server.wait_closed()

    anyio.run(main, backend_options={"use_uvloop": True})

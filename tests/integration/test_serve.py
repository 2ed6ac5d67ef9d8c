"""durable.serve: a daemon inside the application's event loop."""

from __future__ import annotations

import pytest

import durable


@durable.task(name="sv_double", queue="sv_q")
async def sv_double(x: int) -> int:
    return 2 * x


async def test_serve_runs_the_queue_until_idle_then_stops_on_leaving(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handles = [await client.start(sv_double, i) for i in range(20)]
        async with durable.serve(
            dsn, queues={"sv_q": 3}, env={}, poll_interval="1", lease="5", shutdown_grace="5"
        ) as service:
            await service.ready()
            await service.idle()
            assert list(service.daemon.workers) == ["sv_q"]
            assert service.settings.queue_limits == {"sv_q": 3}
            for i, h in enumerate(handles):
                info = await client.get(h.id)
                assert (info.status, info.result) == ("completed", 2 * i)
        assert service.daemon.stopping and not service.daemon.attempts


async def test_serve_in_burst_mode_ends_once_the_queue_is_empty(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handle = await client.start(sv_double, 21)
        async with durable.serve(dsn, queues=["sv_q"], env={}, burst=True) as service:
            await service.wait()
        info = await client.get(handle.id)
        assert (info.status, info.result) == ("completed", 42)


async def test_serve_needs_a_database_url() -> None:
    with pytest.raises(durable.ConfigurationError, match="no database URL"):
        async with durable.serve(env={}):
            pass  # pragma: no cover


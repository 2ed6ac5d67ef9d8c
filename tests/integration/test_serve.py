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




def test_durable_run_reads_the_schema_version_once(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `durable run` reads the version itself (its connection errors are the CLI's) and hands
    # it to the daemon: one connection and one read at startup, not two. A plain test: the
    # command runs its own event loop, and handles signals, on the main thread.
    import anyio

    import durable.store
    import durable.store.schema
    from durable.cli import main

    real = durable.store.schema.schema_version
    reads: list[int | None] = []

    async def counted(conn: object) -> int | None:
        reads.append(version := await real(conn))  # type: ignore[arg-type]
        return version

    async def start() -> int:
        async with durable.connect(dsn) as client:
            return (await client.start(sv_double, 4)).id

    async def result(task: int) -> object:
        async with durable.connect(dsn) as client:
            return (await client.get(task)).result

    # The command configures logging for the process: put back what the rest of the suite
    # logs through (structlog's default prints to stdout, where capsys reads it).
    import logging

    import structlog

    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    saved = structlog.get_config()
    monkeypatch.setattr(durable.store.schema, "schema_version", counted)
    monkeypatch.setattr(durable.store, "schema_version", counted)
    monkeypatch.setenv("DURABLE_DATABASE_URL", dsn)
    monkeypatch.setenv("DURABLE_QUEUES", "sv_q")
    task = anyio.run(start)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["run", "--burst", "--app", __name__])
    finally:
        structlog.configure(**saved)
    assert exit_.value.code == 0
    assert anyio.run(result, task) == 8
    assert len(reads) == 1 and reads[0] is not None

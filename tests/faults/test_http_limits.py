"""DURABLE_HTTP's limits: a cap on connections served at once, and /metrics rendered off
the event loop.

The daemon attacked with connections runs in a subprocess (``durable run --app`` this
module and tests/apps/http_limits_app.py, which gives its clients 300 s to send a request),
so its descriptors are counted in /proc and a connection that sends nothing holds its slot
until a newer one takes it or the test lets it go. Task names here start with ``hl_``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import durable
import durable.metrics
from durable.errors import ConfigurationError
from durable.http import HttpServer, Response
from durable.settings import Settings
from tests.support.helpers import (
    fetchval,
    kill,
    running_daemon,
    spawn_daemon,
    wait_for,
    wait_status,
)
from tests.support.pgbouncer import free_port

QUEUE = "hl_q"
CAP = 16
"""DURABLE_HTTP_MAX_CONNECTIONS of the attacked daemon."""
LEASE = "select lease_until from durable.tasks where id = $1"


@durable.task(name="hl_echo", queue=QUEUE)
async def hl_echo(x: int) -> int:
    return x


@durable.task(name="hl_hold", queue=QUEUE)
async def hl_hold() -> None:
    await asyncio.Event().wait()  # until cancelled: its lease must keep being renewed


# -- raw clients ------------------------------------------------------------------------------


async def until_closed(reader: asyncio.StreamReader, timeout: float = 30) -> bytes:
    """All the server sends until it closes the connection (b"" on a reset), at most
    ``timeout`` seconds: far less than the 300 s the daemon gives a client to speak."""
    data = b""
    with anyio.fail_after(timeout):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionError:
            pass
    return data


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await until_closed(reader)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def accept_queue(port: int) -> int:
    """Connections to 127.0.0.1:``port`` the kernel holds for the daemon to accept (the
    rx_queue of a listening socket in /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            _, local, _, state, queues, *_ = line.split()
            if state == "0A" and local == f"0100007F:{port:04X}":
                return int(queues.split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def gauges(answer: bytes) -> dict[str, float]:
    """The unlabelled samples of a /metrics answer, by name."""
    text = answer.partition(b"\r\n\r\n")[2].decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


@asynccontextmanager
async def watching(pid: int) -> AsyncIterator[list[int]]:
    """[the most descriptors ``pid`` held], read from /proc without pause while the block
    runs (a thread of its own, so the reads go on while this loop is busy)."""
    peak = [descriptors(pid)]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], descriptors(pid))

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, watch)
        try:
            yield peak
        finally:
            done.set()


@asynccontextmanager
async def limited_daemon(dsn: str, tmp_path: Path, **env: str) -> AsyncIterator[tuple[int, int]]:
    """A subprocess daemon serving QUEUE with DURABLE_HTTP on a free port: (pid, port)."""
    port = free_port()
    proc = spawn_daemon(
        dsn, "tests.faults.test_http_limits,tests.apps.http_limits_app",
        "--http", f"127.0.0.1:{port}", log=tmp_path / "daemon.log",
        DURABLE_QUEUES=f"{QUEUE}=8", DURABLE_LEASE="3", DURABLE_SHUTDOWN_GRACE="2", **env,
    )  # fmt: skip
    try:

        async def up() -> bool:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            with suppress(OSError, IndexError, ValueError):
                return status_of(await exchange(port, b"GET /readyz HTTP/1.1\r\n\r\n")) == 200
            return False

        await wait_for(up, timeout=30)
        yield proc.pid, port
    finally:
        kill(proc)
        await anyio.to_thread.run_sync(proc.wait)


# -- the connection cap -----------------------------------------------------------------------


WAVES = 4
WAVE = 500
BATCH = 50
"""Connections opened before the daemon must have accepted them all: half its listen backlog
(100), so the kernel never drops a handshake (its client would wait seconds for another)."""
SLACK = 125
"""Descriptors beyond the baseline and the cap the daemon may hold meanwhile: connections
accepted and not yet turned away, and its pool's growth."""
HEALTHZ = b"GET /healthz HTTP/1.1\r\n\r\n"


@pytest.mark.timeout(180)
async def test_silent_connections_past_the_cap_are_closed_at_once(
    dsn: str, tmp_path: Path
) -> None:
    opened: list[asyncio.StreamWriter] = []

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append(writer)
        return reader, writer

    async def accepted() -> bool:
        return accept_queue(port) == 0

    async def bounded() -> bool:
        return descriptors(pid) <= baseline + CAP + SLACK

    async with durable.connect(dsn) as client, limited_daemon(
        dsn, tmp_path, DURABLE_HTTP_MAX_CONNECTIONS=str(CAP)
    ) as (pid, port):
        try:
            baseline = descriptors(pid)
            hold = await client.start(hl_hold)
            await wait_status(dsn, hold.id, "running")
            lease: datetime = await fetchval(dsn, LEASE, hold.id)
            async with watching(pid) as peak:
                for wave in range(WAVES):
                    handle = await client.start(hl_echo, wave)
                    # Hundreds of connections that send nothing, one after another.
                    silent = []
                    for _ in range(WAVE // BATCH):
                        silent += [await connect() for _ in range(BATCH)]
                        await wait_for(accepted)
                    # All of them open on this side, the daemon holds CAP of them ...
                    await wait_for(bounded)
                    # ... the newest: each older one was answered 503 and closed, unread,
                    # as a newer one came (with 300 s to speak, none was cut by a timeout).
                    older = [await until_closed(reader) for reader, _ in silent[:-CAP]]
                    assert {status_of(a) for a in older} == {503}, older[:3]
                    assert b"too many connections" in older[0]
                    # A probe is answered: the oldest silent connection makes room for it.
                    assert status_of(await exchange(port, HEALTHZ)) == 200
                    assert status_of(await until_closed(silent[-CAP][0])) == 503
                    # The others kept their slots: asking now, each is served.
                    for reader, writer in silent[-CAP + 1 :]:
                        writer.write(HEALTHZ)
                        assert status_of(await until_closed(reader)) == 200
                    for writer in opened:
                        writer.close()
                    opened.clear()
                    # The daemon claims and completes tasks, and renews its leases, throughout.
                    assert await handle.result(timeout=30) == wave

            async def renewed() -> bool:
                return bool(await fetchval(dsn, LEASE, hold.id) > lease)

            await wait_for(renewed, timeout=30)
            assert peak[0] <= baseline + CAP + SLACK, (baseline, peak)
            # Each answer read to the end, its slot is free again.
            answer = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert status_of(answer) == 200
            counts = gauges(answer)
            assert counts["durable_http_connections"] == 1  # this scrape's own
            assert counts["durable_http_connections_dropped_total"] == WAVES * (WAVE - CAP + 1)
            assert counts["durable_http_connections_refused_total"] == 0
            await client.cancel(hold.id)

            async def released() -> bool:
                return descriptors(pid) <= baseline + 25  # the pool may have grown

            await wait_for(released, timeout=30)
        finally:
            for writer in opened:
                writer.close()


async def test_with_every_slot_answering_a_new_connection_is_refused() -> None:
    release = asyncio.Event()
    arrived: list[None] = []

    async def slow() -> Response:
        arrived.append(None)
        await release.wait()
        return 200, "text/plain", b"slow\n"

    async def fast() -> Response:
        return 200, "text/plain", b"fast\n"

    server = HttpServer("127.0.0.1", 0, {"/slow": slow, "/fast": fast}, max_connections=4)
    port = 0
    writers: list[asyncio.StreamWriter] = []

    async def ask(path: bytes) -> asyncio.StreamReader:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        if path:
            writer.write(b"GET " + path + b" HTTP/1.1\r\n\r\n")
        return reader

    async def arrivals(n: int) -> bool:
        return len(arrived) == n

    async def serving(n: int) -> bool:
        return server.open_connections == n

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            port = server.port
            busy = [await ask(b"/slow") for _ in range(3)]
            await wait_for(lambda: arrivals(3))
            idle = await ask(b"")
            await wait_for(lambda: serving(4))
            # Full: the connection without a request makes room; those being answered stay.
            assert status_of(await until_closed(await ask(b"/fast"))) == 200
            assert status_of(await until_closed(idle)) == 503
            busy.append(await ask(b"/slow"))
            await wait_for(lambda: arrivals(4))
            # Every slot answering a request: a new connection is turned away, unread.
            assert status_of(await until_closed(await ask(b"/fast"))) == 503
            assert (server.dropped, server.refused) == (1, 1)
            release.set()
            assert [status_of(await until_closed(r)) for r in busy] == [200] * 4
            # Their slots free again, a probe is answered.
            assert status_of(await until_closed(await ask(b"/fast"))) == 200
            tg.cancel_scope.cancel()
    finally:
        for writer in writers:
            writer.close()


def test_the_cap_is_a_setting() -> None:
    assert Settings.from_env({}).http_max_connections == 64
    assert Settings.from_env({"DURABLE_HTTP_MAX_CONNECTIONS": " 200 "}).http_max_connections == 200
    assert Settings.from_env({}, http_max_connections="8").http_max_connections == 8
    for bad in ("0", "-1", "ten", "1.5", "10001", "64k"):
        with pytest.raises(ConfigurationError) as caught:
            Settings.from_env({"DURABLE_HTTP_MAX_CONNECTIONS": bad})
        assert str(caught.value) == (
            f"DURABLE_HTTP_MAX_CONNECTIONS: expected a whole number from 1 to 10000, got {bad!r}"
        )
    with pytest.raises(ConfigurationError, match=r"^--http-max-connections: expected a whole"):
        Settings.from_env({}, http_max_connections="none")


# -- /metrics off the event loop --------------------------------------------------------------


async def test_a_heavy_scrape_leaves_the_loop_to_heartbeats_and_claims(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with durable.connect(dsn) as client, running_daemon(
        dsn, http="127.0.0.1:0", queues=QUEUE, lease="1"
    ) as daemon:
        assert daemon.http is not None
        port = daemon.http.port
        # The series of a daemon that ran five names on each of 1,000 queues.
        for q in range(1000):
            for n in range(5):
                series = daemon.metrics.task(f"hl_load_{q}", f"hl_name_{n}")
                series.claimed = series.completed = q + n
                series.observe(0.02)
        assert await (await client.start(hl_echo, 1)).result(timeout=20) == 1

        def echoed(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:  # counted once the daemon's write returns
                return daemon.metrics.series[(QUEUE, "hl_echo")].completed == n

            return check

        await wait_for(echoed(1))
        hold = await client.start(hl_hold)
        await wait_status(dsn, hold.id, "running")
        lease: datetime = await fetchval(dsn, LEASE, hold.id)

        # The render waits, wherever it runs, until the loop has done the work below: on
        # the loop itself it would wait for ever (given up after 20 s, the test failing).
        loop = asyncio.get_running_loop()
        rendering = asyncio.Event()
        proceed = threading.Event()
        stalled: list[bool] = []

        def gated(registry: CollectorRegistry) -> bytes:
            loop.call_soon_threadsafe(rendering.set)
            if not proceed.wait(timeout=20):
                stalled.append(True)
            return generate_latest(registry)

        monkeypatch.setattr(durable.metrics, "generate_latest", gated)
        answers: list[bytes] = []

        async def scrape() -> None:
            answers.append(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(scrape)
            with anyio.fail_after(30):
                await rendering.wait()

            # While the scrape renders: the heartbeat renews the lease (every 1/3 s) and a
            # task is claimed and completed.
            async def renewed() -> bool:
                return bool(await fetchval(dsn, LEASE, hold.id) > lease)

            await wait_for(renewed, timeout=20)
            assert await (await client.start(hl_echo, 2)).result(timeout=20) == 2
            proceed.set()
        assert stalled == []

        monkeypatch.undo()
        (answer,) = answers
        assert status_of(answer) == 200
        text = answer.partition(b"\r\n\r\n")[2].decode()
        completed = {
            (s.labels["queue"], s.labels["name"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "durable_tasks_completed_total"
        }
        assert len(completed) == 5002  # and hl_echo, hl_hold
        assert completed[("hl_load_999", "hl_name_4")] == 1003
        # The counts of one instant, the scrape's start: not the task completed meanwhile.
        assert completed[(QUEUE, "hl_echo")] == 1
        await wait_for(echoed(2))
        await client.cancel(hold.id)

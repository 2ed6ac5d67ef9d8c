"""Hostile clients of DURABLE_HTTP (/healthz, /readyz, /metrics), and what the metrics say.

The daemon under attack runs in a subprocess (``durable run --app`` this module, ``--http``
on a free port), so its descriptors are counted in /proc and its event loop is not the
test's. Task names here start with ``ha_``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

import durable
from durable.http import HttpServer, Response
from tests.support.helpers import (
    execute,
    fetchval,
    kill,
    running_daemon,
    spawn_daemon,
    wait_for,
    wait_status,
)
from tests.support.pgbouncer import free_port

QUEUE = "ha_q"
ODD = 'ha_"odd\\name\nü'
"""A task name holding a quote, a backslash, a newline and non-ASCII."""
ODD_QUEUE = 'ha_"q\\ue\nué'
GATE = anyio.Event()


@durable.task(name="ha_echo", queue=QUEUE)
async def ha_echo(x: int) -> int:
    return x


@durable.task(name="ha_hold", queue=QUEUE)
async def ha_hold() -> None:
    await asyncio.Event().wait()  # until cancelled: its lease must keep being renewed


@durable.task(name=ODD, queue=QUEUE)
async def ha_odd(x: int) -> int:
    return x


@durable.task(name="ha_gate", queue=QUEUE)
async def ha_gate() -> None:
    await GATE.wait()


# -- raw clients ------------------------------------------------------------------------------


async def exchange(port: int, raw: bytes, *, timeout: float = 15) -> bytes:
    """Send ``raw``, read until the server closes (bounded): all it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        with anyio.fail_after(timeout):
            try:
                return await reader.read()
            except ConnectionResetError:
                return b""
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> None:
    """Wait until the server closes this connection (EOF or reset), at most ``timeout``."""
    with anyio.fail_after(timeout):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@asynccontextmanager
async def http_daemon(dsn: str, tmp_path: Path, **env: str) -> AsyncIterator[tuple[int, int]]:
    """A subprocess daemon serving QUEUE with DURABLE_HTTP on a free port: (pid, port)."""
    port = free_port()
    proc = spawn_daemon(
        dsn, "tests.faults.test_http_attacks", "--http", f"127.0.0.1:{port}",
        log=tmp_path / "daemon.log",
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


# -- the server under attack ------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_hostile_clients_neither_stall_the_daemon_nor_leak(
    dsn: str, tmp_path: Path
) -> None:
    async with durable.connect(dsn) as client, http_daemon(dsn, tmp_path) as (pid, port):
        baseline = descriptors(pid)
        hold = await client.start(ha_hold)
        await wait_status(dsn, hold.id, "running")
        lease = "select lease_until from durable.tasks where id = $1"
        first_lease: datetime = await fetchval(dsn, lease, hold.id)

        # 1,000 idle connections, 20 slowloris ones, 5 with a 1 MB request line or headers.
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(1000)]
        drips = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        huge = [b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nX: " + b"b" * 1_000_000 + b"\r\n\r\n"]  # fmt: skip

        async def drip(writer: asyncio.StreamWriter) -> None:
            with suppress(ConnectionError):
                for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n":
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await anyio.sleep(1)

        answers: list[bytes] = []

        async def flood() -> None:
            async with anyio.create_task_group() as tg:
                for _, w in drips:
                    tg.start_soon(drip, w)
                answers.extend([await exchange(port, raw) for raw in huge * 3])
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            # While attacked, probes answer, tasks complete and the lease is renewed.
            assert status_of(await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200
            handles = [await client.start(ha_echo, i) for i in range(50)]
            assert [await h.result(timeout=30) for h in handles] == list(range(50))

            async def renewed() -> bool:
                return bool(await fetchval(dsn, lease, hold.id) > first_lease)

            await wait_for(renewed, timeout=30)
            # Every attacker is cut off within the read timeout (5 s), with slack for load.
            for reader, _ in idle + drips:
                await closed_by_server(reader, timeout=30)

        # 1 MB heads: the connection is closed (or a 4xx), never a 200 or a hang.
        assert len(answers) == 6
        assert all(a == b"" or 400 <= status_of(a) < 500 for a in answers), answers
        for _, writer in idle + drips:
            writer.close()
        await client.cancel(hold.id)

        async def released() -> bool:
            return descriptors(pid) <= baseline + 25  # the pool may have grown

        await wait_for(released, timeout=30)
        assert status_of(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200


async def test_odd_requests_get_one_answer_and_a_close(dsn: str, tmp_path: Path) -> None:
    async with http_daemon(dsn, tmp_path) as (_, port):
        cases = {
            b"GET /healthz HTTP/1.0\r\n\r\n": 200,
            b"GET /healthz HTTP/1.1\r\nConnection: keep-alive\r\n\r\n": 200,
            b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello": 200,
            "GET /h\u00e9althz\u2603 HTTP/1.1\r\n\r\n".encode(): 404,
            b"GET /healthz\xff\xfe HTTP/1.1\r\n\r\n": 404,
            b"GET\r\n\r\n": 400,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n": 400,  # TLS to a plain port
            b"BREW /healthz HTTP/1.1\r\n\r\n": 405,
        }
        for raw, expected in cases.items():
            answer = await exchange(port, raw)
            assert status_of(answer) == expected, raw
            assert answer.count(b"HTTP/1.1 ") == 1
            assert b"Connection: close" in answer
        # Pipelined: the first request is answered, then the connection closes.
        answer = await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n")
        assert answer.count(b"HTTP/1.1 200") == 1 and b"durable_" not in answer


async def test_a_client_that_reads_nothing_is_cut_off() -> None:
    # A /metrics answer larger than the kernel buffers (several MB on loopback) to a
    # client that never reads: the write gives up after the timeout and the socket goes.
    body = b"x" * 16_000_000

    async def big() -> Response:
        return 200, "text/plain", body

    server = HttpServer("127.0.0.1", 0, {"/metrics": big}, read_timeout=1.0)
    await server.listen()
    before = len(os.listdir("/proc/self/fd"))
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        clients = []
        for _ in range(5):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", server.port))
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            clients.append(s)

        async def answering() -> bool:
            return len(server._handlers) == len(clients)

        async def given_up() -> bool:
            return not server._handlers

        # Every request taken (under load the server may accept them late), then dropped.
        await wait_for(answering, timeout=20)
        await wait_for(given_up, timeout=20)
        # The server's side of each socket is closed, not left waiting on its buffer.
        assert len(os.listdir("/proc/self/fd")) <= before + len(clients) + 2
        loop = asyncio.get_running_loop()
        for s in clients:
            received = 0
            # Read on the loop, not in a blocking call: the server runs on this loop too.
            with suppress(ConnectionError):
                async with asyncio.timeout(10):
                    while chunk := await loop.sock_recv(s, 1 << 20):
                        received += len(chunk)
            assert received < len(body)
            s.close()
        tg.cancel_scope.cancel()


async def test_closing_with_a_request_in_flight_reports_no_error() -> None:
    # The daemon stops while a probe waits on the database: the handler is cancelled,
    # which Python 3.11's stream callback reported as "Exception in callback".
    arrived = anyio.Event()
    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))

    async def stuck() -> Response:
        arrived.set()
        await anyio.sleep_forever()
        raise AssertionError

    server = HttpServer("127.0.0.1", 0, {"/readyz": stuck})
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /readyz HTTP/1.1\r\n\r\n")
            await arrived.wait()
            tg.cancel_scope.cancel()
        await closed_by_server(reader, timeout=10)
        writer.close()

        async def handled() -> bool:
            return not server._handlers

        await wait_for(handled)
        await asyncio.sleep(0)  # the stream's done-callback runs one turn later
        assert errors == []
    finally:
        loop.set_exception_handler(None)


# -- /readyz while draining -------------------------------------------------------------------


async def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    answer = await exchange(port, f"GET {path} HTTP/1.1\r\n\r\n".encode())
    return status_of(answer), json.loads(answer.partition(b"\r\n\r\n")[2])


async def test_readyz_is_503_while_the_daemon_drains(dsn: str) -> None:
    global GATE
    GATE = anyio.Event()
    async with durable.connect(dsn) as client, running_daemon(
        dsn, http="127.0.0.1:0", queues=QUEUE, shutdown_grace="30"
    ) as daemon:
        assert daemon.http is not None
        port = daemon.http.port
        handle = await client.start(ha_gate)
        await wait_status(dsn, handle.id, "running")
        assert (await get(port, "/readyz"))[0] == 200
        daemon.stop()
        code, body = await get(port, "/readyz")
        assert (code, body["stopping"], body["listener"]) == (503, True, True)
        assert (await get(port, "/healthz"))[0] == 200  # alive: it is finishing its tasks
        assert handle.id in daemon.attempts  # still draining
        GATE.set()
        assert await handle.result(timeout=20) is None


# -- the metrics themselves -------------------------------------------------------------------


Sample = tuple[str, dict[str, str], float]


async def samples(port: int) -> tuple[str, list[Sample]]:
    answer = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status_of(answer) == 200
    text = answer.partition(b"\r\n\r\n")[2].decode("utf-8")
    found = [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]
    return text, found


def check_histograms(found: list[Sample]) -> None:
    """Buckets cumulative and ending at +Inf, _count equal to the +Inf bucket."""
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    sums: dict[tuple[tuple[str, str], ...], float] = {}
    for name, labels, v in found:
        key = tuple(sorted((k, x) for k, x in labels.items() if k != "le"))
        if name == "durable_attempt_duration_seconds_bucket":
            buckets.setdefault(key, []).append((float(labels["le"]), v))
        elif name == "durable_attempt_duration_seconds_count":
            counts[key] = v
        elif name == "durable_attempt_duration_seconds_sum":
            sums[key] = v
    assert buckets and buckets.keys() == counts.keys() == sums.keys()
    for key, series in buckets.items():
        bounds = [b for b, _ in series]
        values = [v for _, v in series]
        assert bounds == sorted(bounds) and math.isinf(bounds[-1])
        assert values == sorted(values), key  # cumulative
        assert values[-1] == counts[key]
        assert sums[key] >= 0 and (counts[key] > 0 or sums[key] == 0)


async def test_label_values_escaped_cardinality_bounded_counters_monotonic(dsn: str) -> None:
    # A queue with odd characters exists only in the database (depth gauges read it there).
    await execute(dsn, "insert into durable.tasks (queue, name) values ($1, 'ha_nobody')",
                  ODD_QUEUE)  # fmt: skip
    async with durable.connect(dsn) as client, running_daemon(
        dsn, http="127.0.0.1:0", queues=QUEUE
    ) as daemon:
        assert daemon.http is not None and daemon.listener is not None
        port = daemon.http.port
        handles = [await client.start(ha_odd, i) for i in range(30)]
        handles += [await client.start(ha_echo, i) for i in range(30)]
        for h in handles:
            await h.result(timeout=30)

        async def acknowledged() -> list[Sample] | None:
            _, found = await samples(port)
            done = [v for n, labels, v in found
                    if n == "durable_tasks_completed_total" and labels["name"] == ODD]  # fmt: skip
            return found if done == [30.0] else None

        before: list[Sample] = await wait_for(acknowledged)
        text, _ = await samples(port)
        # The escapes the text format asks for: \" \\ \n, and UTF-8 as it is.
        assert 'name="ha_\\"odd\\\\name\\nü"' in text
        assert 'queue="ha_\\"q\\\\ue\\nué"' in text
        assert ("durable_queue_tasks", {"queue": ODD_QUEUE, "status": "queued"}, 1.0) in before
        check_histograms(before)
        # Series by (queue, name) only: 60 tasks, two names, no per-task label.
        label_names = {k for _, labels, _ in before for k in labels}
        assert label_names <= {"queue", "name", "le", "status", "source", "path"}
        names = {labels["name"] for n, labels, _ in before if n == "durable_tasks_claimed_total"}
        assert names == {ODD, "ha_echo"}

        # The listener's connection is cut: counters carry on from where they were.
        pid = daemon.listener.backend_pid
        await execute(dsn, "select pg_terminate_backend($1)", pid)

        async def reconnected() -> bool:
            return daemon.listener is not None and daemon.listener.backend_pid not in (pid, None)

        await wait_for(reconnected)
        assert (await client.start(ha_echo, 99)) is not None
        _, after = await samples(port)
        now = {(n, tuple(sorted(labels.items()))): v for n, labels, v in after}
        for name, labels, v in before:
            if name.endswith(("_total", "_count", "_sum", "_bucket")):
                assert now[(name, tuple(sorted(labels.items())))] >= v, (name, labels)
        check_histograms(after)

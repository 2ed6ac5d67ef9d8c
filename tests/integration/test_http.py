"""The daemon's HTTP endpoint (DURABLE_HTTP): /metrics moving, /readyz, /healthz, bad requests.

Task names here start with ``h_`` (the registry is process-wide). Daemons run in this event
loop and listen on 127.0.0.1 port 0; ``daemon.http.port`` is the port they got.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

import durable
from durable.daemon import Daemon
from durable.embedded import EmbeddedServer
from durable.errors import DurableError
from durable.http import HttpServer
from durable.registry import registry
from durable.retry import RetryPolicy
from durable.settings import Settings
from tests.support.helpers import execute, running_daemon, settings, wait_for

HTTP = "127.0.0.1:0"
QUEUE = "h_queue"
GATE = anyio.Event()
"""h_block waits on this, so the test decides when it finishes (reset per test)."""


@durable.task(queue=QUEUE)
async def h_ok(x: int) -> int:
    return x


@durable.task(queue=QUEUE, max_attempts=2, retry=RetryPolicy(base=0.01, jitter=0))
async def h_fails(x: int) -> None:
    raise RuntimeError(f"h_fails {x}")


@durable.task(queue=QUEUE)
async def h_block() -> None:
    await GATE.wait()


async def h_add(a: int, b: int) -> int:
    return a + b


@durable.workflow(queue=QUEUE)
async def h_flow(ctx: durable.Context, x: int) -> int:
    a = await ctx.step("one", h_add, x, 1)
    return await ctx.step("two", h_add, a, 1)  # type: ignore[no-any-return]


# -- a tiny HTTP client -----------------------------------------------------------------------


async def request(port: int, path: str, method: str = "GET", raw: bytes | None = None
                  ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw or f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def status(port: int, path: str) -> int:
    return (await request(port, path))[0]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    code, headers, body = await request(port, "/metrics")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    return samples.get((metric, frozenset(labels.items())), 0.0)


def task_labels(name: str) -> dict[str, str]:
    return {"queue": QUEUE, "name": name}


# -- /metrics ---------------------------------------------------------------------------------


async def test_metrics_show_dead_rows_until_a_vacuum(dsn: str) -> None:
    # Dead row versions in durable.tasks (every claim and finish leaves one) slow claims
    # until VACUUM: the gauges show them grow and go. Autovacuum is off for the table
    # here, so only the test's own VACUUM clears them.
    await execute(dsn, "alter table durable.tasks set (autovacuum_enabled = false)")
    await execute(
        dsn,
        "insert into durable.tasks (queue, name, status, finished_at)"
        " select 'h_dead', 'h_x', 'completed', now() from generate_series(1, 500)",
    )
    await execute(dsn, "update durable.tasks set finished_at = now() where queue = 'h_dead'")
    async with running_daemon(dsn, http=HTTP, queues=f"{QUEUE}=1") as daemon:
        assert daemon.http is not None
        port = daemon.http.port

        async def dead(at_least: bool) -> Samples | None:
            samples = await scrape(port)
            n = value(samples, "durable_table_dead_rows")
            return samples if (n >= 500) == at_least else None

        await wait_for(lambda: dead(True))
        await execute(dsn, "vacuum durable.tasks")
        after = await wait_for(lambda: dead(False))
        assert 0 <= value(after, "durable_table_vacuum_age_seconds") < 60
        assert ("durable_table_vacuum_age_seconds", frozenset()) in after


async def test_metrics_move_while_tasks_run(dsn: str) -> None:
    global GATE
    GATE = anyio.Event()
    # Three queued tasks no daemon has code for, ready for a while: depth and age.
    await execute(
        dsn,
        "insert into durable.tasks (queue, name, run_at) select $1, 'h_nobody', "
        "now() - interval '30 seconds' from generate_series(1, 3)",
        QUEUE,
    )
    # A task whose daemon died: its lease expired a minute ago.
    await execute(
        dsn,
        "insert into durable.tasks (queue, name, status, claim_token, lease_until) "
        "values ('h_elsewhere', 'h_ghost', 'running', 1, now() - interval '1 minute')",
    )
    async with durable.connect(dsn) as client, running_daemon(
        dsn, http=HTTP, queues=f"{QUEUE}=4", lease="3"
    ) as daemon:
        assert daemon.http is not None
        port = daemon.http.port
        before = await scrape(port)
        assert value(before, "durable_tasks_claimed_total", **task_labels("h_ok")) == 0
        assert value(before, "durable_queue_tasks", queue=QUEUE, status="queued") == 3
        assert value(before, "durable_queue_oldest_ready_seconds", queue=QUEUE) >= 30
        assert value(before, "durable_slots_free", queue=QUEUE) == 4
        assert value(before, "durable_listener_connected") == 1

        handles = [await client.start(h_ok, i) for i in range(5)]
        failing = await client.start(h_fails, 1)
        flow = await client.start(h_flow, 1)
        assert [await h.result(timeout=20) for h in handles] == list(range(5))
        assert await flow.result(timeout=20) == 3
        with pytest.raises(durable.TaskFailed):
            await failing.result(timeout=20)
        blocked = await client.start(h_block)

        async def running() -> bool:
            samples = await scrape(port)
            return value(samples, "durable_slots_in_flight", queue=QUEUE) == 1

        await wait_for(running)
        await client.cancel(blocked.id)
        with pytest.raises(durable.TaskCancelled):
            await blocked.result(timeout=20)

        async def reclaimed() -> bool:
            return daemon.metrics.leases_reclaimed >= 1

        await wait_for(reclaimed)
        # Completions are acknowledged in batches after result() may already have returned.
        await wait_for(lambda: _completed(port, "h_ok", 5))
        after = await scrape(port)

    assert value(after, "durable_tasks_claimed_total", **task_labels("h_ok")) == 5
    assert value(after, "durable_tasks_completed_total", **task_labels("h_ok")) == 5
    assert value(after, "durable_attempt_duration_seconds_count", **task_labels("h_ok")) == 5
    assert value(after, "durable_attempt_duration_seconds_bucket", le="+Inf",
                 **task_labels("h_ok")) == 5  # fmt: skip
    assert value(after, "durable_tasks_claimed_total", **task_labels("h_fails")) == 2
    assert value(after, "durable_tasks_retried_total", **task_labels("h_fails")) == 1
    assert value(after, "durable_tasks_failed_total", **task_labels("h_fails")) == 1
    assert value(after, "durable_tasks_cancelled_total", **task_labels("h_block")) == 1
    assert value(after, "durable_tasks_completed_total", **task_labels("h_flow")) == 1
    assert value(after, "durable_checkpoints_written_total") == 2
    assert value(after, "durable_leases_reclaimed_total") == 1
    assert value(after, "durable_wakeups_total", queue=QUEUE, source="notify") >= 1
    assert value(after, "durable_slots_in_flight", queue=QUEUE) == 0
    assert value(after, "durable_queue_tasks", queue=QUEUE, status="queued") == 3


async def _completed(port: int, name: str, n: int) -> bool:
    samples = await scrape(port)
    return value(samples, "durable_tasks_completed_total", **task_labels(name)) == n


async def test_two_daemons_in_one_process_keep_their_own_metrics(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(
        dsn, http=HTTP, queues="h_first"
    ) as first, running_daemon(dsn, http=HTTP, queues=QUEUE) as second:
        assert first.http is not None and second.http is not None
        assert await (await client.start(h_ok, 7)).result(timeout=20) == 7
        await wait_for(lambda: _completed(second.http.port, "h_ok", 1))  # type: ignore[union-attr]
        mine = await scrape(first.http.port)
    assert value(mine, "durable_tasks_completed_total", **task_labels("h_ok")) == 0
    assert ("durable_slots_free", frozenset({("queue", "h_first")})) in mine


# -- /readyz ----------------------------------------------------------------------------------


class Proxy:
    """A TCP proxy in front of Postgres that the test can turn away connections with."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.refusing = False
        self.port = 0
        self._pipes: set[asyncio.Task[None]] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for a, b in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(a, b))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Proxy]:
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for task in list(self._pipes):
                task.cancel()
            await asyncio.gather(*self._pipes, return_exceptions=True)


def through(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{port}"))


async def test_readyz_follows_the_listener_connection(dsn: str) -> None:
    parts = urlsplit(dsn)
    assert parts.hostname is not None and parts.port is not None
    async with Proxy(parts.hostname, parts.port).serving() as proxy:
        # A long poll interval: nothing but the listener's own reconnect brings it back.
        daemon = Daemon(settings(http=HTTP, poll_interval="60"), registry, dsn,
                        listen_dsn=through(dsn, proxy.port))  # fmt: skip
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:
                assert daemon.http is not None and daemon.listener is not None
                port = daemon.http.port
                assert await status(port, "/readyz") == 200
                _, _, body = await request(port, "/readyz")
                assert json.loads(body)["listener"] is True

                proxy.refusing = True
                pid = daemon.listener.backend_pid
                await execute(dsn, "select pg_terminate_backend($1)", pid)

                async def unready() -> bool:
                    return await status(port, "/readyz") == 503

                await wait_for(unready)
                _, _, body = await request(port, "/readyz")
                data = json.loads(body)
                assert (data["status"], data["listener"]) == ("unready", False)
                assert data["schema"] == data["expected_schema"]  # only the listener is down
                assert await status(port, "/healthz") == 200  # the pool is fine

                proxy.refusing = False

                async def ready() -> bool:
                    return await status(port, "/readyz") == 200

                await wait_for(ready)
                assert daemon.listener.backend_pid != pid
                samples = await scrape(port)
                assert value(samples, "durable_listener_reconnects_total") == 1
                assert value(samples, "durable_listener_connected") == 1
            finally:
                daemon.stop()


async def test_readyz_is_503_when_the_schema_is_older_than_the_code(dsn: str) -> None:
    async with running_daemon(dsn, http=HTTP) as daemon:
        assert daemon.http is not None
        assert await status(daemon.http.port, "/readyz") == 200
        # Newer is served (a rolling deploy migrates before it replaces the daemons)...
        await execute(dsn, "insert into durable.migrations (version, name) values (99999, 'x')")
        assert await status(daemon.http.port, "/readyz") == 200
        # ...older is not.
        await execute(dsn, "delete from durable.migrations where version >= ("
                      "select max(version) from durable.migrations where version < 99999)")  # fmt: skip
        code, _, body = await request(daemon.http.port, "/readyz")
        assert code == 503
        assert json.loads(body)["schema"] < json.loads(body)["expected_schema"]


# -- /healthz ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_healthz_fails_while_the_database_is_down(
    restartable_server: EmbeddedServer,
) -> None:
    url = restartable_server.url()
    assert url is not None
    async with running_daemon(url, http=HTTP, queues=QUEUE) as daemon:
        assert daemon.http is not None
        port = daemon.http.port
        code, _, body = await request(port, "/healthz")
        assert (code, json.loads(body)) == (200, {"status": "ok", "database": True})

        await anyio.to_thread.run_sync(restartable_server.stop, "immediate")
        code, _, body = await request(port, "/healthz")
        assert code == 503
        assert json.loads(body)["database"] is False
        assert await status(port, "/readyz") == 503
        assert await status(port, "/metrics") == 200  # the daemon's own counters still
        assert not daemon.stopping

        await anyio.to_thread.run_sync(restartable_server.ensure_started)

        async def healthy() -> bool:
            return await status(port, "/healthz") == 200

        await wait_for(healthy, timeout=30)
        async with durable.connect(url) as client:
            assert await (await client.start(h_ok, 3)).result(timeout=30) == 3


# -- the server itself ------------------------------------------------------------------------


async def test_unknown_paths_methods_and_garbage(dsn: str) -> None:
    async with running_daemon(dsn, http=HTTP) as daemon:
        assert daemon.http is not None
        port = daemon.http.port
        assert (await request(port, "/nope"))[0] == 404
        code, headers, _ = await request(port, "/healthz", method="POST")
        assert code == 405 and headers["Allow"] == "GET, HEAD"
        code, headers, body = await request(port, "/healthz", method="HEAD")
        assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0
        assert (await request(port, "/healthz?verbose=1"))[0] == 200
        assert (await request(port, "", raw=b"nonsense\r\n\r\n"))[0] == 400
        # A client that connects and says nothing does not block the others.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await status(port, "/healthz") == 200
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
        del reader


async def test_no_http_unless_configured(dsn: str) -> None:
    async with running_daemon(dsn) as daemon:
        assert daemon.http is None
    assert Settings.from_env({}).http is None  # off unless DURABLE_HTTP or --http says


async def test_http_binds_only_where_told(dsn: str) -> None:
    """The endpoint has no authentication: it listens on the address given, no other."""
    async with running_daemon(dsn, http="127.0.0.1:0") as daemon:
        assert isinstance(daemon.http, HttpServer) and daemon.http._server is not None
        bound = {s.getsockname()[0] for s in daemon.http._server.sockets}
        assert bound == {"127.0.0.1"}
        assert await status(daemon.http.port, "/healthz") == 200


async def test_port_in_use_stops_the_daemon_at_startup(dsn: str) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        daemon = Daemon(settings(http=f"127.0.0.1:{port}"), registry, dsn)
        with pytest.raises(DurableError) as info:
            await daemon.run()
        assert isinstance(info.value, DurableError)
        assert str(info.value) == (f"DURABLE_HTTP: cannot listen on 127.0.0.1:{port}: "
                                   "address already in use")
    finally:
        server.close()
    # It stopped before registering itself: no daemon row claims to serve anything.
    assert await _workers(dsn) == 0


async def _workers(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("select count(*) from durable.workers"))
    finally:
        await conn.close()

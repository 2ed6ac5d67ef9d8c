"""A password in the database URL never shows: not in a daemon's logs (even while it
loses and regains its connections), not in errors, `durable show`, or /metrics."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import pytest

import durable
from durable.store import grant
from tests.apps.secret_tasks import QUEUE
from tests.support.helpers import (
    durable_cli,
    execute,
    fetch_text,
    kill,
    logged,
    spawn_daemon_logged,
    wait_for,
)
from tests.support.roles import APP_ROLE, PASSWORD, app_role, as_app


@pytest.mark.timeout(90)
async def test_a_password_in_the_url_never_appears_anywhere(dsn: str, tmp_path: Path) -> None:
    await app_role(dsn)
    await grant(dsn, APP_ROLE)
    app = as_app(dsn)
    assert PASSWORD in app
    log = tmp_path / "daemon.log"
    proc = spawn_daemon_logged(
        app, "tests.apps.secret_tasks", log, DURABLE_LOG_LEVEL="debug",
        DURABLE_HTTP="127.0.0.1:0", DURABLE_QUEUES=QUEUE, DURABLE_LEASE="2",
    )
    seen: list[str] = []
    try:

        async def started() -> list[dict[str, object]]:
            return logged(log, "http_started") and logged(log, "daemon_ready")

        await wait_for(started, timeout=30)
        port = logged(log, "http_started")[0]["port"]
        async with durable.connect(app) as client:
            echo = await client.start("sec_echo", "hello")
            failing = await client.start("sec_fail")
            flow = await client.start("sec_flow", 1)
            assert await echo.result(timeout=20) == "hello"
            assert await flow.result(timeout=20) == 2
            with pytest.raises(durable.TaskFailed):
                await failing.result(timeout=20)
            # Cut every connection the daemon has: it logs its way back through errors.
            await execute(
                dsn,
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where usename = $1 and application_name <> 'durable-client'"
                " and pid <> pg_backend_pid()",
                APP_ROLE,
            )

            async def reconnected() -> bool:
                return bool(logged(log, "listener_reconnected"))

            await wait_for(reconnected, timeout=30)
            again = await client.start("sec_echo", "again")
            assert await again.result(timeout=30) == "again"
            for path in ("/metrics", "/healthz", "/readyz"):
                seen.append(await anyio.to_thread.run_sync(fetch_text, f"http://127.0.0.1:{port}{path}"))
            assert "durable_" in seen[0]
        for args in (("show", str(flow.id)), ("show", str(failing.id), "--json"), ("ls",),
                     ("workers",), ("queues",), ("check",)):
            done = durable_cli(*args, "--database-url", app)
            assert done.returncode == 0, (args, done.stderr)
            seen += [done.stdout, done.stderr]
    finally:
        kill(proc, signal.SIGTERM)
        proc.wait(timeout=30)
    text = log.read_text()
    assert logged(log, "daemon_stopped")
    assert PASSWORD not in text
    for output in seen:
        assert PASSWORD not in output


EVERY = (("show", "1"), ("migrate", "--grant", APP_ROLE), ("start", "x"), ("run",))


@pytest.mark.parametrize(
    ("where", "commands"),
    [
        ("nonexistent.invalid:5432", EVERY),
        ("127.0.0.1:1", (("ls",), ("check",), ("run",))),
        ("127.0.0.1:notaport", (("ls",), ("run",))),  # errors that quote the URL itself
        ("[::1", (("run",),)),
    ],
)
def test_errors_about_an_unreachable_server_do_not_show_its_password(
    where: str, commands: tuple[tuple[str, ...], ...]
) -> None:
    url = f"postgresql://{APP_ROLE}:{PASSWORD}@{where}/durable"
    for args in commands:
        done = durable_cli(*args, "--database-url", url, timeout=60)
        assert done.returncode != 0, args
        assert done.stderr.strip(), args
        assert PASSWORD not in done.stdout + done.stderr, (args, done.stderr)

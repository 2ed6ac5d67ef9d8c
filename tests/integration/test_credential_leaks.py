"""Attacks on "a credential is never stored or logged": task code that fails quoting the
database URL, the spawned daemon's process, and the dashboard secrets."""

from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path

import anyio
import pytest

import durable
from durable.store import grant
from durable.ui.auth import Auth
from tests.apps.credential_leaks_app import QUEUE
from tests.support.helpers import (
    daemon_env,
    durable_cli,
    fetch_text,
    fetchval,
    kill,
    logged,
    spawn_daemon_logged,
    wait_for,
    wait_status,
)
from tests.support.roles import PASSWORD, app_role, as_app

APP = "tests.apps.credential_leaks_app"


@pytest.mark.timeout(120)
async def test_daemon_log_and_process_hold_no_password(dsn: str, tmp_path: Path) -> None:
    """The daemon's log (task failures quoting the URL included), /metrics, /healthz,
    /readyz, and what durable adds to its process (argv, environment) keep no password."""
    await app_role(dsn)
    await grant(dsn, "durable_app")
    app = as_app(dsn)
    log = tmp_path / "daemon.log"
    proc = spawn_daemon_logged(
        app, APP, log, DURABLE_LOG_LEVEL="debug", DURABLE_HTTP="127.0.0.1:0",
        DURABLE_QUEUES=QUEUE,
    )
    seen: list[str] = []
    try:

        async def started() -> list[dict[str, object]]:
            return logged(log, "http_started") and logged(log, "daemon_ready")

        await wait_for(started, timeout=30)
        port = logged(log, "http_started")[0]["port"]
        async with durable.connect(app) as client:
            task = await client.start("leak_task")
            flow = await client.start("leak_flow")
            await wait_status(dsn, task.id, "failed", timeout=30)
            await wait_status(dsn, flow.id, "failed", timeout=30)
        for path in ("/metrics", "/healthz", "/readyz"):
            seen.append(await anyio.to_thread.run_sync(fetch_text, f"http://127.0.0.1:{port}{path}"))
        cmdline = (await anyio.Path(f"/proc/{proc.pid}/cmdline").read_bytes()).decode(errors="replace")
        environ = (await anyio.Path(f"/proc/{proc.pid}/environ").read_bytes()).decode(errors="replace")
        seen.append(cmdline)
        # The environment we gave holds the URL; nothing beyond it may.
        given = daemon_env(app, DURABLE_LOG_LEVEL="debug", DURABLE_HTTP="127.0.0.1:0",
                           DURABLE_QUEUES=QUEUE)
        added = [
            entry for entry in environ.split("\0")
            if entry and entry.partition("=")[0] not in given
        ]
        seen.append("\n".join(added))
    finally:
        kill(proc, signal.SIGTERM)
        proc.wait(timeout=30)
    text = log.read_text()
    assert logged(log, "task_failed")
    assert PASSWORD not in text
    for output in seen:
        assert PASSWORD not in output


async def _failed_with_the_url(dsn: str, tmp_path: Path) -> tuple[str, int, int]:
    """The app role's URL, and a task and a workflow that failed quoting it."""
    await app_role(dsn)
    await grant(dsn, "durable_app")
    app = as_app(dsn)
    log = tmp_path / "daemon.log"
    proc = spawn_daemon_logged(app, APP, log, DURABLE_QUEUES=QUEUE)
    try:
        await wait_for(lambda: _ready(log), timeout=30)
        async with durable.connect(app) as client:
            task = await client.start("leak_task")
            flow = await client.start("leak_flow")
            await wait_status(dsn, task.id, "failed", timeout=30)
            await wait_status(dsn, flow.id, "failed", timeout=30)
    finally:
        kill(proc, signal.SIGTERM)
        proc.wait(timeout=30)
    return app, task.id, flow.id


async def _ready(log: Path) -> bool:
    return bool(logged(log, "daemon_ready"))


@pytest.mark.timeout(120)
async def test_a_task_error_quoting_the_url_is_stored_without_its_password(
    dsn: str, tmp_path: Path
) -> None:
    _app, task_id, flow_id = await _failed_with_the_url(dsn, tmp_path)
    stored = await fetchval(dsn, "select error::text from durable.tasks where id = $1", task_id)
    assert "could not connect to postgresql://" in stored
    assert PASSWORD not in stored
    flow = await fetchval(dsn, "select error::text from durable.tasks where id = $1", flow_id)
    events = await fetchval(
        dsn, "select string_agg(error::text, ' ') from durable.events where task_id = $1", flow_id
    )
    assert PASSWORD not in flow
    assert PASSWORD not in (events or "")


@pytest.mark.timeout(120)
async def test_durable_show_of_a_task_error_quoting_the_url_hides_its_password(
    dsn: str, tmp_path: Path
) -> None:
    _app, task_id, flow_id = await _failed_with_the_url(dsn, tmp_path)
    commands: list[tuple[str, ...]] = [
        ("show", str(task_id)), ("show", str(task_id), "--json"),
        ("show", str(flow_id), "--full"), ("ls", "--status", "failed"),
    ]
    outputs = []
    for args in commands:
        done = await anyio.to_thread.run_sync(partial(durable_cli, *args, "--database-url", dsn))
        assert done.returncode == 0, (args, done.stderr)
        outputs.append(done.stdout + done.stderr)
    assert "could not connect to postgresql://durable_app" in outputs[0]
    for args, out in zip(commands, outputs, strict=True):
        assert PASSWORD not in out, args


@pytest.mark.timeout(120)
async def test_the_dashboard_page_of_a_task_error_quoting_the_url_hides_its_password(
    dsn: str, tmp_path: Path
) -> None:
    from durable.ui.server import UiServer

    _app, task_id, flow_id = await _failed_with_the_url(dsn, tmp_path)
    server = UiServer("127.0.0.1", 0, dsn, None)
    await server.listen()
    pages = []
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        base = f"http://127.0.0.1:{server.port}"
        for path in (f"/tasks/{task_id}", f"/tasks/{flow_id}", "/tasks?status=failed", "/"):
            pages.append(await anyio.to_thread.run_sync(fetch_text, base + path))
        tg.cancel_scope.cancel()
    assert "could not connect to" in pages[0]
    for page in pages:
        assert PASSWORD not in page


def test_ui_secret_files_never_show(tmp_path: Path) -> None:
    """A token or password file that cannot be used: the error names the file, never
    what it holds (a too-short one, and one holding a URL instead of a token)."""
    short = tmp_path / "short"
    short.write_text("s3cr3t\n")  # 6 characters: refused
    long = tmp_path / "long"
    long.write_text("s3cr3t-pw" * 1000)  # too long
    outputs = []
    for flag, path in (("--token-file", short), ("--password-file", long)):
        done = durable_cli("ui", flag, str(path), "--database-url",
                           "postgresql://durable_app:s3cr3t-pw@127.0.0.1:1/x")
        assert done.returncode != 0
        outputs.append(done.stdout + done.stderr)
    assert all(str(tmp_path) in out for out in outputs)
    assert not any("s3cr3t" in out for out in outputs)


def test_the_dashboards_secret_is_not_in_its_repr(tmp_path: Path) -> None:
    """What holds the dashboard's secret prints without it (a log line or a traceback
    that shows the object must not show the token, nor the key that signs sessions)."""
    path = tmp_path / "token"
    path.write_text("s3cr3t-token-value\n")
    auth = Auth.from_file("--token-file", path, "token")
    shown = repr(auth) + str(auth)
    assert "s3cr3t" not in shown and auth.key.hex() not in shown and "token" in shown


def test_a_url_file_never_shows_its_password(tmp_path: Path) -> None:
    """DURABLE_DATABASE_URL_FILE holding a malformed or unreachable URL: the errors of every
    command keep its password out, and so does `--help`."""
    outputs = []
    for content in (
        f"postgres ql://durable_app:{PASSWORD}@127.0.0.1:1/x",
        f"postgresql://durable_app:{PASSWORD}@127.0.0.1:1/x",
        f"postgresql://durable_app:{PASSWORD}@127.0.0.1:notaport/x",
        f"host=127.0.0.1 port=1 password={PASSWORD}",
    ):
        secret = tmp_path / "url"
        secret.write_text(content + "\n")
        for args in (("ls",), ("check",), ("run",), ("ui",), ("run", "--help")):
            done = durable_cli(*args, timeout=60, DURABLE_DATABASE_URL_FILE=str(secret),
                               PGPASSWORD=PASSWORD)
            outputs.append((content, args, done.stdout + done.stderr))
    for content, args, out in outputs:
        assert PASSWORD not in out, (content, args, out)


def test_pgpassword_never_shows() -> None:
    """PGPASSWORD naming an unreachable server: the errors name the variables only."""
    outputs = []
    for args in (("ls",), ("check",), ("run",), ("workers",)):
        done = durable_cli(*args, timeout=60, **{
            **{k: "" for k in os.environ if k.startswith("DURABLE_")},
            "PGHOST": "127.0.0.1", "PGPORT": "1", "PGUSER": "durable_app",
            "PGPASSWORD": PASSWORD,
        })
        outputs.append(done.stdout + done.stderr)
        assert done.returncode != 0
    for out in outputs:
        assert PASSWORD not in out

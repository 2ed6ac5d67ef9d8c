"""The `durable` command line as a user runs it: subprocesses, real databases."""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest

import durable
from durable.cli import build_parser
from durable.settings import ENV_VARS
from durable.store import migration_files, schema_sql
from tests.apps.queue_tasks import q_cli_add, q_cli_fail
from tests.conftest import admin, database_dsn, quote_ident
from tests.support.helpers import (
    durable_cli,
    kill,
    published,
    run_burst,
    spawn_daemon,
    wait_for,
)

APP = "tests.apps.queue_tasks"
PASSWORD = "s3cretpw"
UNREACHABLE = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x"
ALL_APPLIED = "applied migrations: " + ", ".join(str(v) for v, _, _ in migration_files())


async def cli(
    *args: str, dsn: str | None = None, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    """`durable ARGS` in a subprocess, off the event loop."""
    return await anyio.to_thread.run_sync(
        partial(durable_cli, *args, dsn=dsn, timeout=timeout, **env)
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("durable: "), lines[0]
    return lines[0]


def with_password(dsn: str) -> tuple[str, str]:
    """``dsn`` with a password in it, and that password: the server's own where the URL
    carries one (the embedded server), else one that trust authentication ignores."""
    parts = urlsplit(dsn)
    if parts.password:
        return dsn, parts.password
    user, _, host = parts.netloc.rpartition("@")
    assert user
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{host}")), PASSWORD


def subcommands() -> list[str]:
    parser = build_parser()
    for action in parser._actions:  # argparse has no public accessor for subcommands
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    raise AssertionError("no subcommands")


@pytest.fixture
async def empty_db(server_dsn: str) -> AsyncIterator[str]:
    """A database without the durable schema."""
    name = f"durable_empty_{secrets.token_hex(6)}"
    await admin(server_dsn, f"create database {quote_ident(name)}")
    try:
        yield database_dsn(server_dsn, name)
    finally:
        await admin(server_dsn, f"drop database if exists {quote_ident(name)} with (force)")


# -- help and schema -------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_help_works_for_durable_and_every_subcommand() -> None:
    commands = subcommands()
    expected = {
        "run", "migrate", "sql", "start", "ls", "show", "retry", "replay", "fork", "cancel",
        "event", "queues", "workers", "check", "db", "demo",
    }  # fmt: skip
    assert expected <= set(commands)
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    async def help_of(command: str | None) -> None:
        args = ("--help",) if command is None else (command, "--help")
        results[command or ""] = await cli(*args, DURABLE_DATABASE_URL=UNREACHABLE)

    async with anyio.create_task_group() as tg:
        for command in [None, *commands]:
            tg.start_soon(help_of, command)
    top = results.pop("")
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith("usage: durable")
    for command in commands:
        assert command in top.stdout
    for command, proc in results.items():
        assert proc.returncode == 0, (command, proc.stderr)
        assert proc.stdout.startswith(f"usage: durable {command}"), (command, proc.stdout)
        assert proc.stderr == ""
    # `durable run --help` names every variable the daemon reads.
    for variable, _default, _text in ENV_VARS:
        assert variable in results["run"].stdout, variable


async def test_sql_prints_the_schema_without_a_database() -> None:
    proc = await cli("sql", DURABLE_DATABASE_URL=UNREACHABLE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == schema_sql()
    assert "create table durable.tasks" in proc.stdout


async def test_migrate_twice_is_idempotent(empty_db: str) -> None:
    first = await cli("migrate", dsn=empty_db)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == ALL_APPLIED
    second = await cli("migrate", dsn=empty_db)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "schema is current"
    check = await cli("check", dsn=empty_db)
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr


async def test_concurrent_migrations_apply_once(empty_db: str) -> None:
    procs: list[subprocess.CompletedProcess[str]] = []

    async def migrate() -> None:
        procs.append(await cli("migrate", dsn=empty_db))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(migrate)
    assert [p.returncode for p in procs] == [0, 0, 0], [p.stderr for p in procs]
    outputs = sorted(p.stdout.strip() for p in procs)
    assert outputs == [ALL_APPLIED, "schema is current", "schema is current"]


# -- check ----------------------------------------------------------------------------------


async def test_check_is_healthy_against_the_test_database(dsn: str) -> None:
    proc = await cli("check", dsn=dsn)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


async def test_check_fails_against_an_unreachable_server() -> None:
    proc = await cli("check", "--timeout", "5", DURABLE_DATABASE_URL=UNREACHABLE)
    assert proc.returncode == 1
    assert "unhealthy" in one_line_error(proc)
    assert proc.stdout == ""


async def test_check_fails_when_the_schema_is_missing(empty_db: str) -> None:
    proc = await cli("check", dsn=empty_db)
    assert proc.returncode == 1
    assert "schema version" in one_line_error(proc)


async def test_run_refuses_an_unmigrated_database(empty_db: str) -> None:
    proc = await cli("run", "--app", APP, dsn=empty_db)
    assert proc.returncode == 1
    assert "durable migrate" in one_line_error(proc)


# -- start, ls, show ------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_start_wait_prints_the_result(dsn: str, tmp_path: Path) -> None:
    daemon = spawn_daemon(dsn, APP, log=tmp_path / "daemon.log")
    try:
        await published(dsn, "q_cli_add")
        proc = await cli("start", "q_cli_add", "[2, 3]", "--wait", "--timeout", "30s", dsn=dsn)
        assert proc.returncode == 0, proc.stderr
        task_id, result = proc.stdout.splitlines()
        assert json.loads(result) == 5
        failed = await cli("start", "q_cli_fail", '"no luck"', "--wait", "--timeout", "30", dsn=dsn)
        assert failed.returncode == 1
        line = one_line_error(failed)
        assert "builtins.RuntimeError: no luck" in line
        assert failed.stdout.strip().isdigit()  # the id comes first, then the error
    finally:
        kill(daemon, signal.SIGTERM)
        await anyio.to_thread.run_sync(partial(daemon.wait, 30))
    assert daemon.returncode == 0
    async with durable.connect(dsn) as client:
        info = await client.get(int(task_id))
    assert info.name == "q_cli_add" and info.status == "completed" and info.result == 5


async def test_start_without_wait_prints_the_id_and_enqueues(dsn: str) -> None:
    proc = await cli(
        "start", "q_cli_add", "[1, 1]", "--queue", "elsewhere", "--priority", "7",
        "--idempotency-key", "k-1", dsn=dsn,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    again = await cli(
        "start", "q_cli_add", "[1, 1]", "--idempotency-key", "k-1", "--allow-unknown", dsn=dsn
    )
    assert again.returncode == 0 and again.stdout == proc.stdout
    async with durable.connect(dsn) as client:
        info = await client.get(int(proc.stdout))
    assert (info.status, info.queue, info.priority, info.args) == ("queued", "elsewhere", 7, [1, 1])
    bad = await cli("start", "q_cli_add", "[1,", dsn=dsn)
    assert bad.returncode == 2 and "ARGS is not JSON" in one_line_error(bad)


async def test_start_takes_a_deadline_and_debounces(dsn: str) -> None:
    timed = await cli("start", "q_cli_add", "[1, 2]", "--deadline", "1h", "--queue", "elsewhere",
                      dsn=dsn)
    assert timed.returncode == 0, timed.stderr
    first = await cli("start", "q_cli_add", "[1, 1]", "--debounce", "1m", "--debounce-key",
                      "cli-dk", "--max-delay", "5m", "--queue", "elsewhere", dsn=dsn)
    again = await cli("start", "q_cli_add", "[2, 2]", "--debounce", "1m", "--debounce-key",
                      "cli-dk", "--queue", "elsewhere", dsn=dsn)
    assert first.returncode == 0 and again.stdout == first.stdout, again.stderr
    async with durable.connect(dsn) as client:
        info = await client.get(int(timed.stdout))
        bounced = await client.get(int(first.stdout))
    assert info.deadline is not None
    assert 3599 <= (info.deadline - info.created_at).total_seconds() < 3601
    assert bounced.args == [2, 2] and bounced.status == "queued"  # the last start's
    assert 60 <= (bounced.run_at - bounced.created_at).total_seconds() <= 300
    mixed = await cli("start", "q_cli_add", "--debounce", "1m", "--idempotency-key", "k",
                      "--allow-unknown", dsn=dsn)
    assert mixed.returncode == 2
    assert "debounce cannot be combined with idempotency_key" in one_line_error(mixed)
    lone = await cli("start", "q_cli_add", "--max-delay", "1m", "--allow-unknown", dsn=dsn)
    assert lone.returncode == 2 and "need debounce" in one_line_error(lone)


async def test_ls_json_and_show(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        ok = await client.start(q_cli_add, 20, 22)
        bad = await client.start(q_cli_fail, "it broke")
        waiting = await client.start(q_cli_add, 0, 0, delay=3600)
        await run_burst(dsn)
    listing = await cli("ls", "--json", dsn=dsn)
    assert listing.returncode == 0, listing.stderr
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    by_id = {r["id"]: r for r in rows}
    assert [r["id"] for r in rows] == [waiting.id, bad.id, ok.id]  # newest first
    assert by_id[ok.id]["status"] == "completed" and by_id[ok.id]["name"] == "q_cli_add"
    assert by_id[bad.id]["status"] == "failed"
    assert by_id[waiting.id]["status"] == "queued"
    failed_only = await cli("ls", "--json", "--status", "failed", dsn=dsn)
    assert [json.loads(line)["id"] for line in failed_only.stdout.splitlines()] == [bad.id]

    shown = await cli("show", str(ok.id), dsn=dsn)
    assert shown.returncode == 0, shown.stderr
    assert f"task {ok.id}" in shown.stdout and "'q_cli_add'" in shown.stdout
    assert "status     completed" in shown.stdout
    assert "result     42" in shown.stdout
    assert "attempt    1 of 3" in shown.stdout
    shown_bad = await cli("show", str(bad.id), dsn=dsn)
    assert "status     failed" in shown_bad.stdout
    assert "error      builtins.RuntimeError: it broke" in shown_bad.stdout
    assert "traceback" in shown_bad.stdout and "in q_cli_fail" in shown_bad.stdout
    as_json = await cli("show", str(ok.id), "--json", dsn=dsn)
    data = json.loads(as_json.stdout)
    assert (data["id"], data["status"], data["result"], data["args"]) == (
        ok.id, "completed", 42, [20, 22],
    )  # fmt: skip
    missing = await cli("show", "999999", dsn=dsn)
    assert missing.returncode == 1 and "no task 999999" in one_line_error(missing)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DURABLE_QUEUES", "orders=abc"),
        ("DURABLE_QUEUES", "orders=0"),
        ("DURABLE_QUEUES", "a=1,a=2"),
        ("DURABLE_CONCURRENCY", "many"),
        ("DURABLE_POLL_INTERVAL", "soon"),
        ("DURABLE_LEASE", "0.5"),
        ("DURABLE_SHUTDOWN_GRACE", "-1"),
        ("DURABLE_LOG_LEVEL", "loud"),
        ("DURABLE_LOG_FORMAT", "xml"),
        ("DURABLE_APP", "not a module"),
        ("DURABLE_DATABASE_URL", f"mysql://root:{PASSWORD}@db/x"),
        ("DURABLE_LISTEN_URL", f"http://root:{PASSWORD}@db/x"),
    ],
)
async def test_malformed_setting_exits_2_with_one_line(dsn: str, variable: str, value: str) -> None:
    proc = await cli("run", dsn=dsn, timeout=20, **{variable: value})
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    assert variable in line
    assert "expected" in line
    assert PASSWORD not in proc.stderr + proc.stdout
    assert proc.stdout == ""


async def test_malformed_flag_is_named_too(dsn: str) -> None:
    proc = await cli("run", "--queues", "orders=abc", dsn=dsn)
    assert proc.returncode == 2
    assert "--queues" in one_line_error(proc)


@pytest.mark.parametrize("command", [["check"], ["migrate"], ["ls"]])
async def test_password_of_an_unreachable_server_is_never_printed(command: list[str]) -> None:
    proc = await cli(*command, DURABLE_DATABASE_URL=UNREACHABLE, DURABLE_LOG_LEVEL="debug")
    assert proc.returncode == 1
    one_line_error(proc)
    assert PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.timeout(60)
async def test_password_of_an_unreachable_server_is_never_printed_by_run(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = spawn_daemon(
        UNREACHABLE, APP, log=log, DURABLE_DATABASE_URL=UNREACHABLE, DURABLE_LOG_LEVEL="debug"
    )
    try:
        # It gives up with an error, or keeps reporting that it waits for the server.
        async def said_something() -> bool:
            return daemon.poll() is not None or "127.0.0.1" in log.read_text()

        await wait_for(said_something, timeout=30)
    finally:
        kill(daemon)
        await anyio.to_thread.run_sync(partial(daemon.wait, 30))
    text = log.read_text()
    assert "127.0.0.1" in text or "Connect call failed" in text or "durable:" in text, text
    assert PASSWORD not in text


async def test_password_of_a_reachable_server_is_never_printed_by_check_and_migrate(
    dsn: str,
) -> None:
    secret, password = with_password(dsn)
    for command in ("check", "migrate"):
        proc = await cli(command, dsn=secret)
        assert proc.returncode == 0, proc.stderr
        assert password not in proc.stdout + proc.stderr


@pytest.mark.timeout(60)
async def test_password_never_reaches_the_daemon_logs(dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    secret, password = with_password(dsn)
    daemon = spawn_daemon(dsn, APP, log=log, DURABLE_DATABASE_URL=secret, DURABLE_LOG_LEVEL="debug")
    try:
        async with durable.connect(dsn) as client:
            ok = await client.start(q_cli_add, 1, 2)
            # A task whose error quotes the URL: the log line about it must mask it.
            bad = await client.start(q_cli_fail, f"cannot reach {secret}")
            assert await ok.result(timeout=30) == 3
            with pytest.raises(durable.TaskFailed):
                await bad.result(timeout=30)
    finally:
        kill(daemon, signal.SIGTERM)
        await anyio.to_thread.run_sync(partial(daemon.wait, 30))
    assert daemon.returncode == 0
    text = log.read_text()
    events = {json.loads(line).get("event") for line in text.splitlines() if line.startswith("{")}
    assert {"daemon_started", "task_completed", "task_failed", "daemon_stopped"} <= events
    assert password not in text
    assert "cannot reach postgresql://postgres:***@" in text


async def test_listen_url_password_is_masked_and_sigterm_still_stops_the_daemon(
    dsn: str, tmp_path: Path
) -> None:
    log = tmp_path / "daemon.log"
    daemon = spawn_daemon(dsn, APP, log=log, DURABLE_LISTEN_URL=UNREACHABLE)
    try:

        async def retrying() -> bool:
            return "listener_connect_failed" in log.read_text()

        await wait_for(retrying, timeout=20)
        daemon.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(partial(daemon.wait, 20))
    finally:
        kill(daemon)
        await anyio.to_thread.run_sync(daemon.wait)
    assert daemon.returncode == 0
    assert PASSWORD not in log.read_text()


@pytest.mark.timeout(60)
async def test_run_tunes_the_garbage_collector_for_a_daemon(dsn: str) -> None:
    from durable.daemon import GC_YOUNG
    from tests.apps.gc_tasks import QUEUE, gc_settings

    async with durable.connect(dsn) as client:
        handle = await client.start(gc_settings)
        proc = await cli(
            "run", "--app", "tests.apps.gc_tasks", "--burst", dsn=dsn, DURABLE_QUEUES=QUEUE
        )
        assert proc.returncode == 0, proc.stderr
        seen = await handle.result(timeout=10)
    assert seen["threshold"][0] == GC_YOUNG
    assert seen["frozen"] > 0  # what was loaded before serving stays out of collections


def test_the_database_url_can_come_from_a_file(dsn: str, tmp_path: Path) -> None:
    """`--database-url-file` and DURABLE_DATABASE_URL_FILE: no password on a command line,
    where every user on the host sees it in `ps`."""
    secret = tmp_path / "database_url"
    secret.write_text(dsn + "\n")
    secret.chmod(0o600)
    done = durable_cli("ls", "--database-url-file", str(secret), DURABLE_DATABASE_URL="")
    assert done.returncode == 0, done.stderr
    done = durable_cli(
        "ls", DURABLE_DATABASE_URL="", DURABLE_DATABASE_URL_FILE=str(secret)
    )
    assert done.returncode == 0, done.stderr
    helped = durable_cli("run", "--help")
    assert "--database-url-file" in helped.stdout
    assert "process listings" in " ".join(helped.stdout.split())

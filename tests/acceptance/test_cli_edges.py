"""The CLI's rough edges, as a new user meets them: version, pipes, errors that say where,
the embedded server announced, big values cut, bad flags, fork's bounds, arguments from a
file, and daemons killed with -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

import durable
from tests.apps.cli_flows import cli_echo, cli_two_steps
from tests.conftest import server_home
from tests.support.helpers import (
    ROOT,
    daemon_env,
    durable_cli,
    kill,
    run_burst,
    spawn_daemon,
    wait_for,
)

PASSWORD = "s3cretpw"
UNREACHABLE = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x"


async def cli(*args: str, dsn: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    options: dict[str, Any] = {"dsn": dsn, **env}  # env: variables for the subprocess
    return await anyio.to_thread.run_sync(partial(durable_cli, *args, **options))


async def start(dsn: str, fn: object, *args: object) -> int:
    async with durable.connect(dsn) as client:
        handle = await client.start(fn, *args)  # type: ignore[arg-type]  # a Definition
        return handle.id


def test_version() -> None:
    done = durable_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"durable {durable.__version__}"


async def test_show_into_a_closed_pipe_exits_quietly(dsn: str) -> None:
    task_id = await start(dsn, cli_echo, "x" * 100_000)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written, as after `head -1`
    try:
        done = await anyio.to_thread.run_sync(partial(
            subprocess.run, [sys.executable, "-m", "durable", "show", str(task_id), "--full"],
            cwd=ROOT, env=daemon_env(dsn), stdout=write, stderr=subprocess.PIPE, text=True,
            timeout=60,
        ))  # fmt: skip
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 141


async def test_show_piped_to_head(dsn: str) -> None:
    task_id = await start(dsn, cli_echo, "x" * 1_000_000)
    done = await anyio.to_thread.run_sync(partial(
        subprocess.run,
        ["bash", "-o", "pipefail", "-c", f'"{sys.executable}" -m durable show {task_id} --full | head -1'],
        cwd=ROOT, env=daemon_env(dsn), capture_output=True, text=True, timeout=60,
    ))  # fmt: skip
    assert done.stdout.startswith(f"task {task_id} ")
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("env", "flags", "source"),
    [
        ({"DURABLE_DATABASE_URL": UNREACHABLE}, [], "from DURABLE_DATABASE_URL"),
        ({"DATABASE_URL": UNREACHABLE}, [], "from DATABASE_URL"),
        ({}, ["--database-url", UNREACHABLE], "from --database-url"),
    ],
)
async def test_a_connection_error_names_the_url_and_its_source(
    env: dict[str, str], flags: list[str], source: str
) -> None:
    done = await cli("ls", *flags, **env)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("durable: cannot connect to postgresql://postgres:***@127.0.0.1:1/x ")
    assert source in line
    assert PASSWORD not in done.stderr


async def test_a_connection_error_names_a_url_file(tmp_path: Path) -> None:
    secret = tmp_path / "url"
    secret.write_text(UNREACHABLE)
    done = await cli("ls", DURABLE_DATABASE_URL_FILE=str(secret))
    [line] = done.stderr.splitlines()
    assert f"(from DURABLE_DATABASE_URL_FILE {secret})" in line
    assert PASSWORD not in done.stderr


async def test_the_embedded_server_is_announced_and_named_when_it_fails() -> None:
    with server_home() as home:
        home.parent.joinpath("blocker").write_text("")
        # A home that cannot be created: the server cannot start, and the error says which.
        bad = home.parent / "blocker" / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DURABLE_", "PG"))}
        env.pop("DATABASE_URL", None)
        done = await anyio.to_thread.run_sync(partial(
            subprocess.run, [sys.executable, "-m", "durable", "ls"], cwd=ROOT,
            env={**env, "PYTHONPATH": str(ROOT), "DURABLE_HOME": str(bad)},
            capture_output=True, text=True, timeout=60,
        ))  # fmt: skip
    assert done.returncode != 0
    first = done.stderr.splitlines()[0]
    assert first.startswith("durable: no database URL set")
    assert f"using the embedded server in {bad}" in first


async def test_the_embedded_server_is_announced_on_stderr_only(restartable_server: object) -> None:
    from durable.embedded import EmbeddedServer

    assert isinstance(restartable_server, EmbeddedServer)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DURABLE_", "PG"))}
    env.pop("DATABASE_URL", None)
    done = await anyio.to_thread.run_sync(partial(
        subprocess.run, [sys.executable, "-m", "durable", "ls", "--json"], cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT), "DURABLE_HOME": str(restartable_server.home)},
        capture_output=True, text=True, timeout=60,
    ))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "durable: no database URL set (--database-url, DURABLE_DATABASE_URL, DATABASE_URL, "
        f"PG*): using the embedded server in {restartable_server.home}"
    ]


async def test_show_cuts_huge_values_and_full_prints_them(dsn: str) -> None:
    task_id = await start(dsn, cli_echo, "y" * 50_000)
    cut = await cli("show", str(task_id), dsn=dsn)
    assert cut.returncode == 0, cut.stderr
    [line] = [x for x in cut.stdout.splitlines() if x.startswith("arguments")]
    assert line.endswith("more characters; --full prints all)")
    assert "48,004 more characters" in line  # ["yyy..."] is 50,004 characters; 2,000 shown
    assert len(cut.stdout) < 3000
    full = await cli("show", str(task_id), "--full", dsn=dsn)
    assert "y" * 50_000 in full.stdout and "more characters" not in full.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "--since", "soon"],
        ["ls", "--limit", "0"],
        ["ls", "--limit", "many"],
        ["start", "t", "--delay", "later"],
        ["start", "t", "--timeout", "-"],
        ["start", "t", "--priority", "high"],
        ["show", "1", "--branch", "-1"],
        ["fork", "1", "--at", "-1"],
        ["retry", "--since", "x"],
        ["workers", "--limit", "-3"],
        ["check", "--timeout", "never"],
        ["prune", "--older-than", "0"],
        ["prune", "--older-than", "1000000d"],
        ["prune", "--older-than", "1d", "--batch-size", "0"],
        ["run", "--lease", "0.5s"],
        ["run", "--concurrency", "0"],
        ["bench", "--tasks", "none"],
        ["soak", "--daemons", "2"],
    ],
)
async def test_a_bad_flag_value_exits_2_naming_the_flag(argv: list[str]) -> None:
    done = await cli(*argv, DURABLE_DATABASE_URL=UNREACHABLE)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    flag = [a for a in argv if a.startswith("--")][-1]
    assert line.startswith("durable: ") and flag in line, line


async def test_fork_past_the_end_or_of_a_plain_task_fails_in_one_line(dsn: str) -> None:
    flow = await start(dsn, cli_two_steps, 3)
    plain = await start(dsn, cli_echo, 1)
    await run_burst(dsn)
    async with durable.connect(dsn) as client:
        assert await client.result(flow, timeout=10) == 12
        events = len(await client.history(flow))
    past = await cli("fork", str(flow), "--at", str(events + 1), dsn=dsn)
    assert past.returncode == 2
    [line] = past.stderr.splitlines()
    assert f"--at {events + 1} is past the end" in line and f"give 0 to {events}" in line
    notflow = await cli("fork", str(plain), "--at", "0", dsn=dsn)
    assert notflow.returncode == 1
    [line] = notflow.stderr.splitlines()
    assert "is a plain task, not a workflow" in line
    ok = await cli("fork", str(flow), "--at", str(events), dsn=dsn)
    assert ok.returncode == 0, ok.stderr


async def test_start_takes_arguments_from_a_file_or_stdin(dsn: str, tmp_path: Path) -> None:
    big = "z" * 3_000_000  # more than a command line may hold
    path = tmp_path / "args.json"
    path.write_text(json.dumps([big]))
    from_file = await cli("start", "cli_echo", "--allow-unknown", "--args-file", str(path), dsn=dsn)
    assert from_file.returncode == 0, from_file.stderr
    from_stdin = await anyio.to_thread.run_sync(partial(
        subprocess.run, [sys.executable, "-m", "durable", "start", "cli_echo", "--allow-unknown", "--args-file", "-"],
        cwd=ROOT, env=daemon_env(dsn), input=json.dumps({"k": [1, 2]}), capture_output=True,
        text=True, timeout=60,
    ))  # fmt: skip
    assert from_stdin.returncode == 0, from_stdin.stderr
    async with durable.connect(dsn) as client:
        assert (await client.get(int(from_file.stdout))).args == [big]
        assert (await client.get(int(from_stdin.stdout))).args == [{"k": [1, 2]}]
    both = await cli("start", "cli_echo", "[1]", "--args-file", str(path), dsn=dsn)
    assert both.returncode == 2 and "not both" in both.stderr
    missing = await cli("start", "cli_echo", "--allow-unknown", "--args-file", str(tmp_path / "nope"), dsn=dsn)
    assert missing.returncode == 2 and "--args-file" in missing.stderr


@pytest.mark.timeout(60)
async def test_a_daemon_killed_with_9_is_lost_once_its_heartbeats_stop(dsn: str) -> None:
    # A 3s lease: heartbeats every second, lost after three missed ones. The old rule
    # (two minutes of silence) would keep it live past this test's timeout.
    lease = {"DURABLE_LEASE": "3s"}
    daemon = spawn_daemon(dsn, "tests.apps.cli_flows", DURABLE_LEASE="3s")

    async def state() -> str | None:
        done = await cli("workers", "--json", dsn=dsn, **lease)
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        return rows[0]["state"] if rows else None

    try:
        assert await wait_for(state, timeout=30) == "live"
    finally:
        kill(daemon)
        await anyio.to_thread.run_sync(partial(daemon.wait, 30))

    async def lost() -> bool:
        return await state() == "lost"

    await wait_for(lost, timeout=30, interval=0.5)
    queues = await cli("queues", "--json", dsn=dsn, **lease)
    assert all("daemons" not in json.loads(line) for line in queues.stdout.splitlines())


def test_db_url_does_not_start_the_server() -> None:
    with server_home() as home:
        done = durable_cli("db", "url", DURABLE_HOME=str(home))
        assert done.returncode == 1
        assert done.stdout == ""
        assert "not running" in done.stderr and "durable db start" in done.stderr
        assert not home.exists() or not (home / "pg").exists()


def test_check_names_the_embedded_server_it_probes() -> None:
    with server_home() as home:
        done = durable_cli("check", DURABLE_HOME=str(home))
    assert done.returncode == 1
    first, second = done.stderr.splitlines()
    assert first.startswith("durable: no database URL set") and str(home) in first
    assert second == "durable: the embedded database is not running"

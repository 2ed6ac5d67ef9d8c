"""Operator commands as a user runs them: bulk retry and cancel, prune, queues, workers, show,
check against a stopped server, `--help` for every command the README names, and the
daemon's DURABLE_HTTP / DURABLE_RETENTION settings from the command line.

Tasks are set up straight in the tables (any state, any age) and the CLI runs in a
subprocess, without a terminal: commands that ask for confirmation need --yes there.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from durable.embedded import EmbeddedServer
from durable.store import PRUNE_LOCK
from tests.support.helpers import ROOT, durable_cli, kill, spawn_daemon_logged, wait_for

APP = "tests.apps.queue_tasks"


async def cli(*args: str, dsn: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    options: dict[str, Any] = {"dsn": dsn, **env}  # env: variables for the subprocess
    return await anyio.to_thread.run_sync(partial(durable_cli, *args, **options))


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("durable: "), lines[0]
    return lines[0]


@asynccontextmanager
async def connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def make(
    conn: asyncpg.Connection,
    status: str,
    *,
    queue: str = "a",
    name: str = "x",
    age: str = "2 days",
    parent: int | None = None,
) -> int:
    """A task in ``status``, created (and, if finished, finished) ``age`` ago."""
    task_id: int = await conn.fetchval(
        """
        insert into durable.tasks (queue, name, status, parent_id, root_id, created_at, run_at,
                                   finished_at, claim_token, lease_until, error)
        values ($1, $2, $3::text, $4, $4, now() - $5::text::interval, now() - $5::text::interval,
                case when $3 in ('completed', 'failed', 'cancelled')
                     then now() - $5::text::interval end,
                case when $3 = 'running' then 1 end,
                case when $3 = 'running' then now() + interval '1 hour' end,
                case when $3 = 'failed' then '{"type": "E", "message": "m"}'::jsonb end)
        returning id
        """,
        queue, name, status, parent, age,
    )  # fmt: skip
    return task_id


async def statuses(conn: asyncpg.Connection) -> dict[int, str]:
    return {r["id"]: r["status"] for r in await conn.fetch("select id, status from durable.tasks")}


# -- bulk retry ---------------------------------------------------------------------------------


async def test_bulk_retry_acts_only_on_its_filter(dsn: str) -> None:
    async with connection(dsn) as conn:
        target = [await make(conn, "failed") for _ in range(3)]
        other_queue = await make(conn, "failed", queue="b")
        other_name = await make(conn, "failed", name="y")
        cancelled = await make(conn, "cancelled")
        completed = await make(conn, "completed")
        queued = await make(conn, "queued")
        before = await statuses(conn)

        refused = await cli("retry", "--status", "failed", "--queue", "a", "--name", "x", dsn=dsn)
        assert refused.returncode == 2
        assert "pass --yes" in one_line_error(refused)
        assert await statuses(conn) == before

        proc = await cli("retry", "--status", "failed", "--queue", "a", "--name", "x", "--yes",
                         dsn=dsn)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "retried 3 of 3 matching task(s)"
        after = await statuses(conn)
        assert {after[i] for i in target} == {"queued"}
        assert {i: after[i] for i in after if i not in target} == {
            i: before[i] for i in before if i not in target
        }
        rows = await conn.fetch(
            "select attempt, error from durable.tasks where id = any($1::bigint[])", target
        )
        assert all(r["attempt"] == 2 and r["error"] is None for r in rows)

        # The default status is failed; --json reports the counts.
        proc = await cli("retry", "--queue", "b", "--yes", "--json", dsn=dsn)
        assert json.loads(proc.stdout) == {"matched": 1, "retried": 1}
        proc = await cli("retry", "--status", "cancelled", "--yes", "--json", dsn=dsn)
        assert json.loads(proc.stdout) == {"matched": 1, "retried": 1}
        after = await statuses(conn)
        assert after[other_queue] == after[cancelled] == "queued"
        assert (after[other_name], after[completed], after[queued]) == ("failed", "completed",
                                                                        "queued")  # fmt: skip

        nothing = await cli("retry", "--queue", "nowhere", dsn=dsn)
        assert nothing.returncode == 0 and nothing.stdout.startswith("no task matches")


async def test_bulk_retry_since(dsn: str) -> None:
    async with connection(dsn) as conn:
        old = await make(conn, "failed", age="2 days")
        recent = await make(conn, "failed", age="5 minutes")
        proc = await cli("retry", "--since", "1h", "--yes", dsn=dsn)
        assert proc.returncode == 0, proc.stderr
        after = await statuses(conn)
        assert (after[old], after[recent]) == ("failed", "queued")


async def test_single_id_forms_remain_and_do_not_mix_with_filters(dsn: str) -> None:
    async with connection(dsn) as conn:
        failed = await make(conn, "failed")
        queued = await make(conn, "queued")
        proc = await cli("retry", str(failed), dsn=dsn)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"task {failed} queued again (retry)")
        proc = await cli("cancel", str(queued), dsn=dsn)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"cancelled 1 task(s): {queued}"
        mixed = await cli("cancel", str(queued), "--queue", "a", dsn=dsn)
        assert mixed.returncode == 2 and "not both" in one_line_error(mixed)
        bare = await cli("retry", dsn=dsn)
        assert bare.returncode == 2 and "give a task id" in one_line_error(bare)
        assert (await statuses(conn))[failed] == "queued"


# -- bulk cancel ---------------------------------------------------------------------------------


async def test_bulk_cancel_acts_only_on_its_filter(dsn: str) -> None:
    async with connection(dsn) as conn:
        queued = await make(conn, "queued")
        waiting = await make(conn, "waiting")
        running = await make(conn, "running")
        child = await make(conn, "queued", queue="children", parent=waiting)
        done = await make(conn, "completed")
        elsewhere = await make(conn, "queued", queue="b")
        other_name = await make(conn, "queued", name="y")
        before = await statuses(conn)

        refused = await cli("cancel", "--queue", "a", "--name", "x", dsn=dsn)
        assert refused.returncode == 2 and "refusing to cancel 3 task(s)" in refused.stderr
        assert await statuses(conn) == before

        proc = await cli("cancel", "--queue", "a", "--name", "x", "--yes", "--json", dsn=dsn)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"matched": 3, "cancelled": 3, "children_cancelled": 1}
        after = await statuses(conn)
        assert (after[queued], after[waiting], after[child]) == ("cancelled",) * 3
        # A running task is asked to stop; its daemon ends it.
        assert after[running] == "running"
        assert await conn.fetchval(
            "select cancel_requested from durable.tasks where id = $1", running
        )
        assert (after[done], after[elsewhere], after[other_name]) == ("completed", "queued",
                                                                      "queued")  # fmt: skip
        # Asked once is enough: it no longer matches.
        again = await cli("cancel", "--queue", "a", "--name", "x", "--yes", dsn=dsn)
        assert again.stdout.startswith("no task matches")

        proc = await cli("cancel", "--status", "queued", "--yes", dsn=dsn)
        assert proc.stdout.strip() == "cancelled 2 of 2 matching task(s)"
        assert set((await statuses(conn)).values()) == {"cancelled", "completed", "running"}


# -- prune -----------------------------------------------------------------------------------------


async def test_prune_command(dsn: str) -> None:
    async with connection(dsn) as conn:
        old_done = [await make(conn, s) for s in ("completed", "failed", "cancelled")]
        await conn.execute(
            "insert into durable.events (task_id, branch, seq, kind, name, digest, status,"
            " attempt) values ($1, 0, 0, 'step', 's', 'd', 'completed', 1)",
            old_done[0],
        )
        recent = await make(conn, "completed", age="1 hour")
        waiting_parent = await make(conn, "waiting")
        old_child = await make(conn, "completed", parent=waiting_parent)
        unfinished = [await make(conn, s) for s in ("queued", "running")]
        kept = {recent, waiting_parent, old_child, *unfinished}

        refused = await cli("prune", "--older-than", "1d", dsn=dsn)
        assert refused.returncode == 2
        assert "refusing to delete 3 task(s)" in one_line_error(refused)
        assert len(await statuses(conn)) == 8

        await conn.execute("select pg_advisory_lock($1)", PRUNE_LOCK)
        busy = await cli("prune", "--older-than", "1d", "--yes", dsn=dsn)
        assert busy.returncode == 1 and "another process is pruning" in one_line_error(busy)
        await conn.execute("select pg_advisory_unlock($1)", PRUNE_LOCK)

        proc = await cli("prune", "--older-than", "1d", "--yes", "--json", "--batch-size", "1",
                         dsn=dsn)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"tasks": 3, "events": 1, "signals": 0, "workers": 0}
        assert set(await statuses(conn)) == kept
        assert await conn.fetchval("select count(*) from durable.events") == 0

        proc = await cli("prune", "--older-than", "30m", "--yes", dsn=dsn)
        assert proc.stdout.startswith("pruned 1 task(s), 0 event(s)"), proc.stdout
        assert set(await statuses(conn)) == kept - {recent}

    for bad in ("forever", "0"):
        proc = await cli("prune", "--older-than", bad, "--yes", dsn=dsn)
        assert proc.returncode == 2 and "--older-than" in one_line_error(proc)


# -- queues, workers, ls, show -------------------------------------------------------------------


async def test_queues_names_what_no_live_daemon_serves(dsn: str) -> None:
    async with connection(dsn) as conn:
        await conn.execute(
            """
            insert into durable.workers (id, host, pid, queues, names, heartbeat_at, stopped_at)
            values (gen_random_uuid(), 'live', 1, '{"a": 4}', '{x}', now(), null),
                   (gen_random_uuid(), 'gone', 2, '{"a": 4, "b": 4}', '{x,y,z}', now(), now()),
                   (gen_random_uuid(), 'lost', 3, '{"b": 4}', '{z}', now() - interval '1 hour', null)
            """
        )
        await make(conn, "queued", queue="a", name="x", age="1 minute")
        await make(conn, "queued", queue="a", name="y")
        await make(conn, "queued", queue="b", name="z")
        await make(conn, "failed", queue="b", name="w")
        proc = await cli("queues", "--json", dsn=dsn)
        assert proc.returncode == 0, proc.stderr
        rows = {r["queue"]: r for r in map(json.loads, proc.stdout.splitlines())}
        assert rows["a"]["queued"] == 2 and rows["a"]["daemons"] == 1
        assert rows["a"]["unserved"] == ["y"]
        assert rows["a"]["oldest_ready_s"] >= 2 * 86400 - 60
        assert rows["b"]["unserved"] == ["z"] and "daemons" not in rows["b"]
        assert rows["b"]["failed"] == 1


async def test_workers_shows_live_lost_and_stopped(dsn: str) -> None:
    async with connection(dsn) as conn:
        await conn.execute(
            """
            insert into durable.workers (id, host, pid, queues, names, heartbeat_at, stopped_at)
            values (gen_random_uuid(), 'h', 1, '{"a": 4}', '{x}', now(), null),
                   (gen_random_uuid(), 'h', 2, '{"a": 4}', '{x}', now(), now()),
                   (gen_random_uuid(), 'h', 3, '{"a": 4}', '{x}', now() - interval '1 hour', null)
            """
        )
    proc = await cli("workers", "--json", dsn=dsn)
    assert proc.returncode == 0, proc.stderr
    states = {r["pid"]: r["state"] for r in map(json.loads, proc.stdout.splitlines())}
    assert states == {1: "live", 2: "stopped", 3: "lost"}
    lost = await cli("workers", "--state", "lost", "--json", dsn=dsn)
    assert [json.loads(line)["pid"] for line in lost.stdout.splitlines()] == [3]


async def test_ls_filters(dsn: str) -> None:
    async with connection(dsn) as conn:
        a = await make(conn, "failed", queue="a", name="x", age="2 days")
        b = await make(conn, "failed", queue="b", name="x", age="5 minutes")
        c = await make(conn, "completed", queue="a", name="y", age="5 minutes")

    async def ids(*args: str) -> list[int]:
        proc = await cli("ls", "--json", *args, dsn=dsn)
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line)["id"] for line in proc.stdout.splitlines()]

    assert await ids() == [c, b, a]
    assert await ids("--queue", "a") == [c, a]
    assert await ids("--name", "x") == [b, a]
    assert await ids("--since", "1h") == [c, b]
    assert await ids("--status", "failed", "--queue", "b") == [b]
    assert await ids("--limit", "1") == [c]


async def test_show_prints_the_event_log_as_a_timeline(dsn: str) -> None:
    async with connection(dsn) as conn:
        task_id = await conn.fetchval(
            """
            insert into durable.tasks (queue, name, kind, status, attempt, max_attempts,
                                       started_at, error)
            values ('a', 'wf', 'workflow', 'queued', 2, 3, '2030-01-01 00:00:00+00',
                    '{"type": "builtins.OSError", "message": "flaky", "traceback":
                      "Traceback (most recent call last):\\n  in wf\\nOSError: flaky"}')
            returning id
            """
        )
        await conn.execute(
            """
            insert into durable.events (task_id, branch, seq, kind, name, digest, status,
                                        result, attempt, started_at, finished_at)
            values ($1, 0, 0, 'step', 'charge', 'd', 'completed', '"ok"', 1,
                    '2030-01-01 00:00:01+00', '2030-01-01 00:00:02.5+00'),
                   ($1, 0, 1, 'sleep', 'nap', 'd', 'completed', null, 1,
                    '2030-01-01 00:00:03+00', '2030-01-01 00:10:03+00'),
                   ($1, 0, 2, 'step', 'ship', 'd', 'pending', null, 2,
                    '2030-01-01 00:10:04+00', null)
            """,
            task_id,
        )
    proc = await cli("show", str(task_id), dsn=dsn)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "status     queued" in out and "attempt    2 of 3" in out
    assert "last error builtins.OSError: flaky" in out
    assert "OSError: flaky" in out.split("traceback", 1)[1]
    lines = out.split("event log, branch 0", 1)[1].strip().splitlines()
    assert lines[0].split() == ["SEQ", "AT", "TOOK", "KIND", "NAME", "ATTEMPT", "OUTCOME"]
    assert lines[1].split()[:5] == ["0", "+1.00s", "1.50s", "step", "charge"]
    assert lines[2].split()[:5] == ["1", "+3.00s", "0:10:00", "sleep", "nap"]
    assert lines[3].split()[:5] == ["2", "+0:10:04", "...", "step", "ship"]


# -- check, --help --------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_check_exits_1_against_a_stopped_database(
    restartable_server: EmbeddedServer,
) -> None:
    url = restartable_server.url()
    assert url is not None
    ok = await cli("check", dsn=url)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    await anyio.to_thread.run_sync(restartable_server.stop, "fast")
    down = await cli("check", "--timeout", "5", dsn=url)
    assert down.returncode == 1
    assert "unhealthy" in one_line_error(down)


def readme_commands() -> list[str]:
    """Every `durable COMMAND` the README and docs/ name, and the commands of the README's
    CLI table."""
    text = (ROOT / "README.md").read_text()
    everywhere = "\n".join([text, *(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))])
    found = set(re.findall(r"`durable ([a-z]+)", everywhere))
    code = "\n".join(re.findall(r"^```\w*\n(.*?)^```", everywhere, re.MULTILINE | re.DOTALL))
    found |= set(re.findall(r"^\s*durable ([a-z]+)", code, re.MULTILINE))
    table = text.split("## The command line", 1)[1].split("\n\n", 2)[1]
    for row in table.splitlines()[2:]:
        for span in re.findall(r"`([^`]+)`", row.split("|")[1]):
            word = span.removeprefix("durable ").split()[0]
            if not word.startswith("-"):  # `durable --version` is an option, tested apart
                found.add(word)
    return sorted(found)


@pytest.mark.timeout(120)
async def test_every_command_in_the_readme_has_help() -> None:
    commands = readme_commands()
    assert {"run", "ls", "show", "retry", "cancel", "queues", "workers", "check",
            "prune", "db", "fork", "replay"} <= set(commands)  # fmt: skip
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    async def help_of(command: str) -> None:
        results[command] = await cli(command, "--help", DURABLE_DATABASE_URL="postgresql://x@127.0.0.1:1/x")

    async with anyio.create_task_group() as tg:
        for command in commands:
            tg.start_soon(help_of, command)
    for command, proc in results.items():
        assert proc.returncode == 0, (command, proc.stderr)
        assert proc.stdout.startswith(f"usage: durable {command}"), (command, proc.stdout)


# -- DURABLE_HTTP and DURABLE_RETENTION from the command line ------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [("DURABLE_HTTP", "nonsense"), ("DURABLE_HTTP", "host:99999"), ("DURABLE_RETENTION", "forever")],
)
async def test_malformed_http_or_retention_exits_2(dsn: str, variable: str, value: str) -> None:
    proc = await cli("run", "--app", APP, dsn=dsn, **{variable: value})
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    assert variable in line and "expected" in line


async def test_http_port_in_use_is_one_line_and_exit_1(dsn: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await cli("run", "--app", APP, "--http", f"127.0.0.1:{port}", dsn=dsn)
    assert proc.returncode == 1
    # The daemon's log lines go to stderr too; the error is the last line.
    assert proc.stderr.splitlines()[-1] == (
        f"durable: DURABLE_HTTP: cannot listen on 127.0.0.1:{port}: address already in use"
    )


async def test_malformed_http_flag_is_named(dsn: str) -> None:
    proc = await cli("run", "--app", APP, "--http", "9090", dsn=dsn)
    assert proc.returncode == 2
    assert "--http" in one_line_error(proc)


@pytest.mark.timeout(60)
async def test_durable_run_serves_http(dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    daemon = spawn_daemon_logged(dsn, APP, log, "--http", "127.0.0.1:0", DURABLE_RETENTION="7d")
    try:

        async def started() -> dict[str, object] | None:
            for line in log.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("event") == "http_started":
                    event: dict[str, object] = json.loads(line)
                    return event
            return None

        port = int(str((await wait_for(started))["port"]))

        async def get(path: str) -> tuple[int, bytes]:
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                await stream.send(f"GET {path} HTTP/1.1\r\n\r\n".encode())
                data = b""
                try:
                    while chunk := await stream.receive():
                        data += chunk
                except anyio.EndOfStream:
                    pass
            head, _, body = data.partition(b"\r\n\r\n")
            return int(head.split()[1]), body

        assert (await get("/healthz"))[0] == 200

        async def ready() -> bool:
            return (await get("/readyz"))[0] == 200

        await wait_for(ready)
        code, body = await get("/metrics")
        assert code == 200 and b"durable_slots_free{queue=\"default\"} 10.0" in body
    finally:
        kill(daemon, signal.SIGTERM)
        await anyio.to_thread.run_sync(partial(daemon.wait, 30))
    assert daemon.returncode == 0

"""A code change checked before it ships, as a user does it: runs recorded by a daemon on
the first version of a workflow, `durable verify` against an unsafe change (fails at the
position of each run it breaks), the unchanged code and a change behind `ctx.patched`
(pass); `durable show --json` and `verify --file` with no database; then the patched code
deployed: the old runs finish on the old branch, a new run takes the new one."""

from __future__ import annotations

import json
import signal
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

import durable
from tests.apps import ship_v1
from tests.support.helpers import durable_cli, fetchval, kill, spawn_daemon_logged, wait_status

V1, BROKEN, PATCHED = (f"tests.apps.ship_{v}" for v in ("v1", "v2_broken", "v2_patched"))


async def cli(*args: str, dsn: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    options: dict[str, Any] = {"dsn": dsn, **env}
    return await anyio.to_thread.run_sync(partial(durable_cli, *args, **options))


def stop(proc: subprocess.Popen[bytes]) -> None:
    kill(proc, signal.SIGTERM)
    proc.wait(timeout=30)


async def kinds(dsn: str, task_id: int) -> list[str]:
    rows = await fetchval(
        dsn, "select array_agg(kind || ':' || name order by seq) from durable.events "
        "where task_id = $1", task_id,
    )  # fmt: skip
    return list(rows)


@pytest.mark.timeout(240)
async def test_verify_catches_an_unsafe_change_and_patched_keeps_old_runs_on_the_old_branch(
    dsn: str, tmp_path: Path
) -> None:
    log = tmp_path / "daemon.log"
    daemon = spawn_daemon_logged(dsn, V1, log, DURABLE_QUEUES="ship=4")
    try:
        async with durable.connect(dsn) as client:
            done = await client.start(ship_v1.ship, "o-1")
            waiting = await client.start(ship_v1.ship, "o-2")
            await wait_status(dsn, done.id, "waiting", timeout=60)
            await wait_status(dsn, waiting.id, "waiting", timeout=60)
            assert await client.send_event(done.id, "picked")
            assert await done.result(timeout=60) == {"label": "L-o-1", "insured": False}
    finally:
        stop(daemon)

    # The unsafe change: each run fails where it recorded another call.
    broken = await cli("verify", "--app", BROKEN, dsn=dsn)
    assert broken.returncode == 1, broken.stderr
    lines = broken.stdout.splitlines()
    assert "1 passed" not in broken.stdout and "0 passed, 2 failed" in lines[-1]
    for task_id, status in ((done.id, "completed"), (waiting.id, "waiting")):
        (line,) = [x for x in lines if x.startswith(f"FAIL task {task_id} ")]
        assert f"('ship', branch 0, {status}) does not replay at position 1" in line
        assert "recorded event 'picked'" in line and "the code now: step 'insure'" in line

    # The unchanged code and the patched change pass.
    for app in (V1, PATCHED):
        ok = await cli("verify", "--app", app, dsn=dsn)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "verified 2 run(s) from the database against the code loaded: 2 passed, 0 failed" in ok.stdout

    # Filters: by status, and nothing matched is a clear line (and no failure).
    only = await cli("verify", "--app", BROKEN, "--status", "waiting", "--json", dsn=dsn)
    assert only.returncode == 1
    (row,) = [json.loads(x) for x in only.stdout.splitlines()]
    assert (row["task_id"], row["ok"], row["position"]) == (waiting.id, False, 1)
    assert row["recorded"].startswith("event 'picked'") and row["call"].startswith("step 'insure'")
    none = await cli("verify", "--app", BROKEN, "--status", "failed", dsn=dsn)
    assert none.returncode == 0 and none.stdout == ""
    assert "no recorded run of ship matches --status failed: nothing to verify" in none.stderr
    limited = await cli("verify", "--app", BROKEN, "--limit", "1", "--since", "1h", dsn=dsn)
    assert limited.returncode == 1 and f"FAIL task {waiting.id} " in limited.stdout  # the newest
    assert f"FAIL task {done.id} " not in limited.stdout
    unknown = await cli("verify", "--app", V1, "--name", "nosuch", dsn=dsn)
    assert unknown.returncode == 2 and "--name 'nosuch': no workflow of that name" in unknown.stderr

    # One history exported, then checked with no database at all.
    shown = await cli("show", str(waiting.id), "--json", dsn=dsn)
    assert shown.returncode == 0, shown.stderr
    exported = json.loads(shown.stdout)
    assert exported["history_format"] == 1 and exported["branch_shown"] == 0
    assert [e["kind"] for e in exported["events"]] == ["step", "event"]
    assert all(len(e["digest"]) == 32 for e in exported["events"])
    path = tmp_path / "h.json"
    path.write_text(shown.stdout)
    nowhere = {"DURABLE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    offline = await cli("verify", "--file", str(path), "--app", BROKEN, dsn=None, **nowhere)
    assert offline.returncode == 1, offline.stderr
    assert f"FAIL task {waiting.id} ('ship', branch 0, waiting) does not replay at position 1" in offline.stdout
    assert "from the files given" in offline.stdout
    good = await cli("verify", "--file", str(path), "--app", PATCHED, dsn=None, **nowhere)
    assert good.returncode == 0, good.stdout + good.stderr
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({**exported, "events": [{"seq": 0}]}))
    refused = await cli("verify", "--file", str(bad_file), "--app", V1, dsn=None, **nowhere)
    assert refused.returncode == 2 and "events[0].kind is missing" in refused.stderr

    # The patched code deployed: the old run resumes on the old branch, a new run takes
    # the new one and keeps it when it resumes.
    daemon = spawn_daemon_logged(dsn, PATCHED, log, DURABLE_QUEUES="ship=4")
    try:
        async with durable.connect(dsn) as client:
            new = await client.start(ship_v1.ship, "o-3")
            await wait_status(dsn, new.id, "waiting", timeout=60)
            assert await kinds(dsn, new.id) == ["step:label", "patch:insure", "step:insure", "event:picked"]
            for task_id in (waiting.id, new.id):
                assert await client.send_event(task_id, "picked")
            old = await client.result(waiting.id, timeout=60)
            assert old == {"label": "L-o-2", "insured": False}
            assert await new.result(timeout=60) == {"label": "L-o-3", "insured": True}
    finally:
        stop(daemon)
    assert await kinds(dsn, waiting.id) == ["step:label", "event:picked", "step:notify"]

    # The first version no longer fits the run recorded on the new code.
    back = await cli("verify", "--app", V1, "--json", dsn=dsn)
    assert back.returncode == 1
    failed = [r for r in map(json.loads, back.stdout.splitlines()) if not r["ok"]]
    assert [(r["task_id"], r["position"]) for r in failed] == [(new.id, 2)]
    assert failed[0]["recorded"].startswith("step 'insure'")
    assert failed[0]["call"].startswith("event 'picked'")
    assert (await cli("verify", "--app", PATCHED, dsn=dsn)).returncode == 0

"""The repository's scripts in bin/, run as a developer runs them, in their cheap modes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import partial
from pathlib import Path

import anyio
import pytest

from tests.support.helpers import ROOT

BIN = ROOT / "bin"


async def script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # ruff and mypy from the environment running the tests.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return await anyio.to_thread.run_sync(
        partial(
            subprocess.run, [sys.executable, str(BIN / name), *args], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=timeout,
        )
    )


def test_every_script_is_executable_and_documented() -> None:
    testing = (ROOT / "docs" / "testing.md").read_text()
    scripts = sorted(p.name for p in BIN.iterdir() if p.is_file())
    assert {"ab-bench", "release-check"} <= set(scripts)
    for name in scripts:
        assert os.access(BIN / name, os.X_OK), name
        assert f"`bin/{name}" in testing, f"bin/{name} is not described in docs/testing.md"


async def test_ab_bench_help_says_what_it_compares() -> None:
    done = await script("ab-bench", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: bin/ab-bench") and "alternating" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="no git checkout")
async def test_ab_bench_runs_both_revisions_and_reports_median_and_spread(server_dsn: str) -> None:
    done = await script(
        "ab-bench", "HEAD", "HEAD", "--rounds", "1", "--database-url", server_dsn, "--json",
        "--", "throughput", "--tasks", "100", "--concurrency", "4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["a"]["commit"] == report["b"]["commit"] and report["rounds"] == 1
    figures = report["figures"]
    for name in ("throughput.drain_per_s", "throughput.daemon_cpu_us_per_task"):
        row = figures[name]
        for side in ("a", "b"):
            assert row[side]["min"] <= row[side]["median"] <= row[side]["max"]
            assert row[side]["median"] > 0
        assert row["ratio"] > 0
    assert "throughput.tasks" not in figures  # sizes are not figures to compare


async def test_ab_bench_refuses_a_revision_git_does_not_know() -> None:
    done = await script("ab-bench", "no-such-revision-xyz", "HEAD", "--rounds", "1")
    assert done.returncode == 1
    assert done.stderr == "ab-bench: git knows no revision 'no-such-revision-xyz'\n"


@pytest.mark.timeout(300)
async def test_release_check_quick_passes_and_final_wants_a_date() -> None:
    done = await script("release-check", "--quick")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "release-check: ok (quick)" in done.stdout
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    [heading] = re.findall(rf"^## {re.escape(version)}\b.*$", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    final = await script("release-check", "--quick", "--final")
    if not re.search(r"\d{4}-\d{2}-\d{2}", heading):
        assert final.returncode == 1
        assert final.stderr.strip().endswith("has no release date (YYYY-MM-DD)")
    else:
        assert final.returncode == 0, final.stderr

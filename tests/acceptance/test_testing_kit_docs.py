"""docs/testing-your-workflows.md: its example is the files in docs/examples/testing/, and
they pass when pytest runs them in a project of their own, as a user's would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import ROOT

PAGE = ROOT / "docs" / "testing-your-workflows.md"
EXAMPLE = ROOT / "docs" / "examples" / "testing"
FILES = ("conftest.py", "orders.py", "test_orders.py")


def python_blocks() -> list[str]:
    return [m.group(1) for m in re.finditer(r"^```python\n(.*?)^```", PAGE.read_text(),
                                            re.MULTILINE | re.DOTALL)]  # fmt: skip


@pytest.mark.parametrize("name", FILES)
def test_the_page_shows_each_file_whole(name: str) -> None:
    assert (EXAMPLE / name).read_text() in python_blocks()


def test_the_example_passes_as_a_user_runs_it(tmp_path: Path) -> None:
    # Copied out of this repository: no pytest configuration of ours applies to it.
    project = tmp_path / "project"
    project.mkdir()
    for name in FILES:
        shutil.copy(EXAMPLE / name, project / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DURABLE_", "PG"))}
    if "DURABLE_TEST_DSN" in os.environ:
        env["DURABLE_TEST_DSN"] = os.environ["DURABLE_TEST_DSN"]
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout

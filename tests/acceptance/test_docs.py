"""Every command the README and docs/ show is run: as written, in a cheaper form listed here
with its reason, or by the named test that runs it already. Their SQL runs too, their
Python compiles, and their links lead somewhere."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from tests.support.helpers import ROOT, run_burst

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)

DOCUMENTED_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
"""The server the docs' examples name: the tests' server stands in for it."""

SMALL_BENCH = (
    "--tasks 200 --concurrency 8 --workflows 40 --latency-tasks 20 --rate 200"
    " --entity-events 40 --duration 3s --keep 1s --every 1s"
)
"""Sizes that keep a bench run to seconds; later flags override the documented ones."""


def _collect_only(cmd: str) -> str:
    # The suite is what runs this test; collecting it proves the command and its setup.
    # Installing is this environment's own setup.
    return cmd.replace("pip install -e '.[dev]' && ", "") + " --collect-only"


def _ab_bench(cmd: str) -> str:
    return re.sub(r"--rounds \d+", "--rounds 1", cmd) + f" {SMALL_BENCH}"


CHEAPER: list[tuple[str, Callable[[str], str]]] = [
    ("pip install -e '.[dev]' && python -m pytest -q", _collect_only),
    ("DURABLE_TEST_DSN=", _collect_only),
    # The daemon returns once its queues are empty instead of serving for ever.
    ('DURABLE_QUEUES="orders=8,email=32" durable run', lambda c: f"{c} --burst"),
    ("durable bench ", lambda c: f"{c} {SMALL_BENCH}"),
    # One round of each revision, small: the comparison is the script's, not the figures.
    ("bin/ab-bench ", _ab_bench),
    # The full check runs this very test.
    ("bin/release-check", lambda c: "bin/release-check --quick" if c == "bin/release-check" else c),
]
"""Documented command (by prefix) -> what this test runs instead."""

_VERIFY = (
    "tests/acceptance/test_verify.py::"
    "test_verify_catches_an_unsafe_change_and_patched_keeps_old_runs_on_the_old_branch"
)

RUN_ELSEWHERE = {
    "durable ui": "tests/acceptance/test_ui_command.py::test_durable_ui_serves_until_sigterm",
    "pip install . && durable demo": "tests/acceptance/test_demo.py::test_demo_runs_and_charges_once",
    "pip install 'durable[testing]'": (
        "tests/acceptance/test_testing_kit_docs.py::test_the_example_passes_as_a_user_runs_it"
    ),
    "durable soak --duration": "tests/faults/test_soak.py::test_a_short_soak_fires_every_fault_kind_and_every_invariant_holds",
    # Against a user's own module and recorded runs: the test records runs with a daemon,
    # exports one, and verifies changed code both ways.
    "durable verify --app myapp.workflows": _VERIFY,
    "durable show 17 --json > tests/histories/": _VERIFY,
    "durable verify --file tests/histories/": _VERIFY,
    "durable bench throughput latency floor workflows backlog scale": (
        "tests/acceptance/test_bench.py::test_every_workload_runs_verifies_its_count_and_cleans_up"
    ),
}
"""Documented command (by prefix) -> the test that runs it (at a size that takes seconds)."""

GENERATED = {ROOT / "docs" / "configuration.md"}
"""Docs generated from the code, linked before they are written in a fresh checkout."""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    body: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(lang: str) -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == lang:
                found.append(Block(path, text.count("\n", 0, m.start()) + 1, lang, m.group(2)))
    return found


def commands(body: str) -> list[str]:
    """The shell commands of a block: continuations joined, comments and blanks dropped."""
    out: list[str] = []
    pending = ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = re.sub(r"\s+#.*$", "", pending + line).strip()
        pending = ""
        if line and not line.startswith("#"):
            out.append(line)
    return out


def shell_cases() -> list[tuple[str, str]]:
    return [(b.where, c) for b in blocks("sh") for c in commands(b.body)]


def elsewhere(cmd: str) -> str | None:
    return next((test for prefix, test in RUN_ELSEWHERE.items() if cmd.startswith(prefix)), None)


def as_run(cmd: str, server_dsn: str) -> str:
    for prefix, cheaper in CHEAPER:
        if cmd.startswith(prefix):
            cmd = cheaper(cmd)
            break
    return cmd.replace(DOCUMENTED_SERVER, server_dsn)


def test_the_docs_show_commands_at_all() -> None:
    shown = [c for _, c in shell_cases()]
    assert {"durable migrate", "bin/release-check --quick"} <= set(shown)
    assert any(c.startswith("bin/ab-bench ") for c in shown)


@pytest.mark.parametrize("test", sorted(set(RUN_ELSEWHERE.values())))
def test_the_tests_said_to_run_a_command_exist(test: str) -> None:
    path, _, name = test.partition("::")
    assert re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.MULTILINE), test


def test_every_substitution_is_still_used() -> None:
    shown = [c for _, c in shell_cases()]
    for prefix in [p for p, _ in CHEAPER] + list(RUN_ELSEWHERE):
        assert any(c.startswith(prefix) for c in shown), f"no documented command starts {prefix!r}"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("where", "cmd"), shell_cases(), ids=[f"{w} {c[:40]}" for w, c in shell_cases()])
async def test_a_documented_command_runs(where: str, cmd: str, dsn: str, server_dsn: str) -> None:
    if (test := elsewhere(cmd)) is not None:
        pytest.skip(f"run by {test}")
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": dsn,
        "DURABLE_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
        # `durable`, `ruff` and `mypy` from the environment running the tests.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("DATABASE_URL", None)
    run = as_run(cmd, server_dsn)
    done = await anyio.to_thread.run_sync(
        partial(
            subprocess.run, ["bash", "-c", run], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=540, stdin=subprocess.DEVNULL,
        )
    )
    assert done.returncode == 0, f"{where}: `{run}` exited {done.returncode}\n{done.stderr[-3000:]}"


async def _readme_fulfill(ctx: Any, order_id: str) -> None:
    return None


async def _published_as_in_the_readme(dsn: str) -> None:
    """The catalog as a daemon serving the README's `fulfill` (queue `orders`) leaves it:
    durable.start resolves names through it. test_catalog.py's
    test_the_readme_outbox_example_runs_on_a_daemon_serving_only_orders runs the example
    against such a daemon to the end."""
    from durable.registry import Definition, Registry

    reg = Registry()
    reg.add(Definition(name="fulfill", fn=_readme_fulfill, kind="workflow", queue="orders"))
    await run_burst(dsn, reg=reg, queues="orders=8")


@pytest.mark.parametrize("block", blocks("sql"), ids=lambda b: b.where)
async def test_documented_sql_runs(block: Block, dsn: str) -> None:
    if "durable.start(" in block.body:
        await _published_as_in_the_readme(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(block.body)
    finally:
        await conn.close()


@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: b.where)
def test_documented_python_compiles(block: Block) -> None:
    # Top-level `async with` in an example stands for code inside a coroutine.
    source = "async def _example():\n" + "\n".join(f"    {line}" for line in block.body.splitlines())
    ast.parse(source, filename=block.where)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_lead_somewhere(path: Path) -> None:
    text = FENCE.sub("", path.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # external
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if dest in GENERATED and not dest.exists():
            continue
        assert dest.exists(), f"{path.name}: {target} leads nowhere"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{path.name}: no heading for #{anchor} in {dest.name}"


def test_the_modules_the_architecture_names_exist() -> None:
    """The table of who owns what names real files, so that moving code moves the table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Who owns what", 1)[1].split("\n\n")[2]
    named = re.findall(r"`([\w/*]+(?:\.py|/))`", table)
    assert len(named) > 15, named
    for name in named:
        assert list((ROOT / "durable").glob(name)), f"docs/architecture.md names durable/{name}"

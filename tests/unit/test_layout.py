"""The package's import graph and module sizes, read from the source with ``ast``.

Observers (metrics, the HTTP probes), replay (the workflow context) and the store are
handed what they need: they import nothing of the engine that runs tasks, nor tracing.
The daemon only composes; no engine module grows past what a reader takes in at once.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "durable"

ENGINE = {
    "durable.daemon",
    "durable.worker",
    "durable.runner",
    "durable.attempts",
    "durable.acks",
    "durable.housekeeping",
    "durable.shutdown",
    "durable.service",
    "durable.listener",
}
FORBIDDEN = ENGINE | {"durable.tracing"}

OTHERS = ("durable.cli", "durable.settings", "durable.tools", "durable.bench", "durable.floor",
          "durable.soak", "durable.demo", "durable.operator", "durable.limits")
"""Modules other work reshapes (the CLI and the operator tools): left out of the size and
cycle checks here."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every durable module ``path`` imports, at import time or later, typing-only too;
    ``from durable import x`` counts as importing ``durable.x`` when that is a module."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "durable")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "durable":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


def _own(name: str) -> bool:
    return not any(name == o or name.startswith(o + ".") or name.startswith(o + "_")
                   for o in OTHERS)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_observers_replay_and_the_store_import_nothing_of_the_engine_nor_tracing() -> None:
    guarded = [
        m for m in MODULES
        if m in ("durable.metrics", "durable.http", "durable.context", "durable.replay")
        or m == "durable.store" or m.startswith("durable.store.")
    ]
    assert "durable.store.tasks" in guarded and "durable.replay" in guarded
    wrong = {m: sorted(_imports(MODULES[m]) & FORBIDDEN) for m in guarded}
    assert {m: bad for m, bad in wrong.items() if bad} == {}


def test_the_daemon_only_composes() -> None:
    assert _lines(MODULES["durable.daemon"]) < 305


TABLES = {"durable.options"}
"""Modules that are mostly one table (an entry per setting): they grow with what they list,
not with logic."""


def test_no_engine_module_passes_500_lines() -> None:
    sizes = {m: _lines(p) for m, p in MODULES.items() if _own(m) and m not in TABLES}
    assert {m: n for m, n in sizes.items() if n > 500} == {}


def test_no_import_cycle_among_the_engine_modules() -> None:
    graph = {m: {i for i in _imports(p) if i in MODULES and _own(i) and i != m}
             for m, p in MODULES.items() if _own(m)}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


SQL = re.compile(r"^\s*(select\s|insert\s+into\s|update\s+\S+\s+set\s|delete\s+from\s|with\s+\w+\s+as\s*\()")


def test_sql_lives_in_sql_files() -> None:
    """Statements are named queries in sql/*.sql; the loader (store/schema.py) alone holds
    the few that bootstrap it (migrations, databases)."""
    inline: dict[str, list[str]] = {}
    for m, path in MODULES.items():
        if not _own(m) or m == "durable.store.schema":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and SQL.match(node.value)):
                inline.setdefault(m, []).append(node.value[:40])
    assert inline == {}

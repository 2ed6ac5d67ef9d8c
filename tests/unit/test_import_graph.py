"""The package's import graph: tools stay out of the runtime, and nothing imports in a loop.

Imports are read with `ast`, those inside functions included (a lazy import is still an
arrow); imports under `if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.helpers import ROOT

PACKAGE = ROOT / "durable"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path) -> set[str]:
    """The modules of `durable` that the file at `path` imports, anywhere in it."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for other in node.orelse:
                visit(other)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {name for name in found if name in MODULES}


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def is_tool(name: str) -> bool:
    return name == "durable.tools" or name.startswith("durable.tools.")


def test_only_the_tools_and_the_cli_import_the_tools() -> None:
    allowed = ("durable.tools", "durable.cli")
    offenders = {
        name: sorted(filter(is_tool, targets))
        for name, targets in GRAPH.items()
        if not name.startswith(allowed) and any(map(is_tool, targets))
    }
    assert offenders == {}


def test_the_cli_imports_a_tool_only_in_its_command() -> None:
    # At module level, no CLI module reaches a tool: they load inside the handlers.
    for name, path in MODULES.items():
        if not name.startswith("durable.cli"):
            continue
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
        assert not any(map(is_tool, names)), name


def test_durable_run_reaches_no_tool() -> None:
    seen: set[str] = set()
    todo = ["durable.cli.run", "durable.daemon"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH[name])
    assert sorted(filter(is_tool, seen)) == []


def test_durable_run_loads_no_tool_module() -> None:
    code = (
        "import runpy, sys\n"
        "sys.argv = ['durable', 'run', '--help']\n"
        "try:\n"
        "    runpy.run_module('durable', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('durable.tools')), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    assert "usage: durable run" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "[]"


def cycles() -> list[list[str]]:
    """Every strongly connected group of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in GRAPH[v]:
                groups.append(sorted(group))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    return groups


def test_no_import_cycle_inside_the_package() -> None:
    assert cycles() == []


def test_the_graph_sees_lazy_imports() -> None:
    # The tools are imported only inside handlers: the graph must still see those arrows.
    assert "durable.tools.bench" in GRAPH["durable.cli.tools"]
    assert "durable.tools.demo" in GRAPH["durable.cli.tools"]


def is_cli(name: str) -> bool:
    return name == "durable.cli" or name.startswith("durable.cli.")


def test_command_modules_import_only_the_core() -> None:
    commands = [n for n in GRAPH if is_cli(n) and n not in ("durable.cli", "durable.cli.core")]
    assert len(commands) >= 6
    for name in commands:
        assert {t for t in GRAPH[name] if is_cli(t)} <= {"durable.cli.core"}, name
    assert not any(map(is_cli, GRAPH["durable.cli.core"]))


def test_only_the_cli_imports_the_cli() -> None:
    outside = {n for n, targets in GRAPH.items() if not is_cli(n) and any(map(is_cli, targets))}
    assert outside <= {"durable.__main__"}


def test_only_the_test_kit_imports_the_test_kit() -> None:
    # durable.testing imports pytest: nothing a daemon or a client loads may reach it.
    def is_kit(name: str) -> bool:
        return name == "durable.testing" or name.startswith("durable.testing.")

    offenders = {
        name: sorted(filter(is_kit, targets))
        for name, targets in GRAPH.items()
        if not is_kit(name) and any(map(is_kit, targets))
    }
    assert offenders == {}

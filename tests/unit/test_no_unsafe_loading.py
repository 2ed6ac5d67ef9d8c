"""durable never turns stored or received bytes into code: no pickle, no eval or exec, no
YAML loader that builds objects. A row in the database is data, whoever wrote it."""

from __future__ import annotations

import re
from pathlib import Path

import durable

PACKAGE = Path(durable.__file__).resolve().parent
_MODULES = r"(?:c?pickle|_pickle|marshal|shelve|dill|cloudpickle|jsonpickle)"
FORBIDDEN = re.compile(
    rf"\bimport\s+{_MODULES}\b|\bfrom\s+{_MODULES}\s+import\b|\b{_MODULES}\.\w+\(|"
    r"(?<![\w.])eval\(|(?<![\w.])exec\(|\byaml\.(?:load|unsafe_load|full_load)\(|"
    r"__import__\("
)


def test_the_package_never_loads_code_from_data() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_pattern_finds_what_it_forbids() -> None:
    for line in ("import pickle", "from pickle import loads", "pickle.loads(b)", "eval(text)",
                 "x = exec(code)", "yaml.load(f)", "marshal.loads(b)", "__import__(name)"):
        assert FORBIDDEN.search(line), line
    for line in ("ctx.evaluate(x)", "self.exec_step()", "yaml.safe_load(f)", "retrieval(",
                 '"""errors (never pickle)."""'):
        assert not FORBIDDEN.search(line), line

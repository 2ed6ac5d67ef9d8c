"""Registration: decorators, entry points, duplicate names, bad options."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import durable
from durable import registry as reg
from durable.errors import ConfigurationError


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[reg.Registry]:
    fresh = reg.Registry()
    monkeypatch.setattr(reg, "registry", fresh)
    for mod in [m for m in sys.modules if m.startswith("tests.apps.")]:
        monkeypatch.delitem(sys.modules, mod)
    yield fresh


def test_decorator_defaults_and_options(fresh_registry: reg.Registry) -> None:
    @durable.task
    async def plain(x: int) -> int:
        return x

    @durable.workflow(name="custom", queue="orders", max_attempts=7, timeout=3, priority=2)
    async def flow(ctx: durable.Context) -> None:
        return None

    assert fresh_registry.names() == ["custom", "plain"]
    d = fresh_registry.get("custom")
    assert d is not None
    assert (d.kind, d.queue, d.max_attempts, d.timeout, d.priority) == (
        "workflow", "orders", 7, 3, 2,
    )
    assert plain.kind == "task" and plain.queue == "default"
    assert plain.options(queue="other").queue == "other"


def test_sync_function_is_refused(fresh_registry: reg.Registry) -> None:
    with pytest.raises(ConfigurationError, match="async def"):
        durable.task(lambda: None)  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_attempts": 0}, "max_attempts must be >= 1"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"queue": ""}, "queue name"),
        ({"name": "x" * 201}, "1 to 200 characters"),
        # A period past a year leaves the range of a timestamp in the claim.
        ({"concurrency_key": str, "key_rate": (1, 1e12)}, "key_rate must be"),
        ({"concurrency_key": str, "key_rate": (1, float("nan"))}, "key_rate must be"),
    ],
)
def test_bad_options_are_refused(
    fresh_registry: reg.Registry, options: dict[str, object], message: str
) -> None:
    async def fn() -> None:
        return None

    with pytest.raises(ConfigurationError, match=message):
        durable.task(**options)(fn)  # type: ignore[call-overload]
    assert fresh_registry.names() == []


def test_two_definitions_with_one_name_stop_startup_naming_both(
    fresh_registry: reg.Registry,
) -> None:
    with pytest.raises(ConfigurationError) as err:
        reg.load(["tests.apps.duplicate_a", "tests.apps.duplicate_b"], use_entry_points=False)
    message = str(err.value)
    assert "'dup_clash'" in message
    assert "tests.apps.duplicate_a:first" in message
    assert "tests.apps.duplicate_b:second" in message


def test_reimporting_the_same_function_is_not_a_duplicate(fresh_registry: reg.Registry) -> None:
    reg.load(["tests.apps.duplicate_a"], use_entry_points=False)
    del sys.modules["tests.apps.duplicate_a"]
    reg.load(["tests.apps.duplicate_a"], use_entry_points=False)
    assert fresh_registry.names() == ["dup_clash"]


def test_entry_points_of_group_durable_are_loaded(
    fresh_registry: reg.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = tmp_path / "durable_test_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: durable-test-plugin\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text("[durable]\ntests = tests.apps.entry_point_tasks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = reg.load([])
    assert "ep_loaded_task" in loaded.names()


def test_a_module_that_fails_to_import_is_a_clear_error(fresh_registry: reg.Registry) -> None:
    with pytest.raises(ConfigurationError, match=r"cannot import 'tests\.apps\.no_such_module'"):
        reg.load(["tests.apps.no_such_module"], use_entry_points=False)


def test_a_name_or_queue_with_a_nul_character_is_refused_at_definition() -> None:
    async def f() -> None: ...

    with pytest.raises(ConfigurationError, match="NUL"):
        durable.task(name="a\x00b")(f)
    with pytest.raises(ConfigurationError, match="NUL"):
        durable.task(name="nul_queue_task", queue="q\x00")(f)


def test_no_definition_the_suite_registers_for_every_daemon_has_a_schedule() -> None:
    """In-process daemons of the suite serve the shared registry: a scheduled definition in
    it (a test module importing an app that declares one) would declare its schedule into
    each test's database and start a task there every tick, breaking tests that count
    rows. A test that needs a schedule builds a Registry of its own, or runs the app in a
    subprocess daemon."""
    from durable.registry import registry as shared

    scheduled = [d.name for d in shared.definitions() if d.schedule is not None]
    assert scheduled == []

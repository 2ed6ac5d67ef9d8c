"""The catalog's pure decisions: what a daemon claims and publishes, what a start by name
takes, and what `durable definitions` reports."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from durable.catalog import (
    CatalogEntry,
    InFlight,
    Served,
    claim_names,
    describe,
    publication,
    spec,
)
from durable.cli.queues import table_rows
from durable.errors import ConfigurationError, DurableError
from durable.registry import Definition, code_digest, workflow
from durable.retry import RetryPolicy


async def _flow(ctx: Any, n: int) -> int:
    return n


async def _other(ctx: Any, n: int) -> int:
    return n + 1


BASE: Definition[Any, Any] = Definition(name="flow", fn=_flow, kind="workflow", queue="q")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_versioned_definition_is_claimed_by_name_and_by_name_and_version() -> None:
    plain = dataclasses.replace(BASE, name="plain")
    versioned = dataclasses.replace(BASE, version="2")
    assert claim_names([plain, versioned]) == ["plain", "flow", "flow\x1f2"]
    assert claim_names([plain]) == ["plain"]  # unversioned: exactly the names, as before


def test_the_publication_carries_every_option() -> None:
    d = dataclasses.replace(
        BASE, max_attempts=5, timeout=30.0, priority=3, retry=RetryPolicy(base=2.0),
        concurrency_key=lambda n: n, key_limit=2, key_rate=(10, 60.0), version="7",
        digest="abc", deadline=3600.0, idempotency="active",
    )  # fmt: skip
    [row] = json.loads(publication([d]))
    assert row == {
        "name": "flow", "version": "7", "digest": "abc", "kind": "workflow", "queue": "q",
        "max_attempts": 5, "timeout": 30.0, "priority": 3,
        "retry": {"base": 2.0, "factor": 2.0, "max_delay": 300.0, "jitter": 0.1,
                  "max_attempts": None},
        "keyed": True, "key_limit": 2, "key_rate_limit": 10, "key_rate_period": 60.0,
        "deadline": 3600.0, "idempotency": "active",
    }  # fmt: skip
    assert spec(BASE)["keyed"] is False


def test_the_code_digest_follows_the_source() -> None:
    assert code_digest(_flow) == code_digest(_flow) != code_digest(_other)
    assert len(code_digest(_flow)) == 16


@pytest.mark.parametrize("version", ["", "x" * 101, "a\x1fb", "a\nb", 2])
def test_a_bad_version_is_refused_where_it_is_declared(version: Any) -> None:
    with pytest.raises(ConfigurationError, match="version must be"):

        @workflow(name=f"bad_version_{id(version)}", version=version)
        async def bad(ctx: Any) -> None: ...


def entry(**changes: Any) -> CatalogEntry:
    fields: dict[str, Any] = dict(
        name="flow", kind="workflow", queue="q", max_attempts=5, timeout=None, priority=0,
        retry={"base": 1.0, "factor": 2.0, "max_delay": 300.0, "jitter": 0.1}, keyed=False,
        key_limit=None, key_rate_limit=None, key_rate_period=None, version="2", digest="d",
        published_by=uuid.uuid4(), published_at=NOW,
    )  # fmt: skip
    fields.update(changes)
    return CatalogEntry(**fields)


def test_a_start_without_the_code_gets_the_published_options() -> None:
    d = entry(max_attempts=4, timeout=9.0, priority=2, deadline=60.0, idempotency="active")
    got = d.definition()
    assert (got.name, got.kind, got.queue, got.max_attempts, got.timeout, got.priority,
            got.version, got.deadline, got.idempotency) == (
        "flow", "workflow", "q", 4, 9.0, 2, "2", 60.0, "active",
    )  # fmt: skip
    # A retry policy this version cannot read is informational: the default stands in.
    assert entry(retry={"nonsense": 1}).definition().retry == RetryPolicy()


def test_a_keyed_definition_cannot_be_started_without_its_key() -> None:
    with pytest.raises(DurableError, match="concurrency key"):
        entry(keyed=True).definition()


def served(version: str | None, options: dict[str, Any] | None = None, age: int = 0) -> Served:
    return Served(
        name="flow", worker_id=uuid.uuid4(), host="h", pid=100 + age, version=version,
        digest="d", spec=options or {"queue": "q"}, started_at=NOW - timedelta(seconds=age),
    )  # fmt: skip


def test_definitions_say_which_version_waits_for_a_daemon() -> None:
    flights = [InFlight("flow", "1", 3, 0, 1), InFlight("flow", "2", 0, 2, 0)]
    [row] = describe([entry()], [served("2")], flights)
    assert row["versions"] == ["2"]
    assert row["tasks"] == {"1": {"queued": 3, "running": 0, "waiting": 1},
                            "2": {"queued": 0, "running": 2, "waiting": 0}}  # fmt: skip
    assert row["problems"] == ["no live daemon has version 1"]
    # An unversioned task runs on any daemon with the name.
    [row] = describe([entry()], [served("2")], [InFlight("flow", None, 5, 0, 0)])
    assert row["problems"] == []
    # No daemon at all: whatever waits, waits for a daemon.
    [row] = describe([entry()], [], [InFlight("flow", None, 1, 0, 0)])
    assert row["problems"] == ["no live daemon serves it"]
    # Nothing waiting, nothing to say.
    assert describe([entry()], [], [])[0]["problems"] == []


def test_definitions_show_live_daemons_that_disagree() -> None:
    rows = describe([entry()], [served("2", {"max_attempts": 3}, age=5),
                                served("2", {"max_attempts": 7})], [])  # fmt: skip
    assert any("disagree" in p for p in rows[0]["problems"])
    assert [d["pid"] for d in rows[0]["daemons"]] == [105, 100]  # the oldest first
    agreed = describe([entry()], [served("2"), served("2", age=1)], [])
    assert agreed[0]["problems"] == []


def test_the_table_shows_one_line_per_name() -> None:
    flights = [InFlight("flow", "1", 3, 0, 0), InFlight("flow", "2", 0, 0, 0)]
    [line] = table_rows(describe([entry()], [served("2")], flights))
    assert line == {
        "name": "flow", "kind": "workflow", "queue": "q", "version": "2", "served": ["2"],
        "daemons": ["h:100"], "in_flight": ["1: 3"],
        "problems": "no live daemon has version 1",
    }  # fmt: skip

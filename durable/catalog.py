"""The catalog of definitions: what a daemon publishes of its code, what a start by name
takes from it, and what `durable definitions` shows (pure functions).

Each daemon publishes its definitions (kind, queue, defaults, version, a digest of the
code) when it starts and with every heartbeat; the store writes only what changed. A
start by name from a process without the code (``client.start("name")``, ``durable
start``, SQL ``durable.start``) takes the definition's kind, queue, defaults and version
from it; explicit arguments win. Where two live daemons publish different options for one
name, the daemon started last wins (a rolling deploy moves every name to the new code's
options as its first daemon starts) and `durable definitions` shows the disagreement.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from durable.errors import ConfigurationError, DurableError, UnknownDefinition
from durable.registry import Definition
from durable.retry import RetryPolicy

VERSION_SEPARATOR = "\x1f"
"""Joins a name and its version in the names a daemon claims (chr(31) in durable.claim).
Neither a version nor a name can hold it (both are refused where they are defined), so
no name and version spell another's."""

SPEC_FIELDS = (
    "kind", "queue", "max_attempts", "timeout", "priority", "retry", "keyed", "key_limit",
    "key_rate_limit", "key_rate_period", "deadline", "idempotency",
)  # fmt: skip
"""The options a definition publishes besides its name, version and digest."""


def claim_names(definitions: Iterable[Definition[Any, Any]]) -> list[str]:
    """What a daemon passes to durable.claim: every name it has code for, and for each
    versioned one ``name + chr(31) + version`` (a versioned task is claimed only where its
    version is)."""
    names: list[str] = []
    for d in definitions:
        if VERSION_SEPARATOR in d.name:
            # Built without the decorators' checks: its name could spell another's version.
            raise ConfigurationError(f"{d.name!r}: a name cannot hold the control character \\x1f")
        names.append(d.name)
        if d.version is not None:
            names.append(d.name + VERSION_SEPARATOR + d.version)
    return names


def spec(d: Definition[Any, Any]) -> dict[str, Any]:
    """The options of ``d`` as the catalog holds them."""
    rate = d.key_rate
    return {
        "kind": d.kind,
        "queue": d.queue,
        "max_attempts": d.max_attempts,
        "timeout": d.timeout,
        "priority": d.priority,
        "retry": dataclasses.asdict(d.retry),
        "keyed": d.concurrency_key is not None,
        "key_limit": d.key_limit,
        "key_rate_limit": rate[0] if rate else None,
        "key_rate_period": rate[1] if rate else None,
        "deadline": d.deadline,
        "idempotency": d.idempotency,
    }


def publication(definitions: Iterable[Definition[Any, Any]]) -> str:
    """The JSON array a daemon publishes: one object per definition, name, version and
    digest with its options."""
    return json.dumps(
        [{"name": d.name, "version": d.version, "digest": d.digest, **spec(d)}
         for d in definitions]
    )


@dataclass(frozen=True)
class CatalogEntry:
    """A name as the catalog resolves it: the newest publication's options."""

    name: str
    kind: str
    queue: str
    max_attempts: int
    timeout: float | None
    priority: int
    retry: Mapping[str, Any]
    keyed: bool
    key_limit: int | None
    key_rate_limit: int | None
    key_rate_period: float | None
    version: str | None
    digest: str
    published_by: UUID
    published_at: datetime
    deadline: float | None = None
    idempotency: str = "forever"

    def definition(self) -> Definition[Any, Any]:
        """A Definition with these options, for a start without the code. A definition
        whose code computes a concurrency key cannot be started so: its key is unknown."""
        if self.keyed:
            raise DurableError(
                f"{self.name!r} limits its tasks per concurrency key, which its code "
                "computes from the arguments: start it from a process that imports it, "
                "or from SQL with durable.start(..., concurrency_key => ...)"
            )
        try:
            retry = RetryPolicy(**self.retry)
        except (TypeError, ValueError):
            retry = RetryPolicy()  # informational here: the daemon running it uses its code's
        return dataclasses.replace(
            Definition.elsewhere(self.name), kind=self.kind, queue=self.queue,
            max_attempts=self.max_attempts, timeout=self.timeout, priority=self.priority,
            retry=retry, version=self.version, digest=self.digest, deadline=self.deadline,
            idempotency=self.idempotency,
        )  # fmt: skip


def unknown(name: str, allow: str) -> UnknownDefinition:
    """The one line that refuses a name no daemon ever published; ``allow`` says how to
    start it anyway."""
    return UnknownDefinition(
        f"no daemon has published a definition named {name!r}; check the name, or {allow} "
        "to start it anyway (it waits until a daemon has its code)"
    )


@dataclass(frozen=True)
class Served:
    """One live daemon's publication of one name."""

    name: str
    worker_id: UUID
    host: str
    pid: int
    version: str | None
    digest: str
    spec: Mapping[str, Any]
    started_at: datetime


@dataclass(frozen=True)
class InFlight:
    """Unfinished tasks of one name and version, by status."""

    name: str
    version: str | None
    queued: int
    running: int
    waiting: int


def version_label(version: str | None) -> str:
    return "-" if version is None else version


def describe(
    entries: Sequence[CatalogEntry], served: Sequence[Served], in_flight: Sequence[InFlight]
) -> list[dict[str, Any]]:
    """The rows of `durable definitions`: one per name, with the versions live daemons
    serve, the daemons, the unfinished tasks per version, and what is wrong (tasks of a
    version no live daemon has; live daemons disagreeing on options)."""
    by_name: dict[str, list[Served]] = {}
    for s in served:
        by_name.setdefault(s.name, []).append(s)
    flights: dict[str, list[InFlight]] = {}
    for f in in_flight:
        flights.setdefault(f.name, []).append(f)
    rows = []
    for e in sorted(entries, key=lambda e: e.name):
        daemons = sorted(by_name.get(e.name, []), key=lambda s: s.started_at)
        live_versions = {s.version for s in daemons}
        tasks = {
            version_label(f.version): {"queued": f.queued, "running": f.running,
                                       "waiting": f.waiting}
            for f in sorted(flights.get(e.name, []), key=lambda f: version_label(f.version))
        }
        problems = []
        # An unversioned task runs on any daemon with the name; a versioned one only where
        # its version is.
        stranded = sorted(
            version_label(f.version) for f in flights.get(e.name, [])
            if (f.queued or f.waiting) and (
                not daemons or (f.version is not None and f.version not in live_versions))
        )  # fmt: skip
        if stranded:
            problems.append(f"no live daemon has version {', '.join(stranded)}"
                            if daemons else "no live daemon serves it")  # fmt: skip
        specs = {json.dumps(dict(s.spec), sort_keys=True) for s in daemons}
        if len(specs) > 1:
            problems.append(f"live daemons disagree on its options ({len(specs)} variants); "
                            "the newest daemon's apply")  # fmt: skip
        rows.append({
            "name": e.name,
            "kind": e.kind,
            "queue": e.queue,
            "version": e.version,
            "digest": e.digest,
            "max_attempts": e.max_attempts,
            "timeout": e.timeout,
            "priority": e.priority,
            "retry": dict(e.retry),
            "key_limit": e.key_limit,
            "key_rate": (None if e.key_rate_limit is None
                         else f"{e.key_rate_limit}/{e.key_rate_period:g}s"),
            "deadline": e.deadline,
            "idempotency": e.idempotency,
            "versions": sorted({version_label(s.version) for s in daemons}),
            "daemons": [
                {"id": str(s.worker_id), "host": s.host, "pid": s.pid, "version": s.version,
                 "digest": s.digest}
                for s in daemons
            ],
            "tasks": tasks,
            "published_at": e.published_at,
            "problems": problems,
        })  # fmt: skip
    return rows

"""The catalog of definitions: what daemons publish, and what a start by name reads."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from durable.catalog import CatalogEntry, InFlight, Served
from durable.store.database import Part


def _entry(r: asyncpg.Record) -> CatalogEntry:
    return CatalogEntry(
        name=r["name"], kind=r["kind"], queue=r["queue"], max_attempts=r["max_attempts"],
        timeout=r["timeout"], priority=r["priority"], retry=json.loads(r["retry"]),
        keyed=r["keyed"], key_limit=r["key_limit"], key_rate_limit=r["key_rate_limit"],
        key_rate_period=r["key_rate_period"], version=r["version"], digest=r["digest"],
        published_by=r["published_by"], published_at=r["published_at"],
        deadline=r["deadline"], idempotency=r["idempotency"],
    )  # fmt: skip


class Catalog(Part):
    """Publishing definitions, resolving names, and what `durable definitions` reads."""

    async def register_definitions(self, worker_id: uuid.UUID, publication: str) -> None:
        """Record what daemon ``worker_id`` serves (``durable.catalog.publication``)."""
        await self.pool.execute(self.q["register_definitions"], worker_id, publication)

    async def publish_definitions(
        self, worker_id: uuid.UUID, publication: str, live_within: float
    ) -> list[str]:
        """Write the definitions that changed, where this daemon is the newest live one
        serving them; returns the names written."""
        rows = await self.pool.fetch(
            self.q["publish_definitions"], worker_id, publication, live_within
        )
        return [r["name"] for r in rows]

    async def resolve_definition(self, name: str, conn: Any = None) -> CatalogEntry | None:
        row = await (conn or self.pool).fetchrow(self.q["resolve_definition"], name)
        return _entry(row) if row is not None else None

    async def list_definitions(self) -> list[CatalogEntry]:
        return [_entry(r) for r in await self.pool.fetch(self.q["list_definitions"])]

    async def served_definitions(self, live_within: float) -> list[Served]:
        return [
            Served(
                name=r["name"], worker_id=r["worker_id"], host=r["host"], pid=r["pid"],
                version=r["version"], digest=r["digest"], spec=json.loads(r["spec"]),
                started_at=r["started_at"],
            )
            for r in await self.pool.fetch(self.q["served_definitions"], live_within)
        ]

    async def in_flight_versions(self) -> list[InFlight]:
        return [InFlight(**dict(r)) for r in await self.pool.fetch(self.q["in_flight_versions"])]

    async def live_versions(self, live_within: float) -> set[tuple[str, str | None]]:
        rows = await self.pool.fetch(self.q["live_versions"], live_within)
        return {(r["name"], r["version"]) for r in rows}

"""A daemon's entry in the catalog: published as it starts, again with each heartbeat."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import anyio

from durable import catalog
from durable.logs import get_logger, redact
from durable.registry import Definition
from durable.store import Store, is_fatal

log = get_logger("durable.publisher")


class Publisher:
    """Publishes what this daemon serves (durable/catalog.py). Unchanged rows are not
    written; a name whose newest publisher died goes back to a live daemon's options at
    that daemon's next beat."""

    def __init__(
        self,
        store: Store,
        worker_id: uuid.UUID,
        definitions: Sequence[Definition[Any, Any]],
        lease: float,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.names = [d.name for d in definitions]
        self.claim_names = catalog.claim_names(definitions)
        """What the queue loops claim: every name, and each versioned one with its version."""
        self.publication = catalog.publication(definitions)
        self.lease = lease

    async def start(self, queues: dict[str, int]) -> None:
        """Register this daemon (its queues and names) and publish its definitions, before
        its first claim: a start by name resolves through the catalog."""
        await self.store.register_worker(self.worker_id, queues, self.names)
        await self.store.register_definitions(self.worker_id, self.publication)
        await self.publish()

    async def publish(self) -> list[str]:
        return await self.store.publish_definitions(
            self.worker_id, self.publication, self.lease
        )

    async def run(self) -> None:
        interval = self.lease / 3  # the heartbeat's
        while True:
            await anyio.sleep(interval)
            try:
                with anyio.fail_after(interval):
                    written = await self.publish()
            except Exception as exc:
                if is_fatal(exc):
                    raise
                log.warning("publish_failed", error=redact(f"{type(exc).__name__}: {exc}"))
                continue
            if written:
                log.info("definitions_published", names=written)

"""Acknowledgements: completions and workflow checkpoints, group-committed on kept
connections (see batch.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import anyio
from anyio.abc import TaskStatus

from durable import logs
from durable.batch import Batcher
from durable.logs import get_logger, redact
from durable.metrics import Metrics
from durable.models import Checkpoint, Claimed
from durable.shutdown import Shutdown
from durable.store import KeptConnection, Store, is_transient

log = get_logger("durable.acks")

FLUSH_CONNECTIONS = 3
"""Kept for the group commits: one for completions, one per checkpoint flight."""

COMPLETION_BYTES = 4 * 1024 * 1024
"""Result text one completion statement carries at most (a single larger result goes
alone). The client encodes a statement's parameters on the event loop in one go: many
large results in one statement would hold it up for as long, heartbeats included."""


class Completion(NamedTuple):
    task: Claimed
    result: str
    elapsed: float


class Acks:
    """Owns the writes that end attempts in batches: results and checkpoints."""

    def __init__(self, store: Store, metrics: Metrics, deadline: float = 30.0) -> None:
        self.store = store
        self.metrics = metrics
        self.deadline = deadline
        """Seconds a write waits for its answer before it is given up, its connection
        closed, and (a completion) tried again on another (store.statement_deadline)."""
        # A flush takes no pool checkout (on an idle pool that costs about a round trip).
        self.completing = [store.kept_connection()]
        self.checkpointing = [store.kept_connection() for _ in range(FLUSH_CONNECTIONS - 1)]
        self.completions: Batcher[Completion, bool] = Batcher(self.complete)
        """Results waiting to be written: their leases are kept until they are."""
        # Two flights: steps go out while the previous batch commits (measured over
        # eight A/B pairs: +9% three-step workflows/s at concurrency 32, even at 128;
        # a second flight for completions measured no better).
        self.checkpoints: Batcher[Checkpoint, bool] = Batcher(
            self.checkpoint, flights=len(self.checkpointing)
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.completions.run)
            await tg.start(self.checkpoints.run)
            task_status.started()

    def pending(self) -> list[Claimed]:
        """Tasks whose results wait for their write: their leases must hold until then."""
        return [c.task for c in self.completions.pending()]

    async def drain(self, shutdown: Shutdown) -> None:
        """Write what was submitted, within the shutdown's last writes, then stop."""
        with shutdown.last_writes() as scope:
            await self.completions.drain()
            await self.checkpoints.drain()
        if scope.cancelled_caught:
            log.warning("task_outcome_not_written", note="a flush in flight got no "
                        "answer; those leases will expire and the tasks run again")
        self.completions.close()
        self.checkpoints.close()

    async def release(self) -> None:
        for conn in self.completing + self.checkpointing:
            await conn.release()

    async def complete(self, items: Sequence[Completion]) -> list[bool]:
        rows = [(c.task.id, c.task.token, c.result) for c in items]
        workflows = {c.task.id for c in items if c.task.kind == "workflow"}
        accepted: dict[int, bool] = {}
        for part in _by_size(rows):
            # Only a workflow has children, whose rows its completion may have to lock.
            write = (
                self.store.complete_many
                if any(r[0] in workflows for r in part)
                else self.store.complete_tasks
            )
            for delay in (0.1, 0.5, 2.0, None):
                try:
                    with anyio.fail_after(self.deadline):
                        accepted.update(await write(part, _idle(self.completing)))
                    break
                except Exception as exc:
                    if not is_transient(exc) or delay is None:
                        log.warning(
                            "task_outcome_not_written", count=len(part),
                            error=redact(str(exc)),
                            note="their leases will expire and they will run again",
                        )
                        break
                    await anyio.sleep(delay)
        info = logs.enabled("info")
        for c in items:
            t = c.task
            cancelled = accepted.get(t.id)
            if cancelled:
                # A cancel committed before the outcome: the task ended cancelled.
                self.metrics.task(t.queue, t.name).cancelled += 1
                log.info("task_cancelled", task_id=t.id, name=t.name, queue=t.queue,
                         note="the cancel came before the result")
            elif cancelled is not None:
                self.metrics.task(t.queue, t.name).completed += 1
                if info:
                    log.info("task_completed", task_id=t.id, name=t.name, queue=t.queue,
                             attempt=t.attempt, seconds=round(c.elapsed, 4))
            else:
                log.warning("task_write_rejected", task_id=t.id, name=t.name, queue=t.queue,
                            write="complete")
        return [c.task.id in accepted for c in items]

    async def checkpoint(self, items: Sequence[Checkpoint]) -> list[Any]:
        """Accepted or not, for each checkpoint; an exception for one the server refused."""
        try:
            with anyio.fail_after(self.deadline):
                refused = await self.store.checkpoint_many(items, _idle(self.checkpointing))
        except Exception as exc:
            if is_transient(exc) or len(items) == 1:
                raise
            # One row the server refuses fails the whole statement: each row again on its
            # own, so only the guilty one fails (names and payloads are checked before
            # they get here; this is the last line).
            log.warning("checkpoint_batch_refused", rows=len(items), error=f"{type(exc).__name__}: {exc}")
            return [await self._checkpoint_one(c) for c in items]
        if not refused:
            self.metrics.checkpoints_written += len(items)
            return [True] * len(items)
        self.metrics.checkpoints_written += len(items) - len(refused)
        return [(c.task_id, c.seq) not in refused for c in items]

    async def _checkpoint_one(self, item: Checkpoint) -> Any:
        try:
            refused = await self.store.checkpoint_many([item])
        except Exception as exc:
            if is_transient(exc):
                raise
            return exc
        if refused:
            return False
        self.metrics.checkpoints_written += 1
        return True


def _by_size(rows: list[tuple[int, int, str]]) -> list[list[tuple[int, int, str]]]:
    """``rows`` in order, cut into statements of at most COMPLETION_BYTES of results."""
    parts: list[list[tuple[int, int, str]]] = [[]]
    size = 0
    for row in rows:
        n = len(row[2])
        if parts[-1] and size + n > COMPLETION_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(row)
        size += n
    return parts


def _idle(conns: list[KeptConnection]) -> KeptConnection | None:
    """A kept connection no flush is using (each flight finds one); else the pool's path."""
    for conn in conns:
        if not conn.busy:
            return conn
    return None

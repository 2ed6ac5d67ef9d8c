"""Workflows: the event log, checkpoints, children, suspension and events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from typing import Any

import anyio
import asyncpg

from durable.codec import dumps, loads
from durable.errors import LeaseLost, TaskCancelled
from durable.models import (
    Checkpoint,
    Event,
    History,
    HistoryEntry,
    NewTask,
)
from durable.store.database import KeptConnection, Part, reset_session, split


class Workflows(Part):
    """The event log, children, timers and events of workflows."""

    async def wake_timers(self) -> int:
        return len(await self.pool.fetch(self.q["wake_timers"]))

    async def timer_wait(self) -> float | None:
        """Seconds until the next timer or deadline is due (zero or less: due now)."""
        return await self.pool.fetchval(self.q["timer_wait"])  # type: ignore[no-any-return]

    async def expire_deadlines(self) -> list[tuple[int, str, str]]:
        """Fail the tasks not running whose deadline passed: (id, name, status) of each."""
        rows = await self.pool.fetch(self.q["expire_deadlines"])
        return [(r["id"], r["name"], r["status"]) for r in rows]

    async def load_events(self, task_id: int, branch: int) -> list[Event]:
        """One branch of a workflow's event log, as recorded."""
        return _events(await self.pool.fetch(self.q["load_events"], task_id, branch))

    async def resume_events(self, task_id: int, branch: int, token: int) -> list[Event]:
        """The event log a claimed workflow replays cold, once patch markers it ends with
        are dropped (see resume_events in queries.sql)."""
        return _events(await self.pool.fetch(self.q["resume_events"], task_id, branch, token))

    async def load_tail(
        self, task_id: int, branch: int, start: int, also: Sequence[int] = ()
    ) -> tuple[int | None, list[Event]]:
        """The events of the branch from position ``start`` on (and at the positions
        ``also``), and the claim token of the attempt that last suspended the task (None:
        none did, or another ran it since)."""
        if also:
            rows = await self.pool.fetch(self.q["load_parked"], task_id, branch, start, list(also))
        else:
            rows = await self.pool.fetch(self.q["load_tail"], task_id, branch, start)
        token = rows[0]["suspend_token"] if rows else None
        return token, _events(r for r in rows if r["seq"] is not None)

    async def checkpoint_many(
        self, items: Sequence[Checkpoint], via: KeptConnection | None = None
    ) -> set[tuple[int, int]]:
        """Write many workflows' checkpoints in one commit; returns the (task, seq) of those
        not written (a zombie's, or a position taken): usually none."""
        # A Checkpoint is a tuple in the field order of durable.checkpoint_epoch_row.
        rows = await (via or self.pool).fetch(self.q["checkpoint"], items)
        return {(r[0], r[1]) for r in rows} if rows else set()

    @asynccontextmanager
    async def fenced(
        self,
        task_id: int,
        token: int,
        *,
        unless_cancelled: bool = False,
        user_code: bool = False,
    ) -> AsyncIterator[Any]:
        """A transaction that commits only while this claim still holds the task (and,
        with ``unless_cancelled``, only while no cancel was asked for: TaskCancelled).
        With ``user_code`` (the connection is handed to the workflow's own function), the
        session is reset before the connection goes back to the pool.

        The fence is checked at the end, just before commit, so a long user transaction
        does not hold the task row's lock (heartbeats would queue behind it). From then
        until the commit ends, heartbeats pass the row by: the fence renews the lease, and
        a commit that outlasts a heartbeat's interval has a renewal queued behind it.
        """
        renewal: _Renewal | None = None
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    yield conn
                    cancelling = await conn.fetchval(
                        self.q["fence_lock"], task_id, token, self.db.lease
                    )
                    if cancelling is None:
                        raise LeaseLost(f"task {task_id}: the claim was lost; not committing")
                    if cancelling and unless_cancelled:
                        # Under the row's lock: a cancel either committed before (seen
                        # here) or waits for this commit and then reaches what it wrote.
                        raise TaskCancelled(task_id)
                    renewal = _Renewal(self, task_id, token)
            finally:
                if renewal is not None:
                    await renewal.settle()
                if user_code:
                    # User code had this connection (a SET, a LISTEN, a session lock would
                    # outlive its transaction): reset it before the pool hands it on. A
                    # round trip that a spawn, with nothing to reset, does not pay.
                    with anyio.CancelScope(shield=True):
                        try:
                            await reset_session(conn)
                        except Exception:
                            conn.terminate()

    async def transaction_step(
        self,
        cp: Checkpoint,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> Any:
        """Run ``fn(conn, *args)`` and write its checkpoint in the same transaction.

        ``timeout`` bounds ``fn`` alone: a commit cut short by it could have gone through
        all the same, and then the try it ended would be neither failed nor done."""
        async with self.fenced(cp.task_id, cp.token, user_code=True) as conn:
            async with asyncio.timeout(timeout):
                result = await fn(conn, *args, **kwargs)
            text = dumps(result, what=f"the result of transaction {cp.name!r}")
            await self._insert_event(conn, cp, status="completed", result=text)
        return result

    async def record_event(self, cp: Checkpoint, /, **fields: Any) -> None:
        async with self.fenced(cp.task_id, cp.token) as conn:
            await self._insert_event(conn, cp, **fields)

    async def _insert_event(
        self,
        conn: asyncpg.Connection,
        cp: Checkpoint,
        *,
        status: str,
        result: str | None = None,
        error: str | None = None,
        child_id: int | None = None,
        signal_id: int | None = None,
        wake_at: datetime | None = None,
    ) -> None:
        await conn.execute(
            self.q["insert_event"],
            cp.task_id,
            cp.branch,
            cp.seq,
            cp.kind,
            cp.name,
            cp.digest,
            status,
            result,
            error,
            child_id,
            signal_id,
            wake_at,
            cp.attempt,
            cp.started_at,
        )

    async def spawn_children(
        self,
        *,
        task_id: int,
        token: int,
        branch: int,
        attempt: int,
        root_id: int,
        children: Sequence[tuple[int, str, NewTask]],
    ) -> list[int]:
        """Insert child tasks and their `child` events in one fenced transaction; none
        once the workflow's cancel was asked for (TaskCancelled)."""
        ids: list[int] = []
        async with self.fenced(task_id, token, unless_cancelled=True) as conn:
            for part in split(children, _child_bytes, STATEMENT_BYTES):
                rows = await conn.fetch(
                    self.q["insert_children"],
                    [c[2].queue for c in part],
                    [c[2].name for c in part],
                    [c[2].kind for c in part],
                    [c[2].args for c in part],
                    [c[2].kwargs for c in part],
                    [c[2].priority for c in part],
                    [c[2].max_attempts for c in part],
                    [c[2].timeout for c in part],
                    list(range(len(part))),
                    task_id,
                    root_id,
                    [c[2].concurrency_key for c in part],
                    [c[2].key_limit for c in part],
                    [c[2].key_rate_limit for c in part],
                    [c[2].key_rate_period for c in part],
                    [c[2].trace_context for c in part],
                    [c[2].version for c in part],
                    [c[2].deadline for c in part],
                )
                part_ids: list[int] = [r["id"] for r in rows]
                await conn.execute(
                    self.q["insert_child_events"],
                    task_id,
                    branch,
                    attempt,
                    [c[0] for c in part],
                    [c[2].name for c in part],
                    [c[1] for c in part],
                    part_ids,
                )
                ids += part_ids
        return ids

    async def record_children(
        self,
        task_id: int,
        token: int,
        branch: int,
        rows: Sequence[tuple[int, str, str | None, str | None]],
    ) -> bool:
        """Record in the parent's log the outcomes it saw of its children (seq, status,
        result, error); False when the claim was lost."""
        parts = split(rows, _outcome_bytes, STATEMENT_BYTES)
        if len(parts) == 1:
            return await self._record(self.pool, task_id, token, branch, rows)
        # One transaction: its first statement locks the task's row, so only that one can
        # find the claim lost (and then it recorded nothing).
        async with self.pool.acquire() as conn, conn.transaction():
            for part in parts:
                if not await self._record(conn, task_id, token, branch, part):
                    return False
        return True

    async def child_events(self, task_id: int, branch: int, seqs: Sequence[int]) -> list[Event]:
        """The events at positions ``seqs`` of a branch, with their children's states."""
        return _events(await self.pool.fetch(self.q["child_events"], task_id, branch, list(seqs)))

    async def _record(
        self,
        via: Any,
        task_id: int,
        token: int,
        branch: int,
        rows: Sequence[tuple[int, str, str | None, str | None]],
    ) -> bool:
        return bool(
            await via.fetchval(
                self.q["record_children"],
                task_id,
                token,
                branch,
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
            )
        )

    async def resolve_wait(
        self, cp: Checkpoint, event_name: str, deadline: datetime | None, exists: bool
    ) -> tuple[str, str | None]:
        """Settle a ``wait_for_event`` at cp.seq: ('completed', payload JSON),
        ('failed', None) when the deadline passed, or ('pending', None)."""
        async with self.fenced(cp.task_id, cp.token) as conn:
            sig = await conn.fetchrow(self.q["take_signal"], cp.task_id, cp.branch, event_name)
            if sig is not None:
                outcome, payload, signal_id = "completed", sig["payload"], sig["id"]
            elif deadline is not None and deadline <= await conn.fetchval(self.q["now"]):
                outcome, payload, signal_id = "failed", None, None
            else:
                outcome, payload, signal_id = "pending", None, None
            if exists:
                if outcome != "pending":
                    await conn.execute(
                        self.q["settle_wait"],
                        cp.task_id,
                        cp.branch,
                        cp.seq,
                        outcome,
                        payload,
                        signal_id,
                    )
            else:
                await self._insert_event(
                    conn,
                    cp,
                    status=outcome,
                    result=payload,
                    signal_id=signal_id,
                    wake_at=deadline,
                )
        return outcome, payload

    async def suspend(
        self,
        task_id: int,
        token: int,
        branch: int,
        waiting_on: Sequence[int] | None,
        wake_at: datetime | None,
        event: str | None,
    ) -> str | None:
        return await self.pool.fetchval(  # type: ignore[no-any-return]
            self.q["suspend"],
            task_id,
            token,
            branch,
            list(waiting_on) if waiting_on is not None else None,
            wake_at,
            event,
        )

    async def send_event(
        self, task_id: int, name: str, payload: str | None, idempotency_key: str | None = None
    ) -> bool:
        return bool(
            await self.pool.fetchval(self.q["send_event"], task_id, name, payload, idempotency_key)
        )

    async def history(self, task_id: int, branch: int) -> list[HistoryEntry]:
        rows = await self.pool.fetch(self.q["history"], task_id, branch)
        return [
            HistoryEntry(
                seq=r["seq"],
                kind=r["kind"],
                name=r["name"],
                status=r["status"],
                result=loads(r["result"]),
                error=loads(r["error"]),
                child_id=r["child_id"],
                child_status=r["child_status"],
                wake_at=r["wake_at"],
                attempt=r["attempt"],
                started_at=r["started_at"],
                finished_at=r["finished_at"],
            )
            for r in rows
        ]

    async def branches(self, task_id: int) -> list[int]:
        return [r["branch"] for r in await self.pool.fetch(self.q["branches"], task_id)]

    async def histories(
        self,
        names: Sequence[str],
        statuses: Sequence[str] | None,
        since: datetime | None,
        limit: int,
    ) -> list[History]:
        """The newest workflow runs of ``names`` with their event logs (current branch)."""
        runs = await self.pool.fetch(
            self.q["verify_runs"], list(names), list(statuses) if statuses else None, since, limit
        )
        if not runs:
            return []
        rows = await self.pool.fetch(
            self.q["verify_events"], [r["id"] for r in runs], [r["branch"] for r in runs]
        )
        events: dict[int, list[Event]] = {}
        for r in rows:
            events.setdefault(r["task_id"], []).append(
                Event(
                    seq=r["seq"], kind=r["kind"], name=r["name"], digest=r["digest"],
                    status=r["status"], result=r["result"], error=r["error"],
                    child_id=r["child_id"], wake_at=r["wake_at"],
                    child_status=r["child_status"], child_result=r["child_result"],
                    child_error=r["child_error"],
                )
            )
        return [
            History(
                task_id=r["id"], name=r["name"], args=loads(r["args"]), kwargs=loads(r["kwargs"]),
                status=r["status"], branch=r["branch"], attempt=r["attempt"],
                events=tuple(events.get(r["id"], ())),
            )
            for r in runs
        ]


class _Renewal:
    """A lease renewal for a commit that outlasts a heartbeat's interval: sent then, it
    waits for the row's lock behind the commit, and so takes the row the moment the commit
    lets it go, ahead of any reaper (a reaper skips a row someone waits for). Without it,
    a lease that ran out during the commit was reaped at once, the attempt still running."""

    def __init__(self, part: Workflows, task_id: int, token: int) -> None:
        self.part, self.task_id, self.token = part, task_id, token
        self.job: asyncio.Task[Any] | None = None
        # A timer, not a task: most commits end long before it fires, and then it is
        # only cancelled.
        self.timer = asyncio.get_running_loop().call_later(part.db.lease / 3, self._send)

    def _send(self) -> None:
        p = self.part
        self.job = asyncio.get_running_loop().create_task(
            p.pool.execute(p.q["renew_lease"], self.task_id, self.token, p.db.lease)
        )

    async def settle(self) -> None:
        """Once the commit has ended: a renewal not sent is dropped, one sent is awaited
        (it follows the commit at once); a failed one is the next heartbeat's to make."""
        self.timer.cancel()
        if self.job is None:
            return
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(5.0),
            suppress(Exception),
        ):
            await self.job


STATEMENT_BYTES = 4 * 1024 * 1024
"""The text a statement that starts children, records their outcomes or enqueues a
client's start_many carries at most (about): more goes over several statements of one
transaction. Postgres refuses a message over 1 GB by closing the connection, and a
gather of children with large arguments or results (each up to codec.MAX_PAYLOAD)
passed that in one; and the client encodes a statement's parameters on the event loop
in one go (as for the completions' COMPLETION_BYTES, in acks.py)."""


def _child_bytes(child: tuple[int, str, NewTask]) -> int:
    _, dig, t = child
    return len(t.args) + len(t.kwargs) + len(t.trace_context or "") + len(dig) + len(t.name)


def _outcome_bytes(row: tuple[int, str, str | None, str | None]) -> int:
    return len(row[2] or "") + len(row[3] or "")


def _events(rows: Iterable[Any]) -> list[Event]:
    return [
        Event(
            seq=r["seq"],
            kind=r["kind"],
            name=r["name"],
            digest=r["digest"],
            status=r["status"],
            result=r["result"],
            error=r["error"],
            child_id=r["child_id"],
            wake_at=r["wake_at"],
            child_status=r["child_status"],
            child_result=r["child_result"],
            child_error=r["child_error"],
        )
        for r in rows
    ]

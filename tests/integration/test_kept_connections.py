"""Connections kept for the hot statements: a queue loop's claims, a client's single
enqueues and the daemon's group commits (completions, checkpoints) skip the pool's acquire
and release, and a kept connection the server drops is replaced without losing work.

Task names here start with ``kept_``; the queue ``kept_q``.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import anyio

import durable
from durable.store.database import KeptConnection
from tests.support.helpers import execute, fetchval, running_daemon, wait_for, wait_status

STARTED: list[int] = []


@durable.task(name="kept_task", queue="kept_q")
async def kept_task(i: int) -> int:
    STARTED.append(i)
    return i


@durable.workflow(name="kept_flow", queue="kept_q")
async def kept_flow(ctx: durable.Context, i: int) -> int:
    a = await ctx.step("a", kept_task, i)
    return int(await ctx.step("b", kept_task, a + 1))


def _pid(kept: KeptConnection | None) -> int:
    assert kept is not None and kept._conn is not None
    return int(kept._conn.get_server_pid())


async def _terminate(dsn: str, pid: int) -> None:
    await execute(dsn, "select pg_terminate_backend($1)", pid)


async def test_a_queue_loop_claims_on_one_kept_connection_and_replaces_it_when_dropped(
    dsn: str,
) -> None:
    async with running_daemon(dsn, queues="kept_q=4") as daemon, durable.connect(dsn) as client:
        loop = daemon.workers["kept_q"]
        pids = []
        for i in range(3):
            assert await (await client.start(kept_task, i)).result(timeout=20) == i
            pids.append(_pid(loop._conn))
        assert len(set(pids)) == 1  # every claim on the same connection, none from the pool

        # The server drops it while the loop is idle; the next claim takes another.
        lost = anyio.Event()
        assert loop._conn is not None and loop._conn._conn is not None
        loop._conn._conn.add_termination_listener(lambda *_: lost.set())
        await _terminate(dsn, pids[0])
        with anyio.fail_after(20):
            await lost.wait()
        handle = await client.start(kept_task, 3)
        assert await handle.result(timeout=20) == 3
        assert _pid(loop._conn) != pids[0]
        assert loop.claimed == 4


async def test_a_client_enqueues_on_its_kept_connection_and_survives_its_loss(dsn: str) -> None:
    async with durable.connect(dsn, max_size=1) as client:
        kept = client.store._enqueue
        first = await client.start(kept_task, 0)
        pid = _pid(kept)
        second = await client.start(kept_task, 1)
        assert _pid(kept) == pid and second.id == first.id + 1
        # The pool's own connection still serves everything else (the kept one is extra).
        assert (await client.get(first.id)).status == "queued"

        lost = anyio.Event()
        assert kept is not None and kept._conn is not None
        kept._conn.add_termination_listener(lambda *_: lost.set())
        await _terminate(dsn, pid)
        with anyio.fail_after(20):
            await lost.wait()
        third = await client.start(kept_task, 2)
        assert _pid(kept) != pid and third.created and third.id == second.id + 1
    assert await fetchval(dsn, "select count(*) from durable.tasks where name = 'kept_task'") == 3


async def test_concurrent_enqueues_take_the_pool_while_the_kept_connection_is_busy(
    dsn: str,
) -> None:
    async with durable.connect(dsn, max_size=2) as client:
        handles: list[Any] = await asyncio.gather(
            *(client.start(kept_task, i) for i in range(40))
        )
    assert len({h.id for h in handles}) == 40
    assert await fetchval(dsn, "select count(*) from durable.tasks where name = 'kept_task'") == 40


async def test_a_launched_task_starts_before_its_loop_runs_its_next_statement(dsn: str) -> None:
    STARTED.clear()
    seen: list[list[int]] = []
    async with running_daemon(dsn, queues="kept_q=4") as daemon, durable.connect(dsn) as client:
        store = daemon.store
        assert store is not None
        claim, next_due = store.claim, store.next_due

        async def claiming(*args: Any, **kwargs: Any) -> Any:
            claimed = await claim(*args, **kwargs)
            if claimed:
                seen.append([])  # the statements that follow this claim, with what had run
            return claimed

        async def looking(*args: Any, **kwargs: Any) -> Any:
            if seen and not seen[-1]:
                seen[-1].append(len(STARTED))
            return await next_due(*args, **kwargs)

        store.claim, store.next_due = claiming, looking
        handle = await client.start(kept_task, 7)
        await wait_status(dsn, handle.id, "completed")
    # The idle loop's look for due work came after the claimed task had started.
    assert seen == [[1]] and STARTED == [7]


async def test_completions_and_checkpoints_commit_on_kept_connections(dsn: str) -> None:
    """Each flush runs on a connection the daemon keeps for it, the same one flush after
    flush; when the server drops one, the next flush takes another and nothing is lost."""
    used: list[tuple[str, int]] = []
    async with running_daemon(dsn, queues="kept_q=4") as daemon, durable.connect(dsn) as client:
        store = daemon.store
        assert store is not None
        complete_many, checkpoint_many = store.complete_many, store.checkpoint_many

        async def completing(items: Any, via: KeptConnection | None = None) -> Any:
            accepted = await complete_many(items, via)
            used.append(("complete", _pid(via)))
            return accepted

        async def checkpointing(items: Any, via: KeptConnection | None = None) -> Any:
            refused = await checkpoint_many(items, via)
            used.append(("checkpoint", _pid(via)))
            return refused

        store.complete_many = completing
        store.checkpoint_many = checkpointing
        async def recorded(n: int) -> bool:
            return len(used) >= n

        for i in range(3):  # one at a time: each flush finds the first kept connection idle
            assert await (await client.start(kept_flow, i)).result(timeout=20) == i + 1
        # The client sees a completion once it commits, which can be before the daemon's
        # coroutine, resumed, records it.
        await wait_for(partial(recorded, 9))
        completes = {pid for kind, pid in used if kind == "complete"}
        checkpoints = {pid for kind, pid in used if kind == "checkpoint"}
        assert len(completes) == 1 and len(checkpoints) == 1 and completes != checkpoints
        assert len(used) == 9  # three completions, six checkpoints: none took the pool's path

        assert daemon.acks is not None
        for kept in (daemon.acks.completing[0], daemon.acks.checkpointing[0]):
            lost = anyio.Event()
            assert kept._conn is not None
            kept._conn.add_termination_listener(lambda *_, lost=lost: lost.set())
            await _terminate(dsn, _pid(kept))
            with anyio.fail_after(20):
                await lost.wait()
        assert await (await client.start(kept_flow, 10)).result(timeout=20) == 11
        await wait_for(partial(recorded, 12))
        after = {pid for _, pid in used[9:]}
        assert not after & (completes | checkpoints)
    assert daemon.acks is not None
    assert all(k._conn is None for k in daemon.acks.completing + daemon.acks.checkpointing)

"""Claiming ahead of the slots: tasks claimed before a slot is free for them are held like
running ones (heartbeats, cancel, shutdown) and go back to the queue when no slot frees up
in time, so a daemon never sits on work another daemon could run.

Task names here start with ``ahead_``; the queue ``ahead_q`` is served with one slot.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import anyio

import durable
from durable.attempts import Attempt
from durable.batch import Batcher
from durable.registry import registry
from durable.runner import Runner
from durable.store import Store
from durable.worker import ahead
from tests.support.helpers import fetchval, running_daemon, wait_for

RAN: Counter[str] = Counter()
GATE = asyncio.Event()
BLOCKING = asyncio.Event()


@durable.task(name="ahead_block", queue="ahead_q", priority=10)
async def ahead_block() -> str:
    BLOCKING.set()
    await GATE.wait()
    return "unblocked"


@durable.task(name="ahead_follow", queue="ahead_q")
async def ahead_follow(key: str) -> str:
    RAN[key] += 1
    return key


def test_claim_ahead_is_the_slots_that_free_up_during_two_round_trips_or_20_ms() -> None:
    # 1,000 slots freed per second and 1/64 s a claim: 15.6 free up while a claim is out.
    assert ahead(32, 1000, 1 / 64) == 31
    assert ahead(32, 100_000, 1 / 64) == 128  # never more than four sets of slots
    # A fast claim of short tasks still takes a batch: the slots that free up in
    # AHEAD_WINDOW (20 ms), not just in two 1 ms round trips.
    assert ahead(32, 3000, 0.001) == 60
    # Slow tasks (32 slots of 10-minute tasks) get none: nothing waits for a busy slot.
    assert ahead(32, 32 / 600, 0.003) == 0
    assert ahead(32, 0, 0.003) == 0


async def test_tasks_claimed_ahead_go_back_when_no_slot_frees_and_another_daemon_runs_them(
    dsn: str,
) -> None:
    GATE.clear()
    BLOCKING.clear()
    async with durable.connect(dsn) as client:
        blocker = await client.start(ahead_block)
        follows = [await client.start(ahead_follow, f"back-{i}") for i in range(3)]
        # One claim takes the blocker (the one free slot) and three tasks ahead of it.
        async with running_daemon(dsn, queues="ahead_q=1", claim_ahead="3") as first:
            worker = first.workers["ahead_q"]
            await BLOCKING.wait()
            await wait_for(lambda: _true(worker.given_back == 3), timeout=10)
            assert all(RAN[f"back-{i}"] == 0 for i in range(3))
            # Handed back without spending an attempt, while the blocker still runs here.
            # After that it claims nothing ahead until a slot frees up: they stay queued.
            for h in follows:
                info = await client.get(h.id)
                assert (info.status, info.attempt, info.lease_until) == ("queued", 1, None)
            async with running_daemon(dsn, queues="ahead_q=2", claim_ahead="0"):
                for h in follows:
                    assert await h.result(timeout=10) == (await client.get(h.id)).args[0]
            assert (await client.get(blocker.id)).status == "running"
            GATE.set()
            assert await blocker.result(timeout=10) == "unblocked"
    assert [RAN[f"back-{i}"] for i in range(3)] == [1, 1, 1]


async def test_shutdown_hands_back_tasks_claimed_ahead_at_once(dsn: str) -> None:
    GATE.clear()
    BLOCKING.clear()
    async with durable.connect(dsn) as client:
        await client.start(ahead_block)
        follows = [await client.start(ahead_follow, f"stop-{i}") for i in range(2)]
        async with running_daemon(
            dsn, queues="ahead_q=1", claim_ahead="2", shutdown_grace="0"
        ) as daemon:
            await BLOCKING.wait()
            assert len(daemon.attempts) == 3  # the blocker and both tasks held ahead
        for h in follows:
            info = await client.get(h.id)
            assert info.status == "queued" and info.attempt == 1 and info.lease_until is None
    assert RAN["stop-0"] == RAN["stop-1"] == 0


async def test_a_task_cancelled_while_it_waits_for_a_slot_ends_cancelled_unrun(
    dsn: str,
) -> None:
    store = await Store.open(dsn)
    try:
        async with durable.connect(dsn) as client:
            handle = await client.start(ahead_follow, "cancelled-ahead")
            [claimed] = await store.claim("ahead_q", ["ahead_follow"], 1, 30.0, uuid.uuid4())
            attempt = Attempt(claimed)
            attempt.stop("cancelled")  # the cancel notification reached it while it waited
            runner = Runner(store, registry, Batcher(_unused), Batcher(_unused), lambda _: None)
            await runner.run(attempt)
            info = await client.get(handle.id)
        assert info.status == "cancelled"
        assert RAN["cancelled-ahead"] == 0
        assert await fetchval(dsn, "select claim_token from durable.tasks where id = $1",
                              handle.id) is None
    finally:
        await store.close()


async def _unused(items: Sequence[Any]) -> list[bool]:
    raise AssertionError(f"unexpected batched write {items!r}")


async def _true(value: bool) -> bool:
    await anyio.lowlevel.checkpoint()
    return value

"""Plain tasks and their enqueueing attacked: timeouts a task ignores, cancels it ignores
or races, progress from stale or finished attempts, transactional and bulk enqueues."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import durable
from tests.support.helpers import fetchval, running_daemon, wait_for

QUEUE = "ta_q"

EVENTS: dict[str, asyncio.Event] = {}
LIVE = {"now": 0, "most": 0}


def _event(name: str) -> asyncio.Event:
    return EVENTS.setdefault(name, asyncio.Event())


def _enter() -> None:
    LIVE["now"] += 1
    LIVE["most"] = max(LIVE["most"], LIVE["now"])


@durable.task(queue=QUEUE, max_attempts=1, timeout=0.2)
async def ta_swallow(k: str) -> str:
    """Catches its timeout's cancel and goes on until the test lets it return."""
    _enter()
    try:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            _event(f"swallowed-{k}").set()
        await _event(f"go-{k}").wait()
        return k
    finally:
        LIVE["now"] -= 1


@durable.task(queue=QUEUE, max_attempts=1)
async def ta_cancel_ignored(k: str) -> str:
    _enter()
    try:
        try:
            _event(f"started-{k}").set()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            _event(f"swallowed-{k}").set()
        await _event(f"go-{k}").wait()
        return k
    finally:
        LIVE["now"] -= 1


@pytest.fixture(autouse=True)
def _fresh() -> None:
    EVENTS.clear()
    LIVE.update(now=0, most=0)


async def _status(dsn: str, task_id: int) -> str:
    return str(await fetchval(dsn, "select status from durable.tasks where id = $1", task_id))


@pytest.mark.timeout(60)
async def test_a_task_that_swallows_its_timeout_fails_with_timeout_error_and_keeps_its_slot(
    dsn: str,
) -> None:
    async with (
        durable.connect(dsn) as client,
        running_daemon(dsn, queues=f"{QUEUE}=1", claim_ahead=0),
    ):
        first = await client.start(ta_swallow, "a")
        second = await client.start(ta_swallow, "b")
        await asyncio.wait_for(_event("swallowed-a").wait(), 30)
        # Past its timeout, still running its code: the queue's one slot is still taken.
        assert await _status(dsn, second.id) == "queued"
        _event("go-a").set()
        with pytest.raises(durable.TaskFailed, match="timeout"):
            await first.result(timeout=30)
        await asyncio.wait_for(_event("swallowed-b").wait(), 30)
        _event("go-b").set()
        with pytest.raises(durable.TaskFailed, match="timeout"):
            await second.result(timeout=30)
    assert LIVE["most"] == 1


@pytest.mark.timeout(60)
async def test_a_cancel_the_task_swallows_still_ends_it_cancelled(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=f"{QUEUE}=1"):
        handle = await client.start(ta_cancel_ignored, "c")
        await asyncio.wait_for(_event("started-c").wait(), 30)
        await client.cancel(handle.id)
        await asyncio.wait_for(_event("swallowed-c").wait(), 30)
        assert await _status(dsn, handle.id) == "running"
        _event("go-c").set()
        with pytest.raises(durable.TaskCancelled):
            await handle.result(timeout=30)


@durable.task(queue="ta_unserved")
async def ta_noop(*args: Any, **kwargs: Any) -> None:
    return None


@durable.task(queue="ta_unserved", concurrency_key=lambda k, blob="": k, key_limit=1)
async def ta_keyed(k: str, blob: str = "") -> None:
    return None


async def _count(dsn: str, name: str = "ta_noop") -> int:
    return int(await fetchval(dsn, "select count(*) from durable.tasks where name = $1", name))


@pytest.mark.timeout(60)
async def test_a_rolled_back_enqueue_leaves_no_task_and_wakes_nobody(dsn: str) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(dsn)
    await listener.add_listener("durable_ready", lambda *a: heard.put_nowait(a[3]))
    try:
        async with durable.connect(dsn) as client:
            conn = await asyncpg.connect(dsn)
            try:
                tx = conn.transaction()
                await tx.start()
                handle = await client.start(ta_noop, 1, conn=conn)
                many = await client.start_many(ta_noop, [[i] for i in range(10_000)], conn=conn)
                assert len(many) == 10_000
                await tx.rollback()
                # A notification of our own after the rollback: the first one heard.
                await conn.execute("select pg_notify('durable_ready', 'ta_sentinel')")
                assert await asyncio.wait_for(heard.get(), 30) == "ta_sentinel"
                assert await _count(dsn) == 0
                with pytest.raises(durable.DurableError, match="no task"):
                    await client.get(handle.id)
                # Committed late: the task exists, and a daemon runs it, only from then on.
                async with conn.transaction():
                    late = await client.start(ta_noop, 2, conn=conn, queue=QUEUE)
                    assert (
                        await fetchval(
                            dsn, "select count(*) from durable.tasks where id = $1", late.id
                        )
                        == 0
                    )
                assert await asyncio.wait_for(heard.get(), 30) == QUEUE
                async with running_daemon(dsn, queues=QUEUE):
                    assert await late.result(timeout=30) is None
                # A transaction already failed: the enqueue fails as Postgres says, and
                # leaves nothing once rolled back.
                tx = conn.transaction()
                await tx.start()
                with pytest.raises(asyncpg.DataError):
                    await conn.execute("select 1 / 0")
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await client.start(ta_noop, 3, conn=conn)
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await client.start_many("ta_noop", [[1]], conn=conn)
                await tx.rollback()
            finally:
                await conn.close()
    finally:
        await listener.close()
    assert await _count(dsn) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scope", ["forever", "active", "labelled"])
async def test_one_idempotency_key_in_two_open_transactions_makes_one_task(
    dsn: str, scope: str
) -> None:
    options: dict[str, Any] = {"idempotency_key": f"ta-{scope}"}
    if scope == "active":
        options["idempotency"] = "active"
    if scope == "labelled":
        options["tags"] = ["ta"]
    async with durable.connect(dsn) as client:
        a, b = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            ta, tb = a.transaction(), b.transaction()
            await ta.start()
            await tb.start()
            first = await client.start(ta_noop, "a", conn=a, **options)
            # The second waits on the first's key until the first commits.
            second_start = asyncio.ensure_future(client.start(ta_noop, "b", conn=b, **options))
            await wait_for(lambda: fetchval(
                dsn, "select count(*) from pg_locks where not granted"
            ))  # fmt: skip
            assert not second_start.done()
            await ta.commit()
            second = await asyncio.wait_for(second_start, 30)
            await tb.commit()
        finally:
            await a.close()
            await b.close()
    assert (first.created, second.created) == (True, False)
    assert second.id == first.id
    assert await _count(dsn) == 1


@pytest.mark.timeout(60)
async def test_a_key_whose_first_transaction_rolls_back_goes_to_the_second(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        a, b = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            ta, tb = a.transaction(), b.transaction()
            await ta.start()
            await tb.start()
            await client.start(ta_noop, "a", conn=a, idempotency_key="ta-rb")
            second_start = asyncio.ensure_future(
                client.start(ta_noop, "b", conn=b, idempotency_key="ta-rb")
            )
            await wait_for(lambda: fetchval(
                dsn, "select count(*) from pg_locks where not granted"
            ))  # fmt: skip
            await ta.rollback()
            second = await asyncio.wait_for(second_start, 30)
            await tb.commit()
        finally:
            await a.close()
            await b.close()
        assert second.created
        assert (await client.get(second.id)).args == ["b"]
    assert await _count(dsn) == 1


@pytest.mark.timeout(60)
async def test_start_many_of_nothing_writes_nothing(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        assert await client.start_many(ta_noop, []) == []
        assert await client.start_many(ta_keyed, []) == []
        # Nothing to start, but a name nobody published is still a mistake worth naming.
        with pytest.raises(durable.UnknownDefinition):
            await client.start_many("ta_never_published", [])
    assert await fetchval(dsn, "select count(*) from durable.tasks") == 0


@pytest.mark.timeout(120)
async def test_start_many_of_a_hundred_thousand_is_one_statement(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handles = await client.start_many(
            ta_noop, [([i], {"n": i}) if i % 2 else [i] for i in range(100_000)]
        )
    assert len(handles) == 100_000
    ids = [h.id for h in handles]
    assert ids == sorted(ids) and len(set(ids)) == 100_000
    assert await _count(dsn) == 100_000
    # In order: the i-th handle holds the i-th call.
    row = await fetchval(
        dsn, "select args::text || kwargs::text from durable.tasks where id = $1", ids[77_777]
    )
    assert row == '[77777]{"n": 77777}'


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fn", [ta_noop, ta_keyed])
async def test_one_oversize_call_in_a_batch_enqueues_nothing_and_names_its_index(
    dsn: str, fn: Any
) -> None:
    from durable.codec import MAX_PAYLOAD

    fits = "x" * (MAX_PAYLOAD - len('["", ""]') - 1)
    calls: list[Any] = [["k", str(i)] for i in range(10)]
    calls[3] = ["k", fits]
    calls[7] = ["k", fits + "yy"]
    async with durable.connect(dsn) as client:
        with pytest.raises(durable.PayloadError, match=r"call 7\b"):
            await client.start_many(fn, calls)
        assert await fetchval(dsn, "select count(*) from durable.tasks") == 0
        calls[7] = ["k", "7"]
        assert len(await client.start_many(fn, calls)) == 10
    assert await fetchval(dsn, "select count(*) from durable.tasks") == 10


@durable.task(queue=QUEUE, max_attempts=3)
async def ta_polite(k: str) -> str:
    _event(f"started-{k}").set()
    await asyncio.sleep(60)
    return k


@pytest.mark.timeout(60)
async def test_a_task_that_ignores_the_shutdown_does_not_keep_the_others_from_going_back(
    dsn: str,
) -> None:
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, queues=f"{QUEUE}=2", shutdown_grace="0.2"):
            hostile = await client.start(ta_cancel_ignored, "h")
            polite = await client.start(ta_polite, "p")
            await asyncio.wait_for(_event("started-h").wait(), 30)
            await asyncio.wait_for(_event("started-p").wait(), 30)
            started = asyncio.get_running_loop().time()
        took = asyncio.get_running_loop().time() - started
        try:
            # The stop is bounded: the grace, then the last writes' few seconds.
            assert took < 0.2 + 5.0 + 2.0
            # The polite task went back to the queue at once, its attempt unspent.
            info = await client.get(polite.id)
            assert (info.status, info.attempt) == ("queued", 1)
            assert (await client.get(hostile.id)).status in ("running", "queued")
        finally:
            _event("go-h").set()


@pytest.mark.timeout(60)
async def test_progress_after_the_attempt_ended_or_lost_its_claim_writes_nothing(
    dsn: str,
) -> None:
    import uuid

    from durable.taskcontext import TaskContext

    async def stored() -> Any:
        return await fetchval(
            dsn, "select value::text from durable.progress where task_id = $1", handle.id
        )

    async with durable.connect(dsn) as client:
        store = client.store
        handle = await client.start(ta_noop, 1)
        [claimed] = await store.claim("ta_unserved", ["ta_noop"], 1, 60, uuid.uuid4())
        here = TaskContext(claimed, store)
        here.progress(1, "first")
        await here.finish()
        assert await stored() == "1"
        # The lease expired and another daemon claimed the task: the old attempt's reports
        # (a task's background coroutine, say) are dropped.
        await fetchval(
            dsn,
            "update durable.tasks set lease_until = now() - interval '1 s' where id = $1",
            handle.id,
        )
        assert [i for i, _ in await store.reap_expired()] == [handle.id]
        [again] = await store.claim("ta_unserved", ["ta_noop"], 1, 60, uuid.uuid4())
        here.progress(2, "stale")
        await here.finish()
        assert await stored() == "1"
        # Nor once the attempt has finished.
        now = TaskContext(again, store)
        assert await store.complete_many([(again.id, again.token, "null")]) == {again.id: False}
        now.progress(3, "after the end")
        await now.finish()
        assert await stored() == "1"

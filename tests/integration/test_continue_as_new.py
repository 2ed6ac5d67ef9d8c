"""ctx.continue_as_new: a run ends and the next of its chain starts with an empty log."""

from __future__ import annotations

import itertools
import json

import anyio

import durable
from tests.support.helpers import durable_cli, execute, fetchval, running_daemon, wait_status

QUEUE = "wf_chain"


@durable.workflow(queue=QUEUE)
async def wf_counter(ctx: durable.Context, total: int, per_run: int) -> int:
    """Adds the events it is sent; continues as new every `per_run` events."""
    for _ in range(per_run):
        if total >= 10:
            return total
        total += await ctx.wait_for_event("add")
    ctx.continue_as_new(total, per_run)


@durable.workflow(queue=QUEUE)
async def wf_chain_parent(ctx: durable.Context) -> object:
    return await ctx.run(wf_counter, 0, 1)


@durable.workflow(queue=QUEUE)
async def wf_bad_chain(ctx: durable.Context) -> None:
    ctx.continue_as_new(object())


async def test_a_chain_of_runs_each_with_a_short_log(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=QUEUE):
        first = await client.start(wf_counter, 0, 2, idempotency_key="counter-1")
        runs = [first.id]
        for _ in range(5):  # 2 + 2 + ... = 10 after five events
            await wait_status(dsn, runs[-1], "waiting", "completed")
            current = runs[-1]
            # Sent to the run that waits now: the chain's latest.
            while (await client.get(current)).status == "completed":
                _, following = await client.chain(current)
                assert following is not None
                current = following
                runs.append(current)
            await wait_status(dsn, current, "waiting")
            assert await client.send_event(current, "add", 2)
        assert await first.result(timeout=20) == 10
        # Every run but the last ended completed, each pointing at the next.
        last = runs[-1]
        while (await client.chain(last))[1] is not None:
            last = (await client.chain(last))[1]  # type: ignore[assignment]
            runs.append(last)
        assert len(set(runs)) == 3  # [0 -> 2 -> 4], [4 -> 6 -> 8], [8 -> 10 ...]
        for earlier, later in itertools.pairwise(runs):
            assert await client.chain(later) == (earlier, (await client.chain(later))[1])
            info = await client.get(earlier)
            assert info.status == "completed" and info.result is None
        assert (await client.get(last)).result == 10
        # Each run's log holds only its own events.
        for r in runs:
            assert len(await client.history(r)) <= 2
        # The idempotency key went with the chain: starting it again finds the last run.
        again = await client.start(wf_counter, 0, 2, idempotency_key="counter-1")
        assert again.id == last
    shown = await anyio.to_thread.run_sync(lambda: durable_cli("show", str(runs[1]), dsn=dsn))
    assert shown.returncode == 0, shown.stderr
    assert f"chain      previous {runs[0]}   next {runs[2]}" in shown.stdout
    as_json = await anyio.to_thread.run_sync(
        lambda: durable_cli("show", str(runs[0]), "--json", dsn=dsn)
    )
    out = json.loads(as_json.stdout)
    assert (out["continued_from"], out["continued_as"]) == (None, runs[1])


async def test_a_child_may_not_continue_as_new_and_bad_arguments_fail_the_run(dsn: str) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=QUEUE):
        parent = await client.start(wf_chain_parent)
        bad = await client.start(wf_bad_chain)
        await wait_status(dsn, bad.id, "failed")
        failed = await bad.get()
        assert failed.error is not None and "continue_as_new" in failed.error["message"]
        # The child waits for its event; it is then refused the chain.
        child_id = await fetchval(
            dsn, "select id from durable.tasks where parent_id = $1", parent.id
        )
        while child_id is None:
            await anyio.sleep(0.02)
            child_id = await fetchval(
                dsn, "select id from durable.tasks where parent_id = $1", parent.id
            )
        await wait_status(dsn, child_id, "waiting")
        assert await client.send_event(child_id, "add", 1)
        await wait_status(dsn, child_id, "failed")
        child = await client.get(child_id)
        assert child.error is not None and "is a child of" in child.error["message"]
        assert await client.chain(child_id) == (None, None)


async def test_the_chain_statement_is_fenced_and_a_cancel_asked_first_wins(dsn: str) -> None:
    async with durable.connect(dsn) as client:
        handle = await client.start(wf_counter, 0, 1, idempotency_key="k")
    claim = (
        "update durable.tasks set status = 'running', claim_token = 7,"
        " lease_until = now() + interval '1 minute' where id = $1"
    )
    await execute(dsn, claim, handle.id)
    # Another claim's token: nothing happens.
    assert await fetchval(dsn, CONTINUE, handle.id, 8) is None
    await execute(dsn, "update durable.tasks set cancel_requested = true where id = $1", handle.id)
    assert await fetchval(dsn, CONTINUE, handle.id, 7) == 0
    assert await fetchval(dsn, "select status from durable.tasks where id = $1", handle.id) == (
        "cancelled"
    )
    assert await fetchval(dsn, "select count(*) from durable.tasks") == 1
    assert await fetchval(dsn, "select idempotency_key from durable.tasks") == "k"


CONTINUE = "select durable.continue_as_new($1, $2, '[1, 1]', '{}')"

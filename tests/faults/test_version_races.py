"""Code versions during deploys, attacked: workflow versions in the claim, `ctx.patched`
markers across a rollout, and non-determinism detection on replay, on a real database
with real daemons (each "deploy" is a daemon stopped and another started with new code,
so every resumption is a replay, never an in-memory continuation)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

import durable
from durable.errors import ConfigurationError
from durable.registry import Definition, Registry, code_digest
from durable.retry import RetryPolicy
from tests.support.helpers import fetchval, running_daemon, wait_for, wait_status

FAST = RetryPolicy(base=0.05, factor=1.0, max_delay=0.05, jitter=0.0)


def registry_of(*definitions: Definition[Any, Any]) -> Registry:
    reg = Registry()
    for d in definitions:
        reg.add(d)
    return reg


async def waits_for(client: durable.Client, task_id: int, event: str) -> None:
    async def check() -> bool:
        return (await client.get(task_id)).waiting_event == event

    await wait_for(check)


async def log_of(dsn: str, task_id: int) -> list[str]:
    found = await fetchval(
        dsn, "select array_agg(kind || ':' || name order by seq) from durable.events"
        " where task_id = $1", task_id,
    )  # fmt: skip
    return list(found or [])


# -- non-determinism: a changed argument must fail the replay ----------------------------

ARG: dict[str, Any] = {}
"""The argument the deployed code passes to step 'charge' (changed between deploys)."""


async def _describe(*args: Any, **kwargs: Any) -> str:
    return repr((args, kwargs))


async def _charging(ctx: durable.Context, k: str) -> str:
    charged = await ctx.step("charge", _describe, *ARG["args"], **ARG["kwargs"])
    await ctx.wait_for_event("go")
    return str(charged)


CHARGING: Definition[Any, Any] = Definition(
    name="vr_charging", fn=_charging, kind="workflow", queue="vr", max_attempts=1,
    digest=code_digest(_charging),
)  # fmt: skip

@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("before", "after", "fails"),
    [
        # Changed values that are JSON: the replay must fail at position 0.
        (((0.1 + 0.2,), {}), ((0.3,), {}), True),
        (((1,), {}), ((1.0,), {}), True),
        ((("a",), {"n": 1}), ((), {"n": 1, "a": "a"}), True),
        # The same call spelled differently: the replay must pass.
        (((), {"a": 1, "b": 2}), ((), {"b": 2, "a": 1}), False),
        ((({"x": 1, "y": [1, 2]},), {}), (({"y": [1, 2], "x": 1},), {}), False),
        # Changed values that are not JSON.
        pytest.param(
            (({1, 2},), {}), (({3, 4},), {}), True,
            id="set",
        ),
        pytest.param(
            ((Decimal("10.00"),), {}), ((Decimal("99.99"),), {}), True,
            id="decimal",
        ),
        pytest.param(
            ((datetime(2024, 1, 1, tzinfo=UTC),), {}),
            ((datetime(2030, 1, 1, tzinfo=UTC),), {}), True,
            id="datetime",
        ),
    ],
)  # fmt: skip
async def test_a_changed_step_argument_fails_the_replay_at_its_position(
    dsn: str,
    before: tuple[tuple[Any, ...], dict[str, Any]],
    after: tuple[tuple[Any, ...], dict[str, Any]],
    fails: bool,
) -> None:
    reg = registry_of(CHARGING)
    async with durable.connect(dsn) as client:
        ARG["args"], ARG["kwargs"] = before
        async with running_daemon(dsn, reg=reg, queues="vr"):
            handle = await client.start(CHARGING, uuid.uuid4().hex)
            await waits_for(client, handle.id, "go")
        recorded = await fetchval(
            dsn, "select result::text from durable.events where task_id = $1 and seq = 0",
            handle.id,
        )  # fmt: skip
        ARG["args"], ARG["kwargs"] = after  # the deploy
        assert await client.send_event(handle.id, "go")
        async with running_daemon(dsn, reg=reg, queues="vr"):
            status = await wait_status(dsn, handle.id, "completed", "failed")
        info = await client.get(handle.id)
    if fails:
        # Never the recorded result of a call made with other arguments.
        assert status == "failed", f"replayed over changed arguments, returned {info.result!r}"
        assert info.error is not None
        assert "NonDeterminismError" in str(info.error.get("type"))
        assert "position 0" in str(info.error.get("message"))
    else:
        assert status == "completed"
        assert info.result == json.loads(recorded)  # the recorded result, replayed


# -- ctx.patched: a marker recorded, then the run resumed on the code before the patch ----

PATCH_CODE = {"v": 2}
GATE: dict[str, asyncio.Event] = {}


async def _label(k: str) -> str:
    return f"label {k}"


async def _insure() -> str:
    await GATE["release"].wait()
    raise RuntimeError("the insurer is down")


async def _ship(ctx: durable.Context, k: str) -> str:
    await ctx.step("label", _label, k)
    if PATCH_CODE["v"] >= 2 and await ctx.patched("insure"):
        await ctx.step("insure", _insure)
    await ctx.wait_for_event("picked")
    await ctx.step("notify", _label, k)
    return "done"


SHIP: Definition[Any, Any] = Definition(
    name="vr_ship", fn=_ship, kind="workflow", queue="vr", max_attempts=3, retry=FAST,
    digest=code_digest(_ship),
)  # fmt: skip


@pytest.mark.timeout(60)
async def test_a_patch_marker_left_last_by_a_failed_try_is_asked_again(
    dsn: str,
) -> None:
    """The new branch's first step fails: the attempt ends, and its retry drops the failed
    step. The marker it would leave last goes with it: nothing recorded depends on its
    answer, and code from before the patch, stepping over it, recorded its own branch
    after it, a log neither version replays (the new code answered True there and then met
    the old branch's call). Now the retry, on the code before the patch, takes the old
    branch from a log without the marker, and the new code replays that log to its end."""
    GATE["release"] = asyncio.Event()
    PATCH_CODE["v"] = 2
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, reg=registry_of(SHIP), queues="vr"):
            handle = await client.start(SHIP, uuid.uuid4().hex)

            async def marked() -> bool:
                return await log_of(dsn, handle.id) == ["step:label", "patch:insure"]

            await wait_for(marked)  # the new branch taken; its step is running
            PATCH_CODE["v"] = 1  # the retry goes to a daemon with the code before the patch
            GATE["release"].set()
            await waits_for(client, handle.id, "picked")
        assert await log_of(dsn, handle.id) == ["step:label", "event:picked"]
        PATCH_CODE["v"] = 2  # the rollout finishes: a new daemon replays the run cold
        assert await client.send_event(handle.id, "picked")
        async with running_daemon(dsn, reg=registry_of(SHIP), queues="vr"):
            assert await client.result(handle.id, timeout=30) == "done"
    assert await log_of(dsn, handle.id) == ["step:label", "event:picked", "step:notify"]


# -- versions in the claim --------------------------------------------------------------


async def _plain(tag: str) -> str:
    return f"plain {tag}"


async def _versioned(tag: str) -> str:
    return f"version 1 {tag}"


PLAIN: Definition[Any, Any] = Definition(
    name="vr_task", fn=_plain, queue="vr", digest=code_digest(_plain)
)
# Another task of this service, unversioned, whose name holds chr(31), the character that
# joins a name and its version in a claim: it would read as "vr_task" version 1.
ODD: Definition[Any, Any] = Definition(
    name="vr_task\x1f1", fn=_plain, queue="vr", digest=code_digest(_plain)
)
VERSION_ONE: Definition[Any, Any] = Definition(
    name="vr_task", fn=_versioned, queue="vr", version="1", digest=code_digest(_versioned)
)


@pytest.mark.timeout(60)
async def test_a_name_that_could_spell_another_names_version_is_refused(dsn: str) -> None:
    """A daemon with such a name would claim version 1 runs of vr_task and run its
    unversioned code on them: the decorators refuse the name, and so does a daemon given
    a definition built without them, before it claims anything."""
    with pytest.raises(ConfigurationError, match="x1f"):
        durable.task(name="vr_task\x1f1", queue="vr")(_plain)
    async with durable.connect(dsn) as client:
        versioned = await client.start(VERSION_ONE, "v1")
        with pytest.raises(ConfigurationError, match="x1f"):
            async with running_daemon(dsn, reg=registry_of(PLAIN, ODD), queues="vr"):
                pass
        async with running_daemon(dsn, reg=registry_of(PLAIN), queues="vr"):
            later = await client.start(PLAIN, "later")  # behind it in the queue
            assert await later.result(timeout=20) == "plain later"
        info = await client.get(versioned.id)
    # No daemon here has the code of version 1: the run is still waiting for one.
    assert info.status == "queued", f"claimed by unversioned code: {info.status} {info.result!r}"


# Two versions of one workflow, side by side.


async def _tag(tag: str) -> str:
    return tag


async def _flow_one(ctx: durable.Context, n: int) -> dict[str, Any]:
    first = await ctx.step("one", _tag, "v1")
    await ctx.wait_for_event("go")
    if n > 0:
        ctx.continue_as_new(n - 1)
    return {"first": first, "last": await ctx.step("who", _tag, "v1")}


async def _flow_two(ctx: durable.Context, n: int) -> dict[str, Any]:
    await ctx.step("greet", _tag, "v2-first")  # inserted: a v1 log fails to replay here
    first = await ctx.step("one", _tag, "v2")
    await ctx.wait_for_event("go")
    if n > 0:
        ctx.continue_as_new(n - 1)
    return {"first": first, "last": await ctx.step("who", _tag, "v2")}


FLOW_ONE: Definition[Any, Any] = Definition(
    name="vr_flow", fn=_flow_one, kind="workflow", queue="vr", version="1", max_attempts=1,
    digest=code_digest(_flow_one),
)  # fmt: skip
FLOW_TWO = dataclasses.replace(FLOW_ONE, fn=_flow_two, version="2", digest=code_digest(_flow_two))


async def chain_end(dsn: str, first: int) -> int:
    """The last run of the chain that started with task ``first``."""
    task = first
    while True:
        nxt = await fetchval(dsn, "select id from durable.tasks where continued_from = $1", task)
        if nxt is None:
            return task
        task = int(nxt)


@pytest.mark.timeout(120)
async def test_runs_stay_on_their_version_across_events_chains_and_a_stopped_old_daemon(
    dsn: str,
) -> None:
    """Runs of versions 1 and 2 wait side by side, woken by events, continue as new, and
    the version-1 daemon stops while version-2 runs go on: every run, and every link of
    its chain, is claimed only by its version's code; a stranded version-1 run resumes
    when a version-1 daemon comes back."""
    async with durable.connect(dsn) as client, running_daemon(
        dsn, reg=registry_of(FLOW_TWO), queues="vr=8"
    ) as two:
        async with running_daemon(dsn, reg=registry_of(FLOW_ONE), queues="vr=8") as one:
            # The v1 daemon started last: a start by name takes version 1.
            ones = [await client.start("vr_flow", 1) for _ in range(4)]
            twos = [await client.start(FLOW_TWO, 1) for _ in range(4)]
            for h in ones + twos:
                await waits_for(client, h.id, "go")
            for h in ones + twos:  # interleaved wake-ups
                assert await client.send_event(h.id, "go")
            # Each continued as new: the next runs wait again, on their version.
            nexts = {h.id: await wait_for(lambda h=h: fetchval(  # type: ignore[misc]
                dsn, "select id from durable.tasks where continued_from = $1", h.id))
                for h in ones + twos}  # fmt: skip
            for n in nexts.values():
                await waits_for(client, int(n), "go")
            for h in ones + twos:
                row = await client.get(int(nexts[h.id]))
                assert row.version == (await client.get(h.id)).version
            assert {(await client.get(h.id)).version for h in ones} == {"1"}
            # Half of the v1 chains finish while v1 is live.
            for h in ones[:2]:
                assert await client.send_event(int(nexts[h.id]), "go")
            for h in ones[:2]:
                assert await client.result(h.id, timeout=20) == {"first": "v1", "last": "v1"}
        # The v1 daemon has stopped; v2 runs on. Wake everything.
        for h in ones[2:] + twos:
            assert await client.send_event(int(nexts[h.id]), "go")
        for h in twos:
            assert await client.result(h.id, timeout=20) == {"first": "v2", "last": "v2"}
        for h in ones[2:]:
            # Woken before the v2 runs, and passed over by the v2 daemon's claims.
            assert (await client.get(int(nexts[h.id]))).status == "queued"
        async with running_daemon(dsn, reg=registry_of(FLOW_ONE), queues="vr=8") as again:
            for h in ones[2:]:
                assert await client.result(h.id, timeout=20) == {"first": "v1", "last": "v1"}
        # The chains' last runs (a continued run's row keeps no worker): each on its code.
        workers = {
            h.id: await fetchval(
                dsn, "select worker_id from durable.tasks where id = $1", int(nexts[h.id]))
            for h in ones + twos
        }  # fmt: skip
        for h in ones[:2]:
            assert workers[h.id] == one.id
        for h in ones[2:]:
            assert workers[h.id] == again.id
        for h in twos:
            assert workers[h.id] == two.id
        for h in ones + twos:
            for t in (h.id, int(nexts[h.id])):
                assert "NonDeterminismError" not in str((await client.get(t)).error)


# -- versions at their limits ------------------------------------------------------------

LONGEST = "v" + "é" * 48 + " " + "🚀" * 50  # 100 characters (more bytes), printable


async def _limit(ctx: durable.Context) -> str:
    await ctx.wait_for_event("go")
    return "ran"


@pytest.mark.timeout(60)
async def test_a_version_at_its_limits(dsn: str) -> None:
    for bad in ("", "x" * 101, "1\x1f2", "1\x00", "2\n", "\x7f"):
        with pytest.raises(ConfigurationError):
            durable.workflow(name="vr_limit_bad", version=bad)(_limit)
    assert len(LONGEST) == 100
    near = LONGEST[:-1] + "🚁"  # one code point off
    long_one: Definition[Any, Any] = Definition(
        name="vr_limit", fn=_limit, kind="workflow", queue="vr", version=LONGEST,
        digest=code_digest(_limit),
    )  # fmt: skip
    near_one = dataclasses.replace(long_one, version=near)
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, reg=registry_of(near_one), queues="vr"):
            by_name = await client.start("vr_limit")
            await waits_for(client, by_name.id, "go")
            assert (await client.get(by_name.id)).version == near
            exact = await client.start(long_one)
            assert await client.send_event(exact.id, "go")  # due now, for the wrong code
            assert await client.send_event(by_name.id, "go")
            assert await by_name.result(timeout=20) == "ran"
            assert (await client.get(exact.id)).status == "queued"
        async with running_daemon(dsn, reg=registry_of(long_one), queues="vr"):
            assert await exact.result(timeout=20) == "ran"
        assert (await client.get(exact.id)).version == LONGEST
        assert await fetchval(
            dsn, "select version from durable.definitions where name = 'vr_limit'"
        ) == LONGEST

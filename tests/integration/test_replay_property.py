"""The replay contract as a property: any workflow built from durable calls sees, on every
replay, exactly what its first run saw, and takes the same branches.

Workflows are generated from a small grammar (steps returning dicts, lists and floats,
steps raising errors with attributes, caught or not, children that succeed or fail, alone
or gathered, sleeps, events; every call gives the same value when it runs live again,
so that a fork may run it anew). Each runs once on two daemons (every
suspension resumes on either); then it is forked at every position of its log (the
positions before it replay, the rest run live) and retried whole, and every run must have
observed a prefix of what the first run observed, and every finished run all of it.

DURABLE_REPLAY_EXAMPLES sets how many workflows are generated (8 by default).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import durable
from durable.context import Context
from tests.support.helpers import running_daemon

EXAMPLES = int(os.environ.get("DURABLE_REPLAY_EXAMPLES", "8"))

OBSERVED: dict[str, list[list[str]]] = {}
"""Per workflow key, what each of its runs observed, in order."""
RUNS: Counter[str] = Counter()


class ApiError(Exception):
    """Its __init__ changes its arguments and sets an attribute: rebuilt, not re-called."""

    def __init__(self, status: int, *, retry_after: float | None = None) -> None:
        super().__init__(f"API {status}")
        self.status = status
        self.retry_after = retry_after


def seen(value: Any) -> str:
    """A value as the workflow saw it: its repr (dict order included) and its type."""
    if isinstance(value, BaseException):
        return f"{type(value).__qualname__}{value.args!r}{sorted(vars(value).items())!r}"
    return f"{value!r}:{type(value).__name__}"


def make(value: Any) -> Any:
    """A step's result from its JSON description: [["k", v], ...] becomes a dict in that order."""
    if isinstance(value, dict) and "pairs" in value:
        return {k: make(v) for k, v in value["pairs"]}
    if isinstance(value, list):
        return [make(v) for v in value]
    return value


def step_value(value: Any) -> Any:
    return make(value)


def step_raises(status: int, retry_after: float | None) -> None:
    raise ApiError(status, retry_after=retry_after)


def step_fails_once(k: str) -> str:
    RUNS[k] += 1
    if RUNS[k] == 1:
        raise ConnectionError("refused once")
    return "recovered"


@durable.task(max_attempts=1)
async def prop_child(value: Any, status: int | None) -> Any:
    if status is not None:
        raise ApiError(status)
    return make(value)


@durable.workflow(max_attempts=5, retry=durable.RetryPolicy(base=0.01, jitter=0))
async def wf_program(ctx: Context, k: str, program: list[dict[str, Any]]) -> list[str]:
    obs: list[str] = []
    OBSERVED.setdefault(k, []).append(obs)
    for pos, op in enumerate(program):
        kind = op["op"]
        if kind == "value":
            got = await ctx.step(f"value-{pos}", step_value, op["value"])
            obs.append(seen(got))
            if isinstance(got, dict):  # the dict's order decides the next calls
                for name in got:
                    await ctx.step(f"key-{pos}-{name}", step_value, name)
        elif kind == "raise":
            try:
                await ctx.step(f"raise-{pos}", step_raises, op["status"], op["retry_after"])
            except ApiError as exc:
                obs.append(seen(exc))
                if exc.status >= 500:  # a branch on the rebuilt attribute
                    await ctx.step(f"compensate-{pos}", step_value, exc.status)
            except Exception as exc:
                obs.append(f"not an ApiError: {seen(exc)}")
        elif kind == "fails_once":
            obs.append(seen(await ctx.step(f"once-{pos}", step_fails_once, f"{k}-{pos}")))
        elif kind == "child":
            try:
                obs.append(seen(await ctx.run(prop_child, op["value"], op["status"])))
            except durable.TaskFailed as exc:
                obs.append(f"child failed: {exc.type}")
                await ctx.step(f"child-handled-{pos}", step_value, exc.type)
        elif kind == "gather":
            calls = [ctx.run(prop_child, v, s) for v, s in op["children"]]
            try:
                obs.append(seen(await ctx.gather(*calls)))
            except durable.TaskFailed as exc:
                obs.append(f"gather failed: {exc.type}")
        elif kind == "sleep":
            await ctx.sleep(0.01, name=f"sleep-{pos}")
            obs.append("slept")
        elif kind == "event":
            try:
                got = await ctx.wait_for_event(f"e{pos}", timeout=None if op["send"] else 0)
                obs.append(seen(got))
            except durable.EventTimeout:
                obs.append("event timed out")
    return obs


# -- the grammar ----------------------------------------------------------------------------

floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e16, -1e22, 1e300, -0.0, 0.1, 5e-324, 2.5]),
)
keys = st.text(alphabet="abzé😀 1", min_size=0, max_size=4)
leaves = st.one_of(floats, st.integers(-(10**20), 10**20), keys, st.booleans(), st.none())
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.tuples(keys, inner), max_size=5).map(
            lambda pairs: {"pairs": [list(p) for p in pairs]}
        ),
    ),
    max_leaves=8,
)
statuses = st.one_of(st.none(), st.sampled_from([400, 503]))
ops = st.one_of(
    st.builds(lambda v: {"op": "value", "value": v}, values),
    st.builds(
        lambda s, r: {"op": "raise", "status": s, "retry_after": r},
        st.sampled_from([404, 500, 503]), st.one_of(st.none(), floats),
    ),
    st.just({"op": "fails_once"}),
    st.builds(lambda v, s: {"op": "child", "value": v, "status": s}, values, statuses),
    st.builds(
        lambda cs: {"op": "gather", "children": [list(c) for c in cs]},
        st.lists(st.tuples(values, statuses), min_size=1, max_size=3),
    ),
    st.just({"op": "sleep"}),
    st.builds(lambda send: {"op": "event", "send": send}, st.booleans()),
)
programs = st.lists(ops, min_size=1, max_size=5)


# -- the property ---------------------------------------------------------------------------


def check_runs(k: str, full: list[str]) -> None:
    for run in OBSERVED.pop(k, []):
        assert run == full[: len(run)], f"a run observed {run}, the first run {full}"


async def check(dsn: str, program: list[dict[str, Any]]) -> None:
    k = uuid.uuid4().hex[:12]
    async with (
        durable.connect(dsn) as client,
        running_daemon(dsn, poll_interval="0.2"),
        running_daemon(dsn, poll_interval="0.2"),
    ):
        handle = await client.start(wf_program, k, program)
        for pos, op in enumerate(program):
            if op["op"] == "event" and op["send"]:  # kept until the workflow waits for it
                await client.send_event(handle.id, f"e{pos}", {"pos": pos, "x": [1e16, -0.0]})
        full = await handle.result(timeout=60)
        observed = OBSERVED[k]
        assert any(run == full for run in observed), f"no run observed what was returned: {observed}"
        check_runs(k, full)
        positions = len(await client.history(handle.id))
        for at in range(positions + 1):  # replay up to `at`, run live from there
            await client.fork(handle.id, at)
            assert await handle.result(timeout=60) == full, f"forked at {at}"
            check_runs(k, full)
        await client.retry(handle.id)  # a finished workflow retried replays all of it
        assert await handle.result(timeout=60) == full
        check_runs(k, full)


@pytest.mark.timeout(60 + 30 * EXAMPLES)
def test_every_replay_sees_what_the_first_run_saw(dsn: str) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(programs)
    def prop(program: list[dict[str, Any]]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(check(dsn, program))
        finally:
            loop.close()

    prop()

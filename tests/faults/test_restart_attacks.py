"""Attacks on the operator's restarts of finished workflows: `durable retry`, `durable
replay`, `durable fork ID --at N`, the client's `retry`/`replay`/`fork` and the
dashboard's buttons (durable.restart).

Each test either guards a promise that held or exposes a broken one (fixed since). Steps
count their runs in a table (tests/apps/restart_attacks_app.py); interleavings are forced
with locks held by the test and waits on what the server says, never with sleeps.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import durable
from durable.models import HistoryEntry
from tests.apps import restart_attacks_app as app
from tests.support.helpers import (
    durable_cli,
    execute,
    exited,
    fetchval,
    kill,
    reaped,
    running_daemon,
    spawn_daemon_logged,
    wait_for,
    wait_status,
)

APP = "tests.apps.restart_attacks_app"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def effects_db(dsn: str) -> str:
    """A fresh database with the table steps count their runs in."""
    await execute(dsn, app.EFFECTS_SQL)
    return dsn


async def effects(dsn: str, task_id: int) -> Counter[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select e.name from public.rs_effects e where e.task_id = $1"
            " or e.task_id in (select id from durable.tasks where parent_id = $1)", task_id,
        )  # fmt: skip
    finally:
        await conn.close()
    return Counter(r["name"] for r in rows)


async def children(dsn: str, task_id: int) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch(
            "select id from durable.tasks where parent_id = $1 order by id", task_id
        )]  # fmt: skip
    finally:
        await conn.close()


async def signal_ids(dsn: str, task_id: int, branch: int) -> dict[int, int | None]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select seq, signal_id from durable.events where task_id = $1 and branch = $2",
            task_id, branch,
        )
    finally:
        await conn.close()
    return {r["seq"]: r["signal_id"] for r in rows}


def shape(log: list[HistoryEntry]) -> list[tuple[str, str, str]]:
    return [(e.kind, e.name, e.status) for e in log]


STEP_EFFECTS = {"a": "a", "b": "b"}
"""Steps of rs_all whose body writes an effect named as the step."""


async def test_fork_at_every_position_of_a_workflow_using_every_durable_call(effects_db: str) -> None:
    # Forked at each position 0..len(log) in turn (each fork of the branch the previous
    # one made): what is before the position is kept as it was (its children, the event
    # it consumed, its failed try, its recorded values), what is at or after it runs
    # again: its steps once more, its children as new children (never the old ones, never
    # two), its wait taking the first event sent again.
    dsn = effects_db
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=app.QUEUE):
        handle = await client.start(
            app.everything, dsn, tags=["rs"], attributes={"who": "ops"},
            idempotency_key="rs-all", deadline=3600,
        )
        assert await client.send_event(handle.id, "go", "first")
        assert await client.send_event(handle.id, "go", "second")
        result = await handle.result(timeout=60)
        first = await client.get(handle.id)
        log = await client.history(handle.id)
        assert shape(log) == [
            ("step", "a", "completed"), ("step", "flaky", "failed"),
            ("step", "flaky", "completed"), ("sleep", "nap", "completed"),
            ("event", "go", "completed"), ("child", "rs_kid", "completed"),
            ("child", "rs_kid", "completed"), ("child", "rs_kid", "completed"),
            ("child", "rs_kid", "completed"), ("patch", "p1", "completed"),
            ("memo", "uuid4", "completed"), ("step", "current", "completed"),
            ("step", "b", "completed"),
        ]
        assert result["event"] == "first" and result["patched"] and result["me"]
        signals = await signal_ids(dsn, handle.id, 0)
        kids = {e.seq: e.child_id for e in log if e.child_id is not None}
        branch = 0
        for at in range(len(log) + 1):
            before_effects = await effects(dsn, handle.id)
            before_children = await children(dsn, handle.id)
            branch = await client.fork(handle.id, at)
            result_before = result
            result = await handle.result(timeout=60)
            new = await client.history(handle.id)
            info = await client.get(handle.id)
            assert info.branch == branch and info.status == "completed"
            assert (info.deadline, info.idempotency_key) == (first.deadline, "rs-all")
            # A patch marker the kept events would end with is asked again.
            kept = at - 1 if at and log[at - 1].kind == "patch" else at
            assert new[:kept] == log[:kept], at
            assert shape(new) == shape(log), at
            assert all(e.attempt == info.attempt for e in new[kept:]), at
            assert await signal_ids(dsn, handle.id, branch) == signals, at
            # Children: kept before the position, new (one each) from it on.
            now_children = await children(dsn, handle.id)
            fresh = [c for c in now_children if c not in before_children]
            new_kids = {e.seq: e.child_id for e in new if e.child_id is not None}
            for seq, child in new_kids.items():
                if seq < at:
                    assert child == kids[seq], (at, seq)
                else:
                    assert child in fresh, (at, seq)
            assert len(fresh) == sum(1 for seq in kids if seq >= at), at
            # Effects: each step at or after the position ran once more, no other.
            ran = await effects(dsn, handle.id) - before_effects
            expected: Counter[str] = Counter()
            for e in log:
                if e.seq >= at and e.kind == "step" and e.name in STEP_EFFECTS:
                    expected[STEP_EFFECTS[e.name]] += 1
                if e.seq >= at and e.kind == "child":
                    expected[f"kid:{(await client.get(new_kids[e.seq])).args[1]}"] += 1
                if e.seq >= at and e.kind == "step" and e.name == "flaky":
                    expected["flaky"] += 1
            assert ran == expected, at
            assert result["event"] == "first"
            assert first.deadline is not None
            if at <= 11:  # the step reading durable.current() ran again
                assert result["current"] == [
                    handle.id, info.attempt, info.max_attempts, first.deadline.isoformat()
                ], at
            else:
                assert result["current"] == result_before["current"], at
            if at == len(log):
                assert result == result_before
            kids = new_kids
            log = new
        assert await client.branches(handle.id) == list(range(len(log) + 2))
        assert await fetchval(
            dsn, "select (tags, attributes)::text from durable.tasks where id = $1", handle.id
        ) == '({rs},"{""who"": ""ops""}")'
        assert (await client.get(handle.id)).attempt == len(log) + 2


# -- children of a forked parent ---------------------------------------------------------


async def child_ids(dsn: str, task_id: int, branch: int) -> dict[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select seq, child_id from durable.events where task_id = $1 and branch = $2"
            " and kind = 'child'", task_id, branch,
        )  # fmt: skip
    finally:
        await conn.close()
    return {r["seq"]: r["child_id"] for r in rows}


async def test_a_child_still_running_when_its_parent_is_forked(effects_db: str) -> None:
    # Held: the parent ended without awaiting its child (a workflow waiting for an event).
    # A fork before the spawn starts a new child and leaves the old one running to its
    # own end; a fork after it keeps the old child, still running.
    dsn = effects_db
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=app.QUEUE):
        handle = await client.start(app.leaver, dsn)
        await handle.result(timeout=30)
        [old] = (await child_ids(dsn, handle.id, 0)).values()
        assert await handle.result(timeout=1) == f"left {old}"
        assert (await client.get(old)).status in ("queued", "running", "waiting")

        assert await client.fork(handle.id, 1) == 1
        assert await handle.result(timeout=30) != f"left {old}"
        [new] = (await child_ids(dsn, handle.id, 1)).values()
        assert new != old and await children(dsn, handle.id) == [old, new]
        assert await client.fork(handle.id, 2) == 2
        assert await handle.result(timeout=30) == f"left {new}"
        assert await child_ids(dsn, handle.id, 2) == {1: new}
        assert await children(dsn, handle.id) == [old, new]
        ran = await effects(dsn, handle.id)
        assert (ran["a"], ran["b"]) == (1, 3)  # b at 2: run by both forks

        for child, payload in ((old, "o"), (new, "n")):
            await wait_status(dsn, child, "waiting")
            assert await client.send_event(child, "go", payload)
            assert await client.result(child, timeout=30) == f"child:{payload}"
        assert (await client.get(handle.id)).status == "completed"


async def test_a_forked_parent_waits_for_its_new_child_not_the_old_one(
    effects_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Held: forked before the spawn, the parent now awaits its new child. The old child,
    # still running, finishes first: the parent keeps waiting, and is woken by the new one.
    dsn = effects_db
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=app.QUEUE):
        handle = await client.start(app.leaver, dsn)
        await handle.result(timeout=30)
        [old] = (await child_ids(dsn, handle.id, 0)).values()
        monkeypatch.setenv("RS_AWAIT", "1")
        assert await client.fork(handle.id, 1) == 1
        await wait_status(dsn, handle.id, "waiting")
        [new] = (await child_ids(dsn, handle.id, 1)).values()
        assert new != old
        await wait_status(dsn, old, "waiting")
        assert await client.send_event(old, "go", "old")
        assert await client.result(old, timeout=30) == "child:old"
        assert (await client.get(handle.id)).status == "waiting"
        await wait_status(dsn, new, "waiting")
        assert await client.send_event(new, "go", "new")
        assert await handle.result(timeout=30) == "child:new"


async def test_a_fork_of_a_run_cancelled_while_it_waited_for_an_event(effects_db: str) -> None:
    # Held: the fork keeps the pending wait; the event sent after it is taken.
    dsn = effects_db
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=app.QUEUE):
        handle = await client.start(app.waiter, "w")
        await wait_status(dsn, handle.id, "waiting")
        await client.cancel(handle.id)
        await wait_status(dsn, handle.id, "cancelled")
        assert [(e.kind, e.status) for e in await client.history(handle.id)] == [
            ("event", "pending")
        ]
        assert await client.fork(handle.id, 1) == 1
        await wait_status(dsn, handle.id, "waiting")
        assert await client.send_event(handle.id, "go", "late")
        assert await handle.result(timeout=30) == "w:late"


async def test_a_fork_of_a_cancelled_parent_runs_again_the_child_the_cancel_stopped(
    effects_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator cancels a workflow stuck on its child (the cancel takes the child
    # along), fixes what was wrong and forks past the spawn. The fork copied the child's
    # pending event: the new branch awaited the cancelled child and failed at once with
    # its cancellation. As a retry does, the fork runs again a child the workflow had not
    # seen end and that was cancelled, failed or asked to stop.
    dsn = effects_db
    monkeypatch.setenv("RS_AWAIT", "1")
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=app.QUEUE):
        handle = await client.start(app.leaver, dsn)
        await wait_status(dsn, handle.id, "waiting")
        [old] = (await child_ids(dsn, handle.id, 0)).values()
        await client.cancel(handle.id)
        await wait_status(dsn, old, "cancelled")
        await wait_status(dsn, handle.id, "cancelled")
        length = len(await client.history(handle.id))
        assert length == 3  # a, the child, b

        assert await client.fork(handle.id, length) == 1
        await wait_status(dsn, handle.id, "waiting", "failed")
        [new] = (await child_ids(dsn, handle.id, 1)).values()
        assert new != old
        await wait_status(dsn, new, "waiting")
        assert await client.send_event(new, "go", "again")
        assert await handle.result(timeout=30) == "child:again"
        assert (await effects(dsn, handle.id))["a"] == 1 and (await effects(dsn, handle.id))["b"] == 1


# -- restarts after a code change, with subprocess daemons ------------------------------


def daemon(dsn: str, log: Path, stage: str, **env: str) -> subprocess.Popen[bytes]:
    return spawn_daemon_logged(dsn, APP, log, DURABLE_QUEUES=app.QUEUE, RS_STAGE=stage, **env)


async def cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(durable_cli, *args, dsn=dsn)


async def test_retry_after_the_code_was_fixed_runs_again_only_the_failed_step(
    effects_db: str, tmp_path: Path
) -> None:
    # Held: step c fails on the broken code; a daemon with the fixed code takes over and
    # `durable retry` runs c again, then d. a and b ran once, and the wait keeps the event
    # it took (a second one sent since is not taken).
    dsn, log = effects_db, tmp_path / "daemons.log"
    procs: list[subprocess.Popen[bytes]] = []
    with reaped(procs):
        async with durable.connect(dsn) as client:
            procs.append(daemon(dsn, log, "broken"))
            handle = await client.start(app.fixable, dsn)
            assert await client.send_event(handle.id, "go", 1)
            with pytest.raises(durable.TaskFailed, match="the bug in step c"):
                await handle.result(timeout=60)
            kill(procs[0], signal.SIGTERM)
            await exited(procs[0])
            assert not await client.send_event(handle.id, "go", 2)  # it has finished
            procs.append(daemon(dsn, log, "fixed"))
            done = await cli("retry", str(handle.id), dsn=dsn)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == f"task {handle.id} queued again (retry), branch 0"
            assert await handle.result(timeout=60) == ["a@0", 1, "b@0", "c fixed", "d@0"]
        assert await effects(dsn, handle.id) == Counter(a=1, b=1, c=2, d=1)


async def test_changed_code_fails_a_retry_at_the_first_divergent_position_and_replays(
    effects_db: str, tmp_path: Path
) -> None:
    # Held: the code gained a step at position 1. A retry on the old branch fails there,
    # naming position 1, and runs nothing; a replay runs the new code on a new branch
    # that holds none of the old events (its wait takes again the event the old one took);
    # a fork of that branch keeps what is before its position.
    dsn, log = effects_db, tmp_path / "daemons.log"
    procs: list[subprocess.Popen[bytes]] = []
    with reaped(procs):
        async with durable.connect(dsn) as client:
            procs.append(daemon(dsn, log, "broken"))
            handle = await client.start(app.fixable, dsn)
            assert await client.send_event(handle.id, "go", 1)
            with pytest.raises(durable.TaskFailed, match="the bug in step c"):
                await handle.result(timeout=60)
            old = await client.history(handle.id)
            kill(procs[0], signal.SIGKILL)
            await exited(procs[0])
            procs.append(daemon(dsn, log, "changed"))

            assert (await cli("retry", str(handle.id), dsn=dsn)).returncode == 0
            with pytest.raises(durable.TaskFailed) as caught:
                await handle.result(timeout=60)
            assert caught.value.type == "durable.errors.NonDeterminismError"
            assert "position 1" in str(caught.value), caught.value
            assert await effects(dsn, handle.id) == Counter(a=1, b=1, c=1)

            done = await cli("replay", str(handle.id), dsn=dsn)
            assert done.stdout.strip() == f"task {handle.id} queued again (replay), branch 1"
            assert await handle.result(timeout=60) == [
                "a@1", "inserted@1", 1, "b@1", "c fixed", "d@1"
            ]
            assert await effects(dsn, handle.id) == Counter(a=2, inserted=1, b=2, c=2, d=1)
            assert (await client.history(handle.id, branch=0))[:3] == old[:3]

            done = await cli("fork", str(handle.id), "--at", "3", dsn=dsn)
            assert done.stdout.strip() == f"task {handle.id} queued again (fork), branch 2"
            assert await handle.result(timeout=60) == [
                "a@1", "inserted@1", 1, "b@2", "c fixed", "d@2"
            ]
            assert await effects(dsn, handle.id) == Counter(a=2, inserted=1, b=3, c=3, d=2)


async def gate_waiters(probe: asyncpg.Connection) -> int:
    return int(await probe.fetchval(
        "select count(*) from pg_locks where locktype = 'advisory' and objid = $1"
        " and not granted", app.GATE,
    ))  # fmt: skip


async def test_a_retry_after_the_daemon_was_killed_keeps_a_failure_the_workflow_handled(
    effects_db: str, tmp_path: Path
) -> None:
    # The workflow caught step x's failure and took its fallback path; its daemon was
    # SIGKILLed in the next step, and with its attempts spent the task failed with
    # LeaseExpired, an error that names no event. `durable retry` took the last failed
    # event for the failure that ended the run (the rule for errors stored before they
    # named their positions) and dropped it: x ran again and, now that it succeeds, the
    # retried run took the other path. A handled failure stays.
    dsn, log = effects_db, tmp_path / "daemons.log"
    procs: list[subprocess.Popen[bytes]] = []
    gate = await asyncpg.connect(dsn)
    try:
        await gate.execute("select pg_advisory_lock($1)", app.GATE)
        with reaped(procs):
            async with durable.connect(dsn) as client:
                procs.append(daemon(dsn, log, "broken", DURABLE_LEASE="2"))
                handle = await client.start(app.handled, dsn)
                await wait_for(lambda: gate_waiters(gate), timeout=60)
                kill(procs[0], signal.SIGKILL)
                await exited(procs[0])
                procs.append(daemon(dsn, log, "fixed"))
                await wait_status(dsn, handle.id, "failed", timeout=60)
                error = (await client.get(handle.id)).error
                assert error is not None and error["type"] == "durable.LeaseExpired"
                await gate.execute("select pg_advisory_unlock($1)", app.GATE)
                done = await cli("retry", str(handle.id), dsn=dsn)
                assert done.returncode == 0, done.stderr
                assert await handle.result(timeout=60) == "fallback"
        assert (await effects(dsn, handle.id))["x"] == 1
    finally:
        await gate.close()


# -- bad input ------------------------------------------------------------------------------


async def footprint(dsn: str) -> list[Any]:
    """Every task row and event of the database, to compare before and after."""
    conn = await asyncpg.connect(dsn)
    try:
        tasks = await conn.fetch("select to_jsonb(t) - 'worker_id' from durable.tasks t order by id")
        events = await conn.fetch(
            "select task_id, branch, seq, status from durable.events order by 1, 2, 3"
        )
    finally:
        await conn.close()
    return [list(map(tuple, tasks)), list(map(tuple, events))]


async def test_bad_restarts_are_refused_in_one_line_naming_what_is_expected(effects_db: str) -> None:
    # The command line checked a fork's position and kind itself; the client (and SQL)
    # took a position past the end as the end, forked a plain task, and let
    # asyncpg's own errors out for a position that was no integer or out of its range.
    dsn = effects_db
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, queues=app.QUEUE):
            flow = await client.start(app.plain_flow, dsn)
            plain = await client.start(app.plain, dsn)
            await flow.result(timeout=30)
            await plain.result(timeout=30)
        busy = await client.start(app.waiter, "busy")  # queued: no daemon serves it now
        before = await footprint(dsn)
        cases: list[tuple[Callable[[], Awaitable[Any]], str]] = [
            (lambda: client.fork(flow.id, -1), "fork: at must be a whole number from 0"),
            (lambda: client.fork(flow.id, 2), "fork: at must be a position from 0 to 1"),
            (lambda: client.fork(flow.id, 2**31), "fork: at must be a whole number from 0"),
            (lambda: client.fork(flow.id, True), "fork: at must be a whole number from 0"),
            (lambda: client.fork(flow.id, "1"), "fork: at must be a whole number from 0"),  # type: ignore[arg-type]
            (lambda: client.fork(flow.id, None), "fork: at must be a whole number from 0"),  # type: ignore[arg-type]
            (lambda: client.fork(plain.id, 0), f"task {plain.id} is a plain task, not a workflow"),
            (lambda: client.fork(10**6, 0), "no task 1000000"),
            (lambda: client.retry(10**6), "no task 1000000"),
            (lambda: client.retry(busy.id), f"task {busy.id} is queued: only a finished task"),
            (lambda: client.fork(busy.id, 0), f"task {busy.id} is queued: only a finished task"),
            (lambda: client.retry(0), "a task id is a whole number from 1"),
        ]
        for call, message in cases:
            with pytest.raises(durable.DurableError) as caught:
                await call()
            text = str(caught.value)
            assert text.startswith(message) and "\n" not in text, (message, text)
        assert await footprint(dsn) == before
        # And SQL (durable.restart), for what the client's own checks leave to it.
        conn = await asyncpg.connect(dsn)
        try:
            for task, mode, at, message in [
                (flow.id, "fork", -1, "fork: at must be a position from 0 to 1"),
                (flow.id, "fork", None, "fork: at must be a position from 0 to 1"),
                (flow.id, "fork", 2, "fork: at must be a position from 0 to 1 (the end of"
                 f" branch 0 of task {flow.id}'s event log), got 2"),
                (plain.id, "fork", 0, f"task {plain.id} is a plain task, not a workflow"),
                (flow.id, "again", None, "unknown restart mode again"),
            ]:
                with pytest.raises(asyncpg.PostgresError) as refused:
                    await conn.fetchval("select durable.restart($1, $2, $3)", task, mode, at)
                assert str(refused.value).startswith(message), (message, refused.value)
        finally:
            await conn.close()
        assert await footprint(dsn) == before
        # The command line says the same, in one line.
        for argv, code, message in [
            (["fork", str(flow.id), "--at", "-1"], 2, "--at"),
            (["fork", str(flow.id), "--at", "2"], 2, "--at 2 is past the end"),
            (["fork", str(plain.id), "--at", "0"], 1, "is a plain task, not a workflow"),
            (["retry", "1000000"], 1, "no task 1000000"),
            (["fork", str(busy.id), "--at", "0"], 1, "is queued: only a finished task"),
        ]:
            done = await cli(*argv, dsn=dsn)
            [line] = done.stderr.splitlines()
            assert done.returncode == code and message in line, (argv, done.stderr)
        assert await footprint(dsn) == before


# -- restarts racing each other, a start and a cancel ---------------------------------------


async def blocked_restarts(dsn: str, n: int) -> None:
    """Until ``n`` sessions running durable.restart wait for a lock (asked from a session
    of its own: a transaction sees pg_stat_activity as it was at its first look)."""

    async def check() -> bool:
        return int(await fetchval(
            dsn, "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
            " and query like '%durable.restart%' and pid <> pg_backend_pid()"
        )) >= n  # fmt: skip

    await wait_for(check, interval=0.005)


async def failed_flow(client: durable.Client, dsn: str, **options: Any) -> int:
    """An rs_fixable run failed at its step c (run by a daemon of this test)."""
    async with running_daemon(dsn, queues=app.QUEUE):
        handle = await client.start(app.fixable, dsn, **options)
        assert await client.send_event(handle.id, "go", 1)
        with pytest.raises(durable.TaskFailed):
            await handle.result(timeout=30)
    return handle.id


@pytest.mark.parametrize("first,second", [("retry", "fork"), ("fork", "fork"), ("replay", "retry")])
async def test_two_operators_restarting_one_task_at_once_make_one_new_run(
    effects_db: str, first: str, second: str
) -> None:
    # Held: both wait for the task's row; the first to get it queues the task, the other
    # then finds it queued and is refused in one line. One branch is made, not two.
    dsn = effects_db
    async with durable.connect(dsn) as a, durable.connect(dsn) as b:
        task = await failed_flow(a, dsn)
        calls = {
            "retry": lambda c: c.retry(task), "replay": lambda c: c.replay(task),
            "fork": lambda c: c.fork(task, 2),
        }
        holder = await asyncpg.connect(dsn)
        try:
            async with holder.transaction():
                await holder.execute("select 1 from durable.tasks where id = $1 for update", task)
                one = asyncio.ensure_future(calls[first](a))
                await blocked_restarts(dsn, 1)
                two = asyncio.ensure_future(calls[second](b))
                await blocked_restarts(dsn, 2)
            done = await asyncio.gather(one, two, return_exceptions=True)
        finally:
            await holder.close()
        won = [r for r in done if isinstance(r, int)]
        lost = [r for r in done if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1, done
        assert isinstance(lost[0], durable.DurableError)
        assert str(lost[0]).startswith(f"task {task} is queued: only a finished task"), lost
        assert set(await a.branches(task)) <= {0, won[0]}  # (a replay's is empty)
        info = await a.get(task)
        assert (info.status, info.branch, info.attempt) == ("queued", won[0], 2)
        async with running_daemon(dsn, queues=app.QUEUE):
            with pytest.raises(durable.TaskFailed, match="the bug in step c"):
                await a.result(task, timeout=30)


async def test_two_restarts_of_tasks_sharing_an_active_key_refuse_the_second_in_one_line(
    effects_db: str,
) -> None:
    # Two runs started with one idempotency key of scope "active", one after the other,
    # both failed. Two operators retry them at once: each checked that no other task held
    # the key unfinished, neither saw the other's uncommitted retry, and the second got
    # asyncpg's UniqueViolationError from the key's index. It is refused as the first
    # check refuses it, naming the task that holds the key.
    dsn = effects_db
    async with durable.connect(dsn) as client:
        one = await failed_flow(client, dsn, idempotency_key="k", idempotency="active")
        two = await failed_flow(client, dsn, idempotency_key="k", idempotency="active")
        assert one != two
        first = await asyncpg.connect(dsn)
        try:
            async with first.transaction():
                assert await first.fetchval("select durable.restart($1, 'retry')", one) == 0
                racing = asyncio.ensure_future(client.retry(two))
                await blocked_restarts(dsn, 1)
            with pytest.raises(durable.DurableError) as caught:
                await racing
        finally:
            await first.close()
        assert str(caught.value) == (
            f"task {two} has the idempotency key of task {one}, which has not finished: "
            "finish or cancel that one first"
        )
        assert (await client.get(two)).status == "failed"
        assert (await client.get(one)).status == "queued"


async def test_a_bulk_retry_of_tasks_sharing_an_active_key_retries_one(effects_db: str) -> None:
    # `durable retry --status failed` over two failed runs of one key of scope "active":
    # the statement retried the first, then durable.restart refused the second (the key
    # was now held) and the whole statement failed: nothing was retried. The newest is
    # retried, the other left as it was.
    dsn = effects_db
    async with durable.connect(dsn) as client:
        one = await failed_flow(client, dsn, idempotency_key="k", idempotency="active")
        two = await failed_flow(client, dsn, idempotency_key="k", idempotency="active")
        done = await cli("retry", "--status", "failed", "--name", "rs_fixable", "--yes", dsn=dsn)
        assert done.returncode == 0, done.stderr
        assert (await client.get(two)).status == "queued"
        assert (await client.get(one)).status == "failed"


async def test_a_cancel_in_the_middle_of_a_restart_ends_the_restarted_run(effects_db: str) -> None:
    # Held: a fork of a finished parent whose child still runs locks the child's row,
    # then waits for the parent's (held here); a cancel of the parent meanwhile waits
    # behind it. No deadlock: the fork commits first, the cancel then ends the queued run
    # and the old child. A retry afterwards runs the fork's branch.
    dsn = effects_db
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, queues=app.QUEUE):
            handle = await client.start(app.leaver, dsn)
            await handle.result(timeout=30)
            [old] = (await child_ids(dsn, handle.id, 0)).values()
            await wait_status(dsn, old, "waiting")
        holder = await asyncpg.connect(dsn)
        try:
            async with holder.transaction():
                await holder.execute(
                    "select 1 from durable.tasks where id = $1 for update", handle.id
                )
                fork = asyncio.ensure_future(client.fork(handle.id, 0))
                await blocked_restarts(dsn, 1)

                async def cancel_blocked() -> bool:
                    return bool(await fetchval(
                        dsn, "select count(*) from pg_stat_activity where wait_event_type ="
                        " 'Lock' and query like '%durable.cancel%' and pid <> pg_backend_pid()"
                    ))  # fmt: skip

                cancel = asyncio.ensure_future(client.cancel(handle.id))
                await wait_for(cancel_blocked, interval=0.005)
            assert await asyncio.wait_for(fork, 30) == 1
            await asyncio.wait_for(cancel, 30)
        finally:
            await holder.close()
        assert (await client.get(handle.id)).status == "cancelled"
        assert (await client.get(old)).status == "cancelled"
        assert await client.retry(handle.id) == 1
        async with running_daemon(dsn, queues=app.QUEUE):
            result = await handle.result(timeout=30)
        [new] = (await child_ids(dsn, handle.id, 1)).values()
        assert result == f"left {new}" and new != old
        assert await effects(dsn, handle.id) == Counter(a=2, b=2)


async def test_a_restart_after_the_deadline_passed_is_refused_and_keeps_the_failure(
    effects_db: str,
) -> None:
    # A restart of a task whose deadline had passed was queued, and failed at its claim
    # with DeadlineExceeded: the error that ended the run (what the operator came to fix)
    # was overwritten, a retry dropped its failed step, a fork left a branch behind, and
    # the command said "queued again". Refused, naming the deadline; nothing changes.
    dsn = effects_db
    async with durable.connect(dsn) as client:
        task = await failed_flow(client, dsn, deadline=3600)
        await execute(
            dsn, "update durable.tasks set deadline = now() - interval '1 minute' where id = $1",
            task,
        )
        deadline = (await client.get(task)).deadline
        assert deadline is not None
        before = await footprint(dsn)
        restarts: list[Callable[[], Awaitable[int]]] = [
            lambda: client.retry(task), lambda: client.replay(task), lambda: client.fork(task, 1)
        ]
        for restart in restarts:
            with pytest.raises(durable.DurableError) as caught:
                await restart()
            assert str(caught.value) == (
                f"task {task}'s deadline passed at {deadline.isoformat()}: it cannot run "
                "again (start a new task)"
            )
        done = await cli("retry", "--status", "failed", "--yes", dsn=dsn)
        assert done.returncode == 0, done.stderr
        assert await footprint(dsn) == before
        error = (await client.get(task)).error
        assert error is not None and error["message"] == "the bug in step c"


async def test_restarting_the_runs_of_a_chain(effects_db: str) -> None:
    # Held: a run that continued as new is refused (it would start a second next run);
    # the chain's last run forks and replays, and the first run's result follows it.
    dsn = effects_db
    async with durable.connect(dsn) as client, running_daemon(dsn, queues=app.QUEUE):
        first = await client.start(app.chain, dsn, 0)
        runs = [first.id]
        for n in range(3):
            assert await client.send_event(runs[-1], "tick", n)
            if n < 2:
                async def successor() -> int | None:
                    got = await fetchval(
                        dsn, "select continued_as from durable.tasks where id = $1", runs[-1]
                    )
                    return int(got) if got is not None else None

                runs.append(await wait_for(successor))
        assert await first.result(timeout=30) == [2, 2, "run2@0"]
        for run in runs[:2]:
            with pytest.raises(durable.DurableError, match=f"task {run} continued as task"):
                await client.fork(run, 0)
        last = runs[-1]
        assert await client.fork(last, 1) == 1
        assert await first.result(timeout=30) == [2, 2, "run2@1"]
        assert await client.replay(last) == 2
        assert await first.result(timeout=30) == [2, 2, "run2@2"]  # the event taken again
        assert (await effects(dsn, last))["run2"] == 3
        assert await fetchval(
            dsn, "select count(*) from durable.tasks where name = 'rs_chain'"
        ) == 3


async def test_a_fork_while_a_frozen_daemon_still_runs_the_old_attempt(
    effects_db: str, tmp_path: Path
) -> None:
    # Held: the daemon running the workflow froze (SIGSTOP) inside a step; its lease
    # expired and the task failed. It is forked and runs on another daemon, which waits at
    # the same step. The frozen daemon wakes and finishes its step: its checkpoint, fenced
    # on a claim it no longer holds, writes nothing on either branch.
    dsn, log = effects_db, tmp_path / "daemons.log"
    procs: list[subprocess.Popen[bytes]] = []
    gate = await asyncpg.connect(dsn)
    try:
        await gate.execute("select pg_advisory_lock($1)", app.GATE)
        with reaped(procs):
            async with durable.connect(dsn) as client:
                procs.append(daemon(dsn, log, "fixed", DURABLE_LEASE="2"))
                handle = await client.start(app.gated_flow, dsn)
                await wait_for(lambda: gate_waiters(gate), timeout=60)
                procs[0].send_signal(signal.SIGSTOP)
                procs.append(daemon(dsn, log, "fixed"))
                await wait_status(dsn, handle.id, "failed", timeout=60)
                old = await client.history(handle.id)
                assert [(e.name, e.status) for e in old] == [("a", "completed")]

                assert await client.fork(handle.id, 1) == 1
                await wait_for(lambda: _at_least(gate_waiters(gate), 2), timeout=60)
                procs[0].send_signal(signal.SIGCONT)
                await gate.execute("select pg_advisory_unlock($1)", app.GATE)
                assert await handle.result(timeout=60) == "gated@1"
                # Whatever the woken daemon writes, it has written once it has exited.
                kill(procs[0], signal.SIGTERM)
                await exited(procs[0])
                assert await client.history(handle.id, branch=0) == old
                new = await client.history(handle.id, branch=1)
                assert [(e.name, e.status, e.attempt) for e in new] == [
                    ("a", "completed", 1), ("gated", "completed", 2)
                ]
    finally:
        await gate.close()


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


async def test_a_retry_after_a_cancel_keeps_a_failure_the_workflow_handled(
    effects_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same for a run cancelled after it handled x's failure: a cancelled task stores
    # no error, which `durable retry` read as an error naming no position.
    dsn = effects_db
    gate = await asyncpg.connect(dsn)
    try:
        await gate.execute("select pg_advisory_lock($1)", app.GATE)
        async with durable.connect(dsn) as client:
            async with running_daemon(dsn, queues=app.QUEUE):
                handle = await client.start(app.handled, dsn)
                await wait_for(lambda: gate_waiters(gate), timeout=60)
                await client.cancel(handle.id)
                await wait_status(dsn, handle.id, "cancelled")
            await gate.execute("select pg_advisory_unlock($1)", app.GATE)
            monkeypatch.setenv("RS_STAGE", "fixed")
            assert await client.retry(handle.id) == 0
            async with running_daemon(dsn, queues=app.QUEUE):
                assert await handle.result(timeout=60) == "fallback"
        assert (await effects(dsn, handle.id))["x"] == 1
    finally:
        await gate.close()


TOKEN = "restart-attacks-token-0123456789abcdef"


async def test_every_door_forks_up_to_the_end_of_a_log_with_a_gap(
    effects_db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A fork of a cancelled parent drops its cancelled child's event (position 1) to run
    # it again; cancelled again before it ran, the branch holds positions 0 and 2. Its
    # end is position 3, as durable.restart counts it; the command line and the dashboard
    # counted the events (2) and refused `--at 3` as past the end.
    import httpx

    from durable.ui.auth import Auth
    from tests.support.ui import dashboard

    dsn = effects_db
    monkeypatch.setenv("RS_AWAIT", "1")
    async with durable.connect(dsn) as client:
        async with running_daemon(dsn, queues=app.QUEUE):
            handle = await client.start(app.leaver, dsn)
            await wait_status(dsn, handle.id, "waiting")
            await client.cancel(handle.id)
            await wait_status(dsn, handle.id, "cancelled")
        assert await client.fork(handle.id, 3) == 1
        await client.cancel(handle.id)
        assert [e.seq for e in await client.history(handle.id)] == [0, 2]

        done = await cli("fork", str(handle.id), "--at", "3", dsn=dsn)
        assert done.returncode == 0, done.stderr
        assert [e.seq for e in await client.history(handle.id, branch=2)] == [0, 2]
        await client.cancel(handle.id)

        (tmp_path / "token").write_text(TOKEN + "\n")
        auth = Auth.from_file("--token-file", tmp_path / "token", "token")
        async with dashboard(dsn, auth) as base, httpx.AsyncClient(base_url=base) as http:
            page = await http.get(f"/tasks/{handle.id}", headers={"Authorization": f"Bearer {TOKEN}"})
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
            assert csrf is not None, page.text
            sent = await http.post(
                f"/tasks/{handle.id}/fork", data={"csrf": csrf.group(1), "at": "3"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert sent.status_code == 303, sent.text
            said = await http.get(sent.headers["location"], headers={"Authorization": f"Bearer {TOKEN}"})
            assert f"task {handle.id} forked at 3 on branch 3" in said.text, said.text

        async with running_daemon(dsn, queues=app.QUEUE):
            await wait_status(dsn, handle.id, "waiting")
            [new] = (await child_ids(dsn, handle.id, 3)).values()
            await wait_status(dsn, new, "waiting")
            assert await client.send_event(new, "go", "done")
            assert await handle.result(timeout=30) == "child:done"

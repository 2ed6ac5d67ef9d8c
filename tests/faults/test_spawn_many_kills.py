"""A daemon killed in the middle of a ctx.spawn_many: the children go in one transaction
(in several statements when their arguments are large), so the next daemon finds none of
them and starts each once, or finds all of them in the log."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

import durable
from durable.store.database import split
from durable.store.workflows import STATEMENT_BYTES
from tests.apps import spawn_many_app as app
from tests.apps.fan_out_app import GATE, spawn_gate
from tests.faults.test_fan_out import check_delivered_once, gate_waiter, session
from tests.support.helpers import kill, reaped, spawn_daemon_logged, wait_for

pytestmark = pytest.mark.slow

APP = "tests.apps.spawn_many_app"


async def kill_at_the_gate(
    dsn: str, tmp_path: Path, start: durable.Definition[..., Any], *args: object
) -> tuple[int, Any]:
    """Start ``start(*args)`` on a daemon, kill the daemon while an insert of its children
    waits at the gate, then let a second daemon run it to the end; the parent's id and
    what it returned."""
    log = tmp_path / "daemon.log"
    procs: list[subprocess.Popen[bytes]] = []
    async with session(dsn) as gate, session(dsn) as probe, durable.connect(dsn) as client:
        await gate.execute("select pg_advisory_lock($1)", GATE)
        with reaped(procs):
            procs.append(spawn_daemon_logged(
                dsn, APP, log, DURABLE_QUEUES=app.QUEUE, DURABLE_LEASE="2",
            ))  # fmt: skip
            handle = await client.start(start, *args)
            blocked = await wait_for(lambda: gate_waiter(probe), timeout=60)
            # Inserted and waiting, uncommitted: nobody sees a child yet.
            assert not await probe.fetchval(
                "select count(*) from durable.tasks where parent_id = $1", handle.id
            )
            kill(procs[0])
            procs[0].wait(timeout=30)
            # The daemon's backend dies with it (a dead client's transaction would go on
            # once the gate opens, and its statements would never commit).
            assert await probe.fetchval("select pg_terminate_backend($1)", blocked)
            await gate.execute("select pg_advisory_unlock($1)", GATE)
            procs.append(spawn_daemon_logged(
                dsn, APP, log, DURABLE_QUEUES=f"{app.QUEUE},{app.KIDS}",
            ))  # fmt: skip
            result = await handle.result(timeout=120)
    return handle.id, result


@pytest.mark.timeout(180)
async def test_a_daemon_killed_during_a_spawn_many_starts_each_child_once(
    dsn: str, tmp_path: Path
) -> None:
    # The insert of child 50 of 100 holds the spawn_many's one statement at the gate.
    n = 100
    async with session(dsn) as setup:
        await setup.execute(spawn_gate(n // 2))
    parent, result = await kill_at_the_gate(dsn, tmp_path, app.spawn_many, n)
    assert result == n * (n - 1) // 2
    async with session(dsn) as probe:
        await check_delivered_once(probe, parent, n)


@pytest.mark.timeout(180)
async def test_a_daemon_killed_between_the_statements_of_a_spawn_many_starts_each_child_once(
    dsn: str, tmp_path: Path
) -> None:
    # 24 children of 300 kB go in two statements (STATEMENT_BYTES, 4 MB); the first has
    # inserted its children when the second waits at the gate (child 20).
    n, size = 24, 300_000
    parts = split(list(range(n)), lambda _: size, STATEMENT_BYTES)
    assert len(parts) == 2 and 20 in parts[1] and 0 in parts[0]
    async with session(dsn) as setup:
        await setup.execute(
            "create function public.sm_gate() returns trigger language plpgsql as $$"
            f" begin perform pg_advisory_xact_lock_shared({GATE}); return new; end $$;"
            " create trigger sm_gate before insert on durable.tasks for each row"
            f" when (new.name = '{app.echo.name}' and new.args->>0 like '20:%')"
            " execute function public.sm_gate();"
        )
    parent, result = await kill_at_the_gate(dsn, tmp_path, app.big_spawns, n, size)
    assert result == [str(i) for i in range(n)]
    async with session(dsn) as probe:
        kids = await probe.fetch(
            "select split_part(args->>0, ':', 1)::int as x, status::text from durable.tasks"
            " where parent_id = $1", parent,
        )  # fmt: skip
        assert sorted(k["x"] for k in kids) == list(range(n))
        assert {k["status"] for k in kids} == {"completed"}
        assert await probe.fetchval(
            "select array_agg(e.seq order by e.seq) = array_agg(split_part(t.args->>0, ':', 1)::int"
            " order by e.seq) from durable.events e join durable.tasks t on t.id = e.child_id"
            " where e.task_id = $1 and e.kind = 'child'", parent,
        )  # fmt: skip

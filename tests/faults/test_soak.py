"""The apparatus of ``durable soak``: its audit of claims finds what it must (and nothing
on a correct history), its proxy cuts a daemon's listener alone, a short run still fires
every fault kind, and a machine without libfaketime is told so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest

import durable
from durable.listener import Listener
from durable.store import NamedSql
from durable.tools.soak import SQL
from durable.tools.soak.faults import Proxy
from durable.tools.soak.report import FAULTS
from tests.conftest import server_home
from tests.support.helpers import execute, fetchval, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def soak_sql(dsn: str) -> AsyncIterator[NamedSql]:
    """The test's database with the soak's audit installed, and its statements."""
    sql = await NamedSql.open(dsn, SQL, max_size=2)
    try:
        await sql.run("setup")
        yield sql
    finally:
        await sql.close()


async def start(
    dsn: str, queue: str, key: str | None = None, limit: int | None = None,
    idempotency_key: str | None = None,
) -> int:
    task_id = await fetchval(
        dsn, "select durable.start('t', queue => $1, concurrency_key => $2, key_limit => $3, "
        "idempotency_key => $4)", queue, key, limit, idempotency_key,
    )  # fmt: skip
    return int(task_id)


async def claim(dsn: str, queue: str, n: int = 10) -> list[int]:
    conn_rows = await fetchval(
        dsn, "select coalesce(array_agg(id order by id), '{}') "
        "from durable.claim($1, array['t'], $2, 30, $3)", queue, n, uuid.uuid4(),
    )  # fmt: skip
    return list(conn_rows)


async def finish(dsn: str, task_id: int) -> None:
    """The task's claim ends as a completion would end it."""
    await execute(
        dsn, "update durable.tasks set status = 'completed', finished_at = now(), "
        "claim_token = null, lease_until = null where id = $1", task_id,
    )  # fmt: skip


async def grab(dsn: str, task_id: int) -> None:
    """Claim the task whatever its state: what a claim that skips its checks would do."""
    await execute(
        dsn, "update durable.tasks set status = 'running', claim_token = durable.new_token(), "
        "lease_until = now() + interval '30 s', finished_at = null where id = $1", task_id,
    )  # fmt: skip


@pytest.mark.timeout(60)
async def test_the_claim_audit_finds_a_task_held_by_two_claims(dsn: str, soak_sql: NamedSql) -> None:
    first = await start(dsn, "plain")
    assert await claim(dsn, "plain") == [first]
    await finish(dsn, first)
    again = await start(dsn, "plain")
    await execute(dsn, "update durable.tasks set status = 'queued', claim_token = null, "
                  "finished_at = null where id = $1", first)  # a restart, claimed anew
    assert sorted(await claim(dsn, "plain")) == [first, again]
    assert await soak_sql.rows("check_double_claims") == []  # one claim after another

    await grab(dsn, again)  # a second token while the first still lives
    rows = await soak_sql.rows("check_double_claims")
    assert [(r["task_id"], r["how"]) for r in rows] == [(again, "claimed over a live token")]


@pytest.mark.timeout(60)
async def test_the_claim_audit_finds_a_limit_exceeded_at_any_instant(
    dsn: str, soak_sql: NamedSql
) -> None:
    await soak_sql.run("set_concurrency", "limited", 1)
    limited = [await start(dsn, "limited") for _ in range(3)]
    a = await start(dsn, "keys-a", "k", 1)
    b = await start(dsn, "keys-b", "k", 1)
    assert await claim(dsn, "limited") == limited[:1]
    assert await claim(dsn, "keys-a") == [a]
    assert await claim(dsn, "keys-b") == []  # the key is busy in the other queue
    await finish(dsn, a)
    assert await claim(dsn, "keys-b") == [b]
    await finish(dsn, limited[0])
    assert await claim(dsn, "limited") == limited[1:2]
    # A cancel requested while they run changes no claim: not counted as one.
    await execute(dsn, "update durable.tasks set cancel_requested = true where id = any($1)",
                  [b, limited[1]])
    assert await soak_sql.rows("check_limits") == []  # the engine kept both limits

    await grab(dsn, limited[2])
    c = await start(dsn, "keys-a", "k", 1)
    await grab(dsn, c)
    await finish(dsn, c)  # over the limit for a moment only: still found
    rows = {r["scope"]: r for r in await soak_sql.rows("check_limits")}
    assert sorted(rows) == ["key k", "queue limited"]
    assert rows["key k"]["most_at_once"] == 2 and rows["key k"]["lim"] == 1
    assert rows["queue limited"]["most_at_once"] == 2 and rows["queue limited"]["lim"] == 1


@pytest.mark.timeout(60)
async def test_an_acknowledged_cancel_is_checked_against_the_task_s_end(
    dsn: str, soak_sql: NamedSql
) -> None:
    async with durable.connect(dsn) as client:
        honoured = await start(dsn, "plain")  # queued: the cancel ends it at once
        finished = await start(dsn, "plain")
        lost = await start(dsn, "plain")
        assert sorted(await claim(dsn, "plain")) == [honoured, finished, lost]
        await finish(dsn, finished)
        acked: list[int] = []
        for task_id in (honoured, finished, lost):
            acked += (await client.cancel(task_id)).cancelled
        assert finished not in acked  # it had finished before the cancel
        await execute(dsn, "update durable.tasks set status = 'cancelled', claim_token = null, "
                      "lease_until = null, finished_at = now() where id = $1", honoured)
        await finish(dsn, lost)  # completed although the cancel had reached it running
    now = datetime.now(UTC)
    await soak_sql.run("record_cancels", acked, [now] * len(acked))
    rows = await soak_sql.rows("check_acked_cancels")
    assert [(r["id"], r["status"]) for r in rows] == [(lost, "completed")]
    assert [r["task_id"] for r in await soak_sql.rows("check_left_final")] == []


async def fail(dsn: str, task_id: int, error_type: str, message: str) -> None:
    await execute(
        dsn, "update durable.tasks set status = 'failed', finished_at = now(), claim_token = null, "
        "lease_until = null, error = jsonb_build_object('type', $2::text, 'message', $3::text) "
        "where id = $1", task_id, error_type, message,
    )  # fmt: skip


@pytest.mark.timeout(60)
async def test_a_hostile_task_must_fail_with_an_error_that_names_what_it_raised(
    dsn: str, soak_sql: NamedSql
) -> None:
    contained = await start(dsn, "plain", idempotency_key="h1")
    lost = await start(dsn, "plain", idempotency_key="h2")
    assert sorted(await claim(dsn, "plain")) == [contained, lost]
    await fail(dsn, contained, "builtins.SystemExit", "SystemExit: 3")
    await fail(dsn, lost, "durable.LeaseExpired", "the lease expired")  # its outcome was lost
    await soak_sql.run("record_started", ["h1", "h2"], ["hostile"] * 2, [None] * 2,
                       [False] * 2, ["SystemExit"] * 2)
    rows = await soak_sql.rows("check_outcomes")
    assert [(r["id"], r["error_type"]) for r in rows] == [(lost, "durable.LeaseExpired")]


@pytest.mark.timeout(60)
async def test_the_proxy_cuts_a_listener_alone_and_turns_its_reconnects_away(dsn: str) -> None:
    parts = urlsplit(dsn)
    proxy = Proxy(parts.port or 5432)
    await proxy.start()
    user = parts.netloc.rpartition("@")[0]
    via = urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{proxy.port}"))
    listener = Listener(via, on_ready=lambda _: None, on_control=lambda _: None,
                        on_reconnect=lambda: None)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(listener.run)
            proxy.refuse_listeners()
            assert proxy.cut_listeners() == 1

            async def refused() -> bool:
                return proxy.refused >= 2 and not listener.connected

            await wait_for(refused, timeout=20)  # it tried again, and again
            assert await fetchval(via, "select 1") == 1  # the other connections go through
            proxy.refuse_listeners(False)

            async def back() -> bool:
                return listener.connected and listener.reconnects == 1

            await wait_for(back, timeout=30)
            tg.cancel_scope.cancel()
    finally:
        await proxy.close()


def soak_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("DURABLE_TEST_DSN", "DURABLE_DATABASE_URL", "DATABASE_URL")}
    clean["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "durable", "soak", *args], capture_output=True, text=True,
        env={**clean, **(env or {})}, timeout=600, check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_short_soak_fires_every_fault_kind_and_every_invariant_holds() -> None:
    # Its own scratch home, which the embedded server's account can enter.
    with server_home() as home:
        done = soak_command("--duration", "10s", "--json", "--quiet", "--home", str(home))
    assert done.stdout, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["faults"].keys() == set(FAULTS)
    assert all(n >= 1 for n in report["faults"].values()), report["faults"]
    failed = [c for c in report["checks"] if not c["ok"]]
    # In full: a daemon that exited unasked brings the tail of its log, which pytest would cut.
    assert not failed, json.dumps(failed, indent=1)
    assert {"every_fault_injected", "faults_injected", "no_double_claim"} <= {
        c["name"] for c in report["checks"]
    }
    # Every kind of work ran, a child restart among it.
    assert report["stats"]["children_restarted"] >= 1, report["stats"]
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.timeout(60)
def test_without_libfaketime_the_soak_says_so_and_fails(tmp_path: Path) -> None:
    # A root that holds no libfaketime: the lookup sees an empty machine.
    code = (
        "import sys, durable.tools.soak.faults as f, pathlib\n"
        "f.FAKETIME_ROOT = pathlib.Path(sys.argv[1])\n"
        "from durable.cli import main\n"
        "main(['soak', '--duration', '1s'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert done.returncode == 1
    assert "libfaketime" in done.stderr and "apt-get install faketime" in done.stderr

"""Upgrades attacked: migrations run at once, cut off, on a schema someone else touched; a
daemon of the previous release across the migrations of this one; grants to hostile role
names; daemons on a schema older or newer than their code."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

import durable
from durable.errors import DurableError
from durable.store import latest_version, migrate
from durable.store.schema import migration_files
from tests.conftest import admin, database_dsn, quote_ident
from tests.support.helpers import (
    ROOT,
    daemon_env,
    durable_cli,
    fetch_text,
    fetchval,
    running_daemon,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

QUEUE = "upgrade-attacks"

PREVIOUS = 9
"""The last migration before those of this release (0010 on)."""

PREVIOUS_REVISION = "9e97cc289db94a14a5cb67418bd489b4639433de"
"""The last commit whose code needs schema 9: a daemon of the previous release."""


@durable.task(queue=QUEUE)
async def ua_double(x: int) -> int:
    return 2 * x


@durable.workflow(queue=QUEUE)
async def ua_flow(ctx: durable.Context, x: int) -> dict[str, object]:
    a = await ctx.step("add", lambda: x + 1)
    await ctx.sleep(0.05)
    b = await ctx.run(ua_double, a)
    got = await ctx.wait_for_event("go", timeout=60)
    return {"a": a, "b": b, "event": got}


# -- scratch databases and schemas at a chosen version --------------------------------------


@pytest.fixture
async def scratch(server_dsn: str) -> AsyncIterator[str]:
    name = f"durable_upg_{secrets.token_hex(4)}"
    await admin(server_dsn, f"create database {quote_ident(name)}")
    try:
        yield database_dsn(server_dsn, name)
    finally:
        await admin(server_dsn, f"drop database if exists {quote_ident(name)} with (force)")


async def migrate_to(dsn: str, last: int) -> None:
    """The schema as `durable migrate` of a release whose newest migration is ``last``
    left it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "create schema durable; create table durable.migrations (version integer primary"
            " key, name text not null, applied_at timestamptz not null default now())"
        )
        for version, name, path in migration_files():
            if version <= last:
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "insert into durable.migrations (version, name) values ($1, $2)",
                        version, name,
                    )  # fmt: skip
    finally:
        await conn.close()


async def versions(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch("select version from durable.migrations order by 1")]
    finally:
        await conn.close()


async def cli_async(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(partial(durable_cli, *args, dsn=dsn))


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- two migrations at once; one cut off ----------------------------------------------------


async def test_two_cli_migrations_at_once_apply_each_migration_once(scratch: str) -> None:
    done: list[subprocess.CompletedProcess[str]] = []

    async def one() -> None:
        done.append(await cli_async("migrate", dsn=scratch))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
    assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
    outs = sorted(d.stdout.strip() for d in done)
    assert outs[1] == "schema is current"
    assert outs[0].startswith("applied migrations: 1, ")
    assert await versions(scratch) == [v for v, _, _ in migration_files()]


async def test_a_migration_that_times_out_on_a_lock_stays_at_the_previous_version(
    scratch: str,
) -> None:
    """0010 alters durable.tasks: behind a transaction that holds the table, with a lock
    timeout, it fails; the database stays at the previous version, in one line that names
    the migration (not "cannot connect"), and a rerun completes."""
    await migrate_to(scratch, PREVIOUS)
    name = urlsplit(scratch).path.lstrip("/")
    await admin(scratch, f"alter database {quote_ident(name)} set lock_timeout = '300ms'")
    holder = await asyncpg.connect(scratch)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("lock table durable.tasks in access share mode")
        done = await cli_async("migrate", "--lock-wait", "1", dsn=scratch)
        await tx.rollback()
    finally:
        await holder.close()
    assert done.returncode == 1
    line = one_line(done)
    assert "migration 0010 (cheaper_writes) did not complete" in line, line
    assert f"stays at version {PREVIOUS}" in line and "cannot connect" not in line, line
    assert await versions(scratch) == [v for v, _, _ in migration_files() if v <= PREVIOUS]
    assert await fetchval(scratch, "select to_regtype('durable.checkpoint_epoch_row')") is None
    again = await cli_async("migrate", dsn=scratch)
    assert again.returncode == 0, again.stderr
    assert await versions(scratch) == [v for v, _, _ in migration_files()]


async def test_a_migration_behind_a_long_transaction_does_not_stop_the_fleet(
    scratch: str,
) -> None:
    """0010 alters durable.tasks, which a long transaction is reading. A migration waiting
    for it would queue every later statement on the table behind itself, the fleet's claims
    among them, for as long as that transaction lasts. It gives way after its lock timeout
    and tries again: a daemon's statement meanwhile gets through; once the transaction ends
    the migration completes."""
    await migrate_to(scratch, PREVIOUS)
    holder = await asyncpg.connect(scratch)
    fleet = await asyncpg.connect(scratch)
    waits: list[tuple[int, float]] = []
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("select count(*) from durable.tasks")  # holds it while open
        async with anyio.create_task_group() as tg:
            result: list[list[int]] = []

            async def run() -> None:
                result.append(await migrate(
                    scratch, lock_timeout=0.2, lock_wait=60,
                    on_wait=lambda v, _name, waited: waits.append((v, waited)),
                ))  # fmt: skip

            tg.start_soon(run)

            async def gave_way() -> bool:
                return len(waits) >= 2

            await wait_for(gave_way)
            # A claim's kind of statement, bounded well above the migration's lock timeout:
            # queued behind a migration that never gives way, it would time out.
            await fleet.execute("set statement_timeout = '5s'")
            assert await fleet.fetchval("select count(*) from durable.tasks") == 0
            await tx.rollback()
        assert result == [[v for v, _, _ in migration_files() if v > PREVIOUS]]
    finally:
        await holder.close()
        await fleet.close()
    assert {v for v, _ in waits} == {10}


async def test_a_migration_killed_midway_leaves_nothing_half_applied(scratch: str) -> None:
    """The backend of a migration waiting on a lock is terminated: nothing of 0010 is kept,
    the advisory lock goes with the session, and the next run applies everything."""
    await migrate_to(scratch, PREVIOUS)
    holder = await asyncpg.connect(scratch)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("lock table durable.tasks in access share mode")
        async with anyio.create_task_group() as tg:
            results: list[BaseException | list[int]] = []

            async def run() -> None:
                try:
                    results.append(await migrate(scratch))
                except Exception as exc:
                    results.append(exc)

            tg.start_soon(run)

            async def blocked() -> int | None:
                # (A fresh session: the holder's transaction sees one snapshot of the view.)
                return await fetchval(  # type: ignore[no-any-return]
                    scratch,
                    "select pid from pg_stat_activity where wait_event_type = 'Lock'"
                    " and datname = current_database() and pid <> pg_backend_pid()",
                )

            pid = await wait_for(blocked)
            await fetchval(scratch, "select pg_terminate_backend($1)", pid)
        await tx.rollback()
    finally:
        await holder.close()
    [result] = results
    assert isinstance(result, DurableError), result
    assert "migration 0010 (cheaper_writes) did not complete: " in str(result)
    assert f"stays at version {PREVIOUS}" in str(result) and "\n" not in str(result)
    assert await versions(scratch) == [v for v, _, _ in migration_files() if v <= PREVIOUS]
    # A third session could take the migration lock: the killed one released it.
    assert await fetchval(scratch, "select pg_try_advisory_lock(x'64757261626c65'::bigint)")
    assert await migrate(scratch) == [v for v, _, _ in migration_files() if v > PREVIOUS]


# -- a schema someone else touched -----------------------------------------------------------


async def test_a_schema_owned_by_another_role_is_refused_in_one_line(
    scratch: str, server_dsn: str
) -> None:
    owner, runner = (f"upg_{w}_{secrets.token_hex(3)}" for w in ("owner", "runner"))
    name = urlsplit(scratch).path.lstrip("/")
    password = secrets.token_hex(8)
    await admin(server_dsn, f"create role {owner}",
                f"create role {runner} login password '{password}'")  # fmt: skip
    try:
        await admin(scratch, f"create schema durable authorization {owner}",
                    f"grant create on database {quote_ident(name)} to {runner}")  # fmt: skip
        done = await cli_async("migrate", dsn=_as(scratch, runner, password))
        assert done.returncode == 1
        line = one_line(done)
        assert "cannot connect" not in line, line
        assert f"as role {runner}" in line and "owns the schema durable" in line, line
    finally:
        await admin(scratch, "drop schema if exists durable cascade",
                    f"drop owned by {runner}")  # fmt: skip
        await admin(server_dsn, f"drop role {owner}", f"drop role {runner}")


def _as(dsn: str, role: str, password: str | None = None) -> str:
    parts = urlsplit(dsn)
    secret = f":{quote(password, safe='')}" if password else ""
    netloc = f"{quote(role, safe='')}{secret}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_a_schema_whose_record_of_migrations_was_dropped_is_refused(scratch: str) -> None:
    await migrate(scratch)
    await admin(scratch, "drop table durable.migrations")
    with pytest.raises(DurableError, match="records no migration") as caught:
        await migrate(scratch)
    assert "\n" not in str(caught.value)
    # Nothing ran over the schema: the tasks table is the one that was there.
    assert await fetchval(scratch, "select count(*) from durable.migrations") == 0
    done = await cli_async("migrate", dsn=scratch)
    assert done.returncode == 1 and "records no migration" in one_line(done)


async def test_a_table_dropped_by_hand_is_named_by_migrate_and_check(scratch: str) -> None:
    await migrate(scratch)
    await admin(scratch, "drop table durable.signals")
    done = await cli_async("migrate", dsn=scratch)
    assert done.returncode == 1
    assert "lacks durable.signals" in one_line(done)
    check = await cli_async("check", dsn=scratch)
    assert check.returncode == 1
    assert "durable.signals" in one_line(check)


# -- daemons on a schema older or newer than their code --------------------------------------


@pytest.mark.parametrize("last", [None, PREVIOUS])
async def test_serve_on_an_older_schema_fails_in_one_line_and_starts_nothing(
    scratch: str, last: int | None
) -> None:
    if last is not None:
        await migrate_to(scratch, last)
    with pytest.raises(DurableError) as caught:
        async with running_daemon(scratch, queues=QUEUE):
            pytest.fail("the daemon started")
    message = str(caught.value)
    assert "\n" not in message and "run `durable migrate`" in message, message
    assert f"at version {last or 'none'}, this durable needs {latest_version()}" in message
    if last is not None:
        assert await fetchval(scratch, "select count(*) from durable.workers") == 0
        assert await fetchval(scratch, "select count(*) from durable.definitions") == 0


async def test_this_release_serves_a_schema_one_migration_newer(scratch: str) -> None:
    """What a rolling deploy of the next release does to this one: the next release
    migrates first, then replaces the daemons. A daemon of this release that restarts
    meanwhile starts, serves, and reports ready and healthy."""
    await migrate(scratch)
    newer = latest_version() + 1
    await admin(scratch, f"insert into durable.migrations values ({newer}, 'next_release')")
    check = await cli_async("check", dsn=scratch)
    assert check.returncode == 0, check.stderr
    async with durable.connect(scratch) as client, running_daemon(
        scratch, queues=QUEUE, http="127.0.0.1:0"
    ) as daemon:
        handle = await client.start(ua_double, 21)
        assert await handle.result(timeout=20) == 42
        assert daemon.http is not None
        url = f"http://127.0.0.1:{daemon.http.port}/readyz"
        ready = json.loads(await anyio.to_thread.run_sync(fetch_text, url))
        assert ready["status"] == "ready", ready
    run = await cli_async("run", "--burst", "--app", __name__, dsn=scratch)
    assert run.returncode == 0, run.stderr


# -- a daemon of the previous release across this release's migrations -----------------------


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is needed to check out the previous release")
    where = tmp_path_factory.mktemp("previous") / "durable"
    made = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), PREVIOUS_REVISION],
        capture_output=True, text=True,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot check out {PREVIOUS_REVISION[:7]}: {made.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
                       capture_output=True)  # fmt: skip


OLD_APP = '''
import durable

Q = "upgrade-old"

@durable.task(queue=Q)
async def old_double(x: int) -> int:
    return 2 * x

@durable.workflow(queue=Q)
async def old_flow(ctx: durable.Context, x: int) -> dict:
    a = await ctx.step("add", lambda: x + 1)
    got = await ctx.wait_for_event("go", timeout=120)
    b = await ctx.run(old_double, a)
    await ctx.sleep(0.05)
    c = await ctx.step("after", lambda: b + 1)
    return {"a": a, "b": b, "c": c, "event": got}

@durable.workflow(queue=Q)
async def old_entity(ctx: durable.Context, n: int, total: int = 0) -> int:
    got = await ctx.wait_for_event("add", timeout=120)
    total += int(got)
    if n <= 1:
        return total
    await ctx.continue_as_new(n - 1, total=total)
'''


async def test_a_daemon_of_the_previous_release_serves_on_across_the_migrations(
    scratch: str, previous_release: Path, tmp_path: Path
) -> None:
    """The promise of a rolling deploy (migrate, then replace the daemons): an old daemon
    still running keeps its workflows in flight going after this release's migrations —
    its checkpoint rows, claims, children, events, sleeps, continue_as_new and new starts."""
    (tmp_path / "old_app.py").write_text(OLD_APP)
    env = daemon_env(scratch, PYTHONPATH=f"{previous_release}:{tmp_path}")
    old_cli = [sys.executable, "-m", "durable"]
    made = await anyio.to_thread.run_sync(partial(
        subprocess.run, [*old_cli, "migrate"], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    ))  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert (await versions(scratch))[-1] == PREVIOUS
    old = spawn([*old_cli, "run", "--app", "old_app", "--queues", "upgrade-old=8"], env,
                tmp_path)  # fmt: skip
    try:
        await _rolling(scratch, old)
    finally:
        old.terminate()
        try:
            old.wait(20)
        except subprocess.TimeoutExpired:
            old.kill()
    tail = (tmp_path / "old.log").read_text()
    assert not re.search(r'"level": ?"(error|critical)"', tail), tail[-3000:]


def spawn(args: list[str], env: dict[str, str], where: Path) -> subprocess.Popen[bytes]:
    with open(where / "old.log", "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(args, env=env, cwd=where, stdout=log, stderr=subprocess.STDOUT)


async def _rolling(dsn: str, old: subprocess.Popen[bytes]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async def published() -> bool:
            return bool(await conn.fetchval(
                "select count(*) = 3 from durable.definitions where name like 'old_%'"))  # fmt: skip

        await wait_for(published, timeout=30)
        flows = [await conn.fetchval("select durable.start('old_flow', $1)", f"[{i}]")
                 for i in range(3)]  # fmt: skip
        entity = await conn.fetchval("select durable.start('old_entity', '[3]')")

        async def waiting() -> bool:
            return bool(await conn.fetchval(
                "select count(*) = 4 from durable.tasks where status = 'waiting'"))  # fmt: skip

        await wait_for(waiting, timeout=30)
        # This release's migrations, under the old daemon's feet.
        assert await migrate(dsn)
        assert old.poll() is None
        for task in flows:
            assert await conn.fetchval("select durable.send_event($1, 'go', '\"x\"')", task)
        late = await conn.fetchval("select durable.start('old_flow', '[10]')")
        current = entity
        for n in (5, 6, 7):
            assert await conn.fetchval("select durable.send_event($1, 'add', $2)", current,
                                       str(n))  # fmt: skip

            async def moved(task: int = current) -> int | None:
                return await conn.fetchval(  # type: ignore[no-any-return]
                    "select coalesce(continued_as, case when status = 'completed' then id end)"
                    " from durable.tasks where id = $1", task)  # fmt: skip

            nxt = await wait_for(moved, timeout=30)
            if nxt == current:
                break
            current = nxt

            async def waits(task: int = current) -> bool:
                return bool(await conn.fetchval(
                    "select status = 'waiting' from durable.tasks where id = $1", task))  # fmt: skip

            await wait_for(waits, timeout=30)
        assert await conn.fetchval("select durable.send_event($1, 'go', '1')", late)

        async def finished() -> bool:
            return bool(await conn.fetchval(
                "select count(*) filter (where status not in ('completed')) = 0"
                " and count(*) >= 10 from durable.tasks"))  # fmt: skip

        await wait_for(finished, timeout=60)
        results = [await conn.fetchval("select result from durable.tasks where id = $1", t)
                   for t in flows]  # fmt: skip
        assert all('"c"' in r for r in results), results
        assert await conn.fetchval("select result from durable.tasks where id = $1",
                                   current) == "18"  # fmt: skip
        # Its checkpoints went through the old row type, times and all.
        assert await conn.fetchval(
            "select count(*) from durable.events where started_at is null and kind = 'step'"
        ) == 0
    finally:
        await conn.close()


# -- grants to role names that need quoting --------------------------------------------------

HOSTILE = 'Upg App "x"; drop table durable.tasks; --'


async def privileges(dsn: str, role: str) -> set[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            select c.oid::regclass::text as obj, a.privilege_type from pg_class c,
                   aclexplode(c.relacl) a
             where c.relnamespace = 'durable'::regnamespace and a.grantee = $1::regrole
            union all
            select p.oid::regprocedure::text, a.privilege_type from pg_proc p,
                   aclexplode(p.proacl) a
             where p.pronamespace = 'durable'::regnamespace and a.grantee = $1::regrole
            union all
            select n.nspname, a.privilege_type from pg_namespace n, aclexplode(n.nspacl) a
             where n.nspname = 'durable' and a.grantee = $1::regrole
            """,
            quote_ident(role),
        )
        return {(r[0], r[1]) for r in rows}
    finally:
        await conn.close()


async def test_grant_twice_to_a_hostile_role_name_gives_exactly_what_a_plain_one_gets(
    scratch: str, server_dsn: str
) -> None:
    plain = f"upg_plain_{secrets.token_hex(3)}"
    password = secrets.token_hex(8)
    await admin(server_dsn, f"create role {quote_ident(HOSTILE)} login password '{password}'",
                f"create role {plain}")  # fmt: skip
    try:
        for _ in range(2):
            done = await cli_async("migrate", "--grant", HOSTILE, "--grant", plain, dsn=scratch)
            assert done.returncode == 0, done.stderr
        assert await fetchval(scratch, "select count(*) from durable.tasks") == 0
        got, want = await privileges(scratch, HOSTILE), await privileges(scratch, plain)
        assert got == want and ("durable", "USAGE") in got
        assert ("durable", "CREATE") not in got
        # Every function, the newer migrations' too, is executable by the role.
        missing = await fetchval(
            scratch,
            "select array_agg(p.oid::regprocedure::text) from pg_proc p"
            " where p.pronamespace = 'durable'::regnamespace"
            "   and not has_function_privilege($1, p.oid, 'execute')",
            HOSTILE,
        )
        assert missing is None
        # And it serves a workflow end to end, as that role alone.
        app = _as(scratch, HOSTILE, password)
        async with durable.connect(app) as client, running_daemon(app, queues=QUEUE):
            flow = await client.start(ua_flow, 1)

            async def waiting() -> bool:
                return (await client.get(flow.id)).waiting_event == "go"

            await wait_for(waiting)
            assert await client.send_event(flow.id, "go", "ok")
            assert await flow.result(timeout=20) == {"a": 2, "b": 4, "event": "ok"}
    finally:
        await admin(scratch, f"drop owned by {quote_ident(HOSTILE)}", f"drop owned by {plain}")
        await admin(server_dsn, f"drop role {quote_ident(HOSTILE)}", f"drop role {plain}")


# -- search_path in the functions of this release's migrations -------------------------------

_FUNCTION = re.compile(
    r"create\s+(?:or\s+replace\s+)?function\s+(durable\.\w+)(.*?)\$\$", re.S | re.I
)


def test_every_function_of_the_new_migrations_pins_its_search_path() -> None:
    found = 0
    for version, _name, path in migration_files():
        if version <= PREVIOUS:
            continue
        for name, head in _FUNCTION.findall(path.read_text()):
            found += 1
            assert re.search(r"set\s+search_path\s*=\s*pg_catalog,\s*pg_temp", head), (
                f"{path.name}: {name} does not pin search_path"
            )
    assert found


async def test_every_function_in_the_migrated_schema_pins_its_search_path(scratch: str) -> None:
    await migrate(scratch)
    loose = await fetchval(
        scratch,
        "select array_agg(p.proname::text order by p.proname) from pg_proc p"
        " where p.pronamespace = 'durable'::regnamespace"
        "   and not coalesce(p.proconfig::text like '%search_path=pg_catalog, pg_temp%', false)",
    )
    # new_token is inlined SQL (a pinned setting would stop the inlining) and spells every
    # operator with its schema instead.
    assert loose == ["new_token"]

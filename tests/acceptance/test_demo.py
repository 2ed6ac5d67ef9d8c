"""`durable demo` as a newcomer runs it: tasks finish, the killed order charges once."""

from __future__ import annotations

from urllib.parse import urlsplit

import anyio
import pytest

from tests.support.helpers import durable_cli, fetchval


@pytest.mark.timeout(120)
def test_demo_runs_and_charges_once(dsn: str) -> None:
    done = durable_cli("demo", dsn=dsn, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "demo.flaky   attempt 3" in out  # failed twice, succeeded on the third attempt
    assert "died with signal 9" in out
    assert "the card was charged 1 time(s); inventory reserved 1 time(s)" in out
    assert "0  step         charge" in out


@pytest.mark.timeout(120)
async def test_demo_stores_no_database_url(dsn: str) -> None:
    """Whatever durable writes to a task or an event may be shown to anyone who can read
    the tables: a URL, which may hold a password, must not be among it."""
    done = await anyio.to_thread.run_sync(lambda: durable_cli("demo", dsn=dsn, timeout=110))
    assert done.returncode == 0, done.stdout + done.stderr
    host = urlsplit(dsn).netloc.rpartition("@")[2]
    stored = await fetchval(
        dsn,
        "select count(*) from durable.tasks t left join durable.events e on e.task_id = t.id"
        " where concat_ws(' ', t.args, t.kwargs, t.result, t.error, e.result, e.error)"
        " like '%' || $1 || '%'",
        host,
    )
    assert stored == 0

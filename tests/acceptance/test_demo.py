"""`durable demo` as a newcomer runs it: tasks finish, the killed order charges once."""

from __future__ import annotations

import pytest

from tests.helpers import durable_cli


@pytest.mark.timeout(120)
def test_demo_runs_and_charges_once(dsn: str) -> None:
    done = durable_cli("demo", dsn=dsn, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "demo.flaky   attempt 3" in out  # failed twice, succeeded on the third attempt
    assert "died with signal 9" in out
    assert "the card was charged 1 time(s); inventory reserved 1 time(s)" in out
    assert "0  step         charge" in out

"""`durable ui` as a user runs it: it prints where it serves, serves, refuses actions
without a secret, and exits 0 on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys

import anyio
import httpx

from tests.support.helpers import ROOT, daemon_env


async def test_durable_ui_serves_until_sigterm(dsn: str) -> None:
    with subprocess.Popen(  # noqa: ASYNC220 (started once, read from a thread)
        [sys.executable, "-m", "durable", "ui", "--listen", "127.0.0.1:0"],
        cwd=ROOT, env=daemon_env(dsn), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as proc:  # fmt: skip
        await _serve_and_stop(proc)


async def _serve_and_stop(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
        assert line.startswith("dashboard: http://127.0.0.1:") and "(read-only)" in line, line
        url = line.split()[1]
        async with httpx.AsyncClient() as http:
            page = await http.get(url)
            assert page.status_code == 200 and "Queues" in page.text and "read-only" in page.text
            refused = await http.post(url + "tasks/1/retry")
            assert refused.status_code == 403
        proc.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: proc.wait(timeout=20)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bad_listen_address_or_secret_file_is_one_line(tmp_path: object) -> None:
    for args, expected in [
        (["--listen", "nowhere"], "durable: --listen: expected host:port"),
        (["--token-file", "/nonexistent/token"], "durable: --token-file: cannot read"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "durable", "ui", "--database-url",
             "postgresql://nobody@127.0.0.1:1/x", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(expected) and done.stderr.count("\n") == 1, done.stderr

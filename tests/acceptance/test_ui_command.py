"""`durable ui` as a user runs it: it prints where it serves, serves, refuses actions
without a secret, and exits 0 on SIGTERM, even one sent as soon as it says it serves."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from tests.support.helpers import ROOT, daemon_env, wait_for

UI = [sys.executable, "-m", "durable", "ui"]
DEADLINE = 150
"""Seconds a test's processes get, all steps together: each step waits for what it waits
for (a line, an answer, an exit) however slow a loaded machine makes it, and this bound,
inside the test's own timeout, only ends a hang, killing what still runs."""


@pytest.mark.timeout(DEADLINE + 30)
async def test_durable_ui_serves_until_sigterm(dsn: str) -> None:
    with subprocess.Popen(  # noqa: ASYNC220 (started once, read from a thread)
        [*UI, "--listen", "127.0.0.1:0"],
        cwd=ROOT, env=daemon_env(dsn), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as proc:  # fmt: skip
        await _serve_and_stop(proc)


async def _serve_and_stop(proc: subprocess.Popen[str]) -> None:
    try:
        with anyio.fail_after(DEADLINE):
            assert proc.stdout is not None
            line = await anyio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
            assert line.startswith("dashboard: http://127.0.0.1:") and "(read-only)" in line, line
            url = line.split()[1]
            # Not httpx's 5 s a step: a first page on a loaded machine can take longer.
            async with httpx.AsyncClient(timeout=None) as http:
                page = await http.get(url)
                assert page.status_code == 200, page.text
                assert "Queues" in page.text and "read-only" in page.text
                refused = await http.post(url + "tasks/1/retry")
                assert refused.status_code == 403
            proc.send_signal(signal.SIGTERM)
            assert await anyio.to_thread.run_sync(proc.wait, abandon_on_cancel=True) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(DEADLINE + 30)
async def test_a_sigterm_as_it_says_it_serves_stops_it_cleanly(dsn: str) -> None:
    """Whoever waits for the line that says it serves may stop it at once: a SIGTERM sent
    while the line is being written (into a full pipe, so the write waits) exits 0."""
    out, into, filled = _full_pipe()
    try:
        with subprocess.Popen(  # noqa: ASYNC220 (started once, waited for from a thread)
            [*UI, "--listen", "127.0.0.1:0"],
            cwd=ROOT, env=daemon_env(dsn), stdout=into, stderr=subprocess.DEVNULL,
        ) as proc:  # fmt: skip
            os.close(into)
            try:

                async def writing() -> bool:
                    return _writing_to_a_pipe(proc.pid) or proc.poll() is not None

                await wait_for(writing, timeout=DEADLINE)
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(DEADLINE):
                    said = await anyio.to_thread.run_sync(_read_all, out, abandon_on_cancel=True)
                    code = await anyio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
                said = said[filled:]
                assert code == 0 and said.startswith(b"dashboard: http://127.0.0.1:"), (code, said)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        os.close(out)


def _full_pipe() -> tuple[int, int, int]:
    """A pipe with no room left: its read end, its write end and the bytes it holds."""
    out, into = os.pipe()
    os.set_blocking(into, False)
    filled = 0
    for size in (4096, 1):
        with contextlib.suppress(BlockingIOError):
            while True:
                filled += os.write(into, b"x" * size)
    os.set_blocking(into, True)  # the child's writes wait for room
    return out, into, filled


def _writing_to_a_pipe(pid: int) -> bool:
    """Whether ``pid`` waits for room in a pipe (the kernel function it sleeps in, which is
    pipe_write or, in newer kernels, anon_pipe_write)."""
    with open(f"/proc/{pid}/wchan") as f:
        return f.read().endswith("pipe_write")


def _read_all(fd: int) -> bytes:
    with open(fd, "rb", closefd=False) as f:
        return f.read()


@pytest.mark.timeout(DEADLINE + 30)
def test_a_bad_listen_address_or_secret_file_is_one_line(tmp_path: object) -> None:
    deadline = time.monotonic() + DEADLINE
    for args, expected in [
        (["--listen", "nowhere"], "durable: --listen: expected host:port"),
        (["--token-file", "/nonexistent/token"], "durable: --token-file: cannot read"),
    ]:
        done = subprocess.run(
            [*UI, "--database-url", "postgresql://nobody@127.0.0.1:1/x", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=deadline - time.monotonic(),
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(expected) and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.timeout(DEADLINE + 30)
async def test_a_sigterm_with_a_page_listening_ends_its_stream_and_logs_no_error(
    dsn: str, tmp_path: Path
) -> None:
    """A page open on the dashboard holds its live stream (/events) open. On SIGTERM the
    stream ends and the process exits 0 without an error: left open, the stream outlasted
    the server's grace for its connections and was cancelled, logged with a traceback."""
    errors = tmp_path / "stderr"
    with open(errors, "wb") as err, subprocess.Popen(  # noqa: ASYNC220, ASYNC230 (started once)
        [*UI, "--listen", "127.0.0.1:0"],
        cwd=ROOT, env=daemon_env(dsn), stdout=subprocess.PIPE, stderr=err, text=True,
    ) as proc:  # fmt: skip
        try:
            with anyio.fail_after(DEADLINE):
                assert proc.stdout is not None
                line = await anyio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
                url = line.split()[1]
                async with (
                    httpx.AsyncClient(timeout=None) as http,
                    http.stream("GET", url + "events") as stream,
                ):
                    chunks = stream.aiter_raw()
                    assert (await anext(chunks)).startswith(b"retry:")
                    proc.send_signal(signal.SIGTERM)
                    rest = [chunk async for chunk in chunks]  # the server ends it
                assert b"closing" not in b"".join(rest)  # not sent as a change to reload on
                assert await anyio.to_thread.run_sync(proc.wait, abandon_on_cancel=True) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    said = errors.read_text()
    assert "Traceback" not in said and "Exception in ASGI application" not in said, said

"""Task code cannot take its daemon down: SystemExit, KeyboardInterrupt, any BaseException
and a CancelledError of its own fail the attempt; an error that cannot be stored as it is
is stored sanitised and truncated, with the retry policy and NonRetryable honoured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import durable
from tests.apps.hostile_tasks import (
    QUEUE,
    hostile_base,
    hostile_cancelled,
    hostile_echo,
    hostile_exit,
    hostile_interrupt,
    hostile_message,
    hostile_step_exit,
)
from tests.support.helpers import kill, spawn_daemon_logged

EXPECTED_TYPES = {
    "hostile_exit": "builtins.SystemExit",
    "hostile_interrupt": "builtins.KeyboardInterrupt",
    "hostile_base": "tests.apps.hostile_tasks.Doom",
    "hostile_cancelled": "asyncio.exceptions.CancelledError",
    "hostile_step_exit": "builtins.SystemExit",
}


async def _failed(client: durable.Client, handle: durable.Handle) -> Any:
    with pytest.raises(durable.TaskFailed) as caught:
        await handle.result(timeout=60)
    info = await client.get(handle.id)
    assert info.status == "failed"
    return caught.value, info


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_task_code_cannot_kill_its_daemon(dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    proc = spawn_daemon_logged(
        dsn, "tests.apps.hostile_tasks", log, DURABLE_QUEUES=f"{QUEUE}=4", DURABLE_LEASE="30",
    )  # fmt: skip
    try:
        async with durable.connect(dsn) as client:
            handles = {
                "hostile_exit": await client.start(hostile_exit, 7),
                "hostile_interrupt": await client.start(hostile_interrupt),
                "hostile_base": await client.start(hostile_base),
                "hostile_cancelled": await client.start(hostile_cancelled),
                "hostile_step_exit": await client.start(hostile_step_exit),
            }
            for name, handle in handles.items():
                error, info = await _failed(client, handle)
                assert error.type == EXPECTED_TYPES[name], name
                # Each spent its two attempts: the policy decided, not an expired lease.
                assert info.attempt == 2, name
            # The same daemon is still there, serving.
            alive = await client.start(hostile_echo, "alive")
            assert await alive.result(timeout=30) == "alive"
            assert proc.poll() is None
    finally:
        kill(proc)
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_an_error_that_cannot_be_stored_as_it_is_is_stored_sanitised(
    dsn: str, tmp_path: Path
) -> None:
    log = tmp_path / "daemon.log"
    proc = spawn_daemon_logged(
        dsn, "tests.apps.hostile_tasks", log, DURABLE_QUEUES=f"{QUEUE}=4", DURABLE_LEASE="30",
    )  # fmt: skip
    try:
        async with durable.connect(dsn) as client:
            kinds = ["nul", "surrogate", "unreadable", "huge", "refused"]
            handles = {k: await client.start(hostile_message, k) for k in kinds}
            errors = {}
            for kind, handle in handles.items():
                error, info = await _failed(client, handle)
                errors[kind] = error
                # NonRetryable still fails at once; the rest spend both attempts.
                assert info.attempt == (1 if kind == "refused" else 2), kind
                assert "LeaseExpired" not in error.type, kind
            assert "NUL" in errors["nul"].message and "\x00" not in errors["nul"].message
            assert "lone surrogate" in errors["surrogate"].message
            assert errors["unreadable"].type.endswith("Unreadable")
            assert "str() failed" in errors["unreadable"].message
            huge = errors["huge"].message
            assert len(huge) < 64 * 1024 and "truncated" in huge and "bytes" in huge
            assert errors["refused"].type.endswith("Refused")
            assert proc.poll() is None
    finally:
        kill(proc)
        proc.wait(timeout=30)

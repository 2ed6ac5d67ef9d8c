"""Step policies: a workflow's step or transaction retried inside the same run, each try
bounded by a timeout, each try recorded in the event log.

A step run with ``retry=`` or ``timeout=`` takes one log position per try. A failed try
is a ``failed`` event whose error carries ``try`` and ``tries``; a replay consumes the
recorded failed tries in order and goes on from where the run stopped. Between two tries
the workflow waits the policy's backoff: in the process when it is short (at most
``INLINE_BACKOFF``), else as a durable sleep recorded after the failed try (a ``sleep``
event named ``"<step> (backoff)"``), which suspends the workflow and frees its slot as
``ctx.sleep`` does. When the last try fails, its error is raised and marks every position
the step took, so that the workflow's own next attempt (or ``durable retry``) drops them
and runs the step again with all its tries.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from durable.codec import digest, dumps, dumps_spaced, error_text, loads, loads_as_stored
from durable.errors import LeaseLost, NonRetryable
from durable.replay import Suspend, as_recorded, check_name
from durable.retry import RetryPolicy

if TYPE_CHECKING:
    from durable.hooks import Hooks
    from durable.models import Event
    from durable.replay import Journal, StepTracer
    from durable.store import Store

INLINE_BACKOFF = 5.0
"""Seconds: a backoff up to this long is waited in the process, holding the slot; a
longer one suspends the workflow. Below it a suspension's round trip (suspend, timer,
claim, replay of the log) costs more than the slot is worth; above it the slot is better
given back."""

DEFAULT_TRIES = 3
"""Tries of a step given ``retry=RetryPolicy()`` without ``max_attempts``."""

ONE_TRY = RetryPolicy(max_attempts=1)


def backoff_name(name: str) -> str:
    return f"{name} (backoff)"


def check_options(retry: object, timeout: object) -> None:
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a durable.RetryPolicy, not {type(retry).__name__}")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < float("inf")
    ):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


async def run(
    log: Journal,
    store: Store,
    tracer: StepTracer,
    kind: str,
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    retry: RetryPolicy | None,
    timeout: float | None,
    hooks: Hooks | None = None,
) -> Any:
    """``ctx.step`` / ``ctx.transaction`` under a retry policy and a per-try timeout;
    ``hooks`` are the test kit's seams, around each try and at each short backoff."""
    check_name(kind, name)
    check_options(retry, timeout)
    policy = retry or ONE_TRY
    tries = policy.max_attempts or DEFAULT_TRIES
    dig = digest(kind, name, [args, kwargs])
    pause = backoff_name(name)
    pause_dig = digest("sleep", pause, None)
    positions: list[int] = []
    log.begin(kind, name)
    try:
        for n in range(1, tries + 1):
            seq, event = log.next(kind, name, dig)
            positions.append(seq)
            if event is not None:
                if event.status != "failed":
                    return loads(event.result)
                error = loads(event.error) or {}
            else:
                started = store.epoch()
                failure: BaseException | None = None
                with tracer.step_span(name, seq, kind):
                    try:
                        if kind == "step":
                            async with asyncio.timeout(timeout):
                                if hooks is not None:
                                    await hooks.before_call(log.task, kind, name)
                                result = fn(*args, **kwargs)
                                if inspect.isawaitable(result):
                                    result = await result
                        else:
                            if hooks is not None:
                                await hooks.before_call(log.task, kind, name)
                            cp = log.checkpoint(seq, kind, name, dig, started_at=started)
                            result = await store.transaction_step(cp, fn, args, kwargs, timeout)
                    except LeaseLost as exc:
                        raise log.aborted(exc) from None
                    except TimeoutError as exc:
                        failure = exc if str(exc) else TimeoutError(
                            f"{kind} {name!r} took longer than its timeout of {timeout}s"
                        )
                    except Exception as exc:
                        failure = exc
                    if hooks is not None and kind == "step":
                        await hooks.after_call(log.task, kind, name)
                if failure is None:
                    if kind == "step":
                        text = await dumps_spaced(result, what=f"the result of step {name!r}")
                        await log.commit(
                            log.checkpoint(seq, kind, name, dig, result=text, started_at=started)
                        )
                        return as_recorded(result, text)
                    return as_recorded(result, dumps(result))  # committed with its event
                if kind == "transaction":
                    from durable.store import is_transient

                    if is_transient(failure):
                        # A connection lost at the commit leaves its outcome unknown: the
                        # transaction may have committed, with its event at this position.
                        done = await _committed(store, log, seq)
                        if done is not None:
                            return loads(done.result)
                        if n == tries:
                            raise failure  # rolled back, nothing to record (ctx.transaction)
                error = loads(error_text(failure))
                error["try"], error["tries"] = n, tries
                if isinstance(failure, NonRetryable):
                    error["retryable"] = False
                del failure
                await log.commit(
                    log.checkpoint(
                        seq, kind, name, dig, status="failed", error=dumps(error),
                        started_at=started,
                    )
                )
            if n == tries or error.get("retryable") is False:
                raise log.failure(positions, loads_as_stored(dumps(error)))
            ahead = log.events.get(log.seq)
            if ahead is not None:
                if ahead.kind == "sleep" and ahead.name == pause:
                    at, _ = log.next("sleep", pause, pause_dig)
                    positions.append(at)
                    assert ahead.wake_at is not None
                    if store.now() < ahead.wake_at:
                        raise Suspend(wake_at=ahead.wake_at)
                continue  # the next try is recorded: replay it
            delay = policy.delay(n)
            if delay <= INLINE_BACKOFF:
                await (hooks.backoff(delay) if hooks is not None else asyncio.sleep(delay))
                continue
            at, _ = log.next("sleep", pause, pause_dig)
            positions.append(at)
            wake = store.now() + timedelta(seconds=delay)
            await log.commit(log.checkpoint(at, "sleep", pause, pause_dig, wake_at=wake))
            raise Suspend(wake_at=wake)
        raise AssertionError("unreachable: the last try returns or raises")
    finally:
        log.busy = None


async def _committed(store: Store, log: Journal, seq: int) -> Event | None:
    """The completed event at ``seq`` of this attempt's branch, if a transaction wrote it."""
    _, tail = await store.load_tail(log.task.id, log.task.branch, seq)
    for event in tail:
        if event.seq == seq and event.status == "completed":
            return event
    return None

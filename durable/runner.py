"""Run one claimed attempt of a task or workflow, and record how it ended.

Completions go to the acknowledgements' group commit (acks.py); the other outcomes
(suspend, retry, fail, cancel) are written here, one statement each.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from durable import taskcontext, tracing
from durable.acks import Completion
from durable.attempts import Attempt
from durable.batch import Batcher
from durable.codec import describe_error, dumps_spaced, error_text, loads
from durable.errors import (
    DeadlineExceeded,
    LeaseLost,
    NonDeterminismError,
    NonRetryable,
    PayloadError,
    Retry,
    TaskCancelled,
)
from durable.hooks import Hooks as Hooks  # for the daemon, which passes them on
from durable.logs import get_logger
from durable.metrics import Metrics
from durable.models import Claimed
from durable.registry import Definition, Registry
from durable.replay import CheckpointWriter, ContinueAsNew, StepTracer, Suspend
from durable.retry import after_failure
from durable.sticky import WorkflowRuns
from durable.store import Store, is_fatal
from durable.taskcontext import TaskContext

log = get_logger("durable.runner")

T = TypeVar("T")

WRITE_RETRIES = (0.2, 1.0, 2.0, 5.0)
"""Pauses between tries of a finishing write that the database refused for a reason of the
moment (a restart, a login refused, a privilege briefly revoked): an outcome is worth a few
seconds, and the attempt's lease is kept meanwhile. Then the lease is left to expire."""


class Runner:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        completions: Batcher[Completion, bool],
        checkpoints: CheckpointWriter,
        on_timer: Callable[[datetime], None],
        *,
        metrics: Metrics | None = None,
        tracer: StepTracer = tracing,
        hooks: Hooks | None = None,
        cache: int = 0,
        warn_at: int | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.completions = completions
        self.checkpoints = checkpoints
        self.on_timer = on_timer
        self.metrics = metrics or Metrics()
        self.tracer = tracer
        self.hooks = hooks
        """The test kit's seams (durable.hooks); None in every other daemon."""
        self.workflows = WorkflowRuns(
            store, checkpoints, registry.get, size=cache, history_warning=warn_at,
            tracer=tracer, metrics=self.metrics, hooks=hooks,
        )  # fmt: skip
        self.metrics.workflows_parked = self.workflows.__len__

    async def run(self, attempt: Attempt) -> None:
        """Run the attempt; every outcome but 'shutdown' is written before returning."""
        task = attempt.task
        started = time.monotonic()
        definition = self.registry.get(task.name)
        outcome: tuple[str, Any]
        if attempt.reason is not None:
            # Stopped while it waited for a slot (claimed ahead): its code never ran.
            outcome = ("cancelled", None)
        else:
            attempt.running = True
            with tracing.attempt_span(task) as span:
                try:
                    outcome = await self._execute(task, definition)
                except asyncio.CancelledError:
                    if attempt.reason is None:
                        raise
                    current = asyncio.current_task()
                    if current is not None:
                        current.uncancel()
                    outcome = ("cancelled", None)
                tracing.record_outcome(span, outcome)
        attempt.finishing = True
        # The code is done: the slot can take the next task while the outcome is written
        # (the lease still covers this task until its write commits).
        attempt.release_slot()
        if attempt.reason == "shutdown":
            return  # the daemon releases every unfinished task in one statement
        if attempt.reason == "lease_lost":
            self.workflows.discard(task.id, task.token)
            log.warning("task_abandoned", task_id=task.id, name=task.name, reason="lease_lost")
            return
        try:
            await self._finish(task, definition, outcome, time.monotonic() - started)
        except Exception as exc:
            # A database that kept refusing the outcome is the environment's, not a bug
            # (those are runner_error): the lease expires and the task runs again.
            self.workflows.discard(task.id, task.token)
            if is_fatal(exc):
                raise
            log.warning(
                "task_outcome_not_written",
                task_id=task.id,
                error=describe_error(exc),
                note="the lease will expire and the task will run again",
            )

    async def _execute(
        self, task: Claimed, definition: Definition[Any, Any] | None
    ) -> tuple[str, Any]:
        by_deadline = False  # the attempt's time limit is the task's deadline
        try:
            if definition is None:
                raise NonRetryable(f"no task or workflow named {task.name!r} is registered")
            args, kwargs = _arguments(task)
            limit = task.timeout
            if task.deadline is not None:
                left = (task.deadline - self.store.now()).total_seconds()
                if left <= 0:
                    raise DeadlineExceeded(f"the deadline {task.deadline.isoformat()} passed")
                if limit is None or left < limit:
                    limit, by_deadline = left, True
            here = TaskContext(task, self.store, task.deadline)
            entered = taskcontext.enter(here)
            try:
                # Inline rather than a coroutine of its own: a workflow resumes once per
                # step through every coroutine level between its task and the step.
                timer = asyncio.timeout(limit) if limit is not None else None
                async with timer if timer is not None else _untimed:
                    if self.hooks is not None:
                        await self.hooks.before_call(task, definition.kind, task.name)
                    if definition.kind == "workflow":
                        d = definition
                        result = await self.workflows.run(
                            task, lambda ctx: _call(d, task, ctx, *args, **kwargs)
                        )
                    elif definition.takes_context:
                        result = await _call(definition, task, here, *args, **kwargs)
                    else:
                        result = await _call(definition, task, *args, **kwargs)
                if timer is not None and timer.expired():
                    # The code caught the cancel its time limit sent and returned anyway:
                    # the attempt took longer than it may, whatever it returned.
                    raise TimeoutError
            finally:
                taskcontext.leave(entered)
                if here.reported:  # a task that never reported awaits nothing here
                    await here.finish()
            text = await dumps_spaced(result, what=f"the result of {task.name!r}")
            return ("completed", text)
        except Suspend as s:
            return ("suspended", s)
        except ContinueAsNew as c:
            return ("continued", c)
        except TimeoutError as exc:
            if by_deadline and not str(exc) and task.deadline is not None:
                late = DeadlineExceeded(f"the deadline {task.deadline.isoformat()} passed")
                return ("failed", (late, None, False))
            if not str(exc):
                exc = TimeoutError(f"the attempt took longer than its timeout of {task.timeout}s")
            return ("failed", (exc, None, True))
        except LeaseLost as exc:
            return ("lost", exc)
        except Retry as exc:
            return ("failed", (exc, exc.delay, True))
        except TaskCancelled as exc:
            if exc.task_id == task.id:  # a workflow told that its cancel was asked for
                return ("cancelled", None)
            return ("failed", (exc, None, True))
        except (NonRetryable, NonDeterminismError, PayloadError, DeadlineExceeded) as exc:
            return ("failed", (exc, None, False))
        except Exception as exc:
            return ("failed", (exc, None, True))
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the daemon stopped the attempt (Runner.run says why)
            # Raised by the task's own code (or a future it awaited was cancelled): an
            # ordinary failure, which must not pass for the daemon's stop.
            return ("failed", (exc, None, True))
        except BaseException as exc:
            # SystemExit, KeyboardInterrupt or any BaseException the task's code raises:
            # the attempt fails like any other, and the daemon and its other tasks go on.
            return ("failed", (exc, None, True))

    async def _finish(
        self,
        task: Claimed,
        definition: Definition[Any, Any] | None,
        outcome: tuple[str, Any],
        elapsed: float,
    ) -> None:
        kind, value = outcome
        series = self.metrics.task(task.queue, task.name)
        series.observe(elapsed)
        if kind == "completed":
            # Group-committed; the daemon's flush logs the outcome. Not awaited: the
            # attempt ends now, and the lease covers the task until the ack commits.
            self.completions.submit_nowait(Completion(task, value, elapsed))
            return
        fields = {"task_id": task.id, "name": task.name, "queue": task.queue}
        if kind == "suspended":
            s: Suspend = value
            status = await written(
                lambda: self.store.suspend(
                    task.id, task.token, task.branch, s.waiting_on, s.wake_at, s.event
                ),
                **fields,
            )
            if status not in ("waiting", "queued"):
                # Not suspended by this attempt: what this daemon kept of it is stale.
                self.workflows.discard(task.id, task.token)
            if status is None:
                log.warning("task_write_rejected", **fields, write="suspend")
                return
            if status == "cancelled":  # a cancel arrived as the attempt was ending
                series.cancelled += 1
                log.info("task_cancelled", **fields)
                return
            wake = min((w for w in (s.wake_at, task.deadline) if w is not None), default=None)
            if wake is not None and status == "waiting":
                self.on_timer(wake)  # durable.suspend wakes it at the deadline too
            log.info(
                "task_suspended",
                **fields,
                status=status,
                waiting_on=len(s.waiting_on) if s.waiting_on else 0,
                wake_at=s.wake_at.isoformat() if s.wake_at else None,
                waiting_event=s.event,
            )
        elif kind == "continued":
            c: ContinueAsNew = value
            next_id = await written(
                lambda: self.store.continue_as_new(task.id, task.token, c.args_json, c.kwargs_json),
                **fields,
            )
            if next_id is None:
                log.warning("task_write_rejected", **fields, write="continue_as_new")
            elif next_id == 0:
                series.cancelled += 1
                log.info("task_cancelled", **fields)
            else:
                series.completed += 1
                log.info("workflow_continued", **fields, next_id=next_id)
        elif kind == "cancelled":
            if await written(lambda: self.store.mark_cancelled(task.id, task.token), **fields):
                series.cancelled += 1
                log.info("task_cancelled", **fields)
            else:
                log.warning("task_write_rejected", **fields, write="cancel")
        elif kind == "lost":
            log.warning("task_abandoned", **fields, reason=str(value))
        else:
            exc, delay, retryable = value
            policy = definition.retry if definition is not None else None
            decision = after_failure(
                task.attempt,
                task.max_attempts,
                policy or _default_policy(),
                retryable=retryable,
                requested_delay=delay,
            )
            error = error_text(exc)
            err = describe_error(exc)
            if decision.retry:
                delay = decision.delay
                ok = await written(
                    lambda: self.store.retry_later(task.id, task.token, delay, error), **fields
                )
                if ok:
                    series.retried += 1
                    log.warning(
                        "task_retrying", **fields, attempt=task.attempt,
                        delay=round(decision.delay, 3), error=err,
                    )
            elif isinstance(exc, DeadlineExceeded):
                ok = await written(
                    lambda: self.store.fail_deadline(task.id, task.token, error), **fields
                )
                if ok:
                    series.failed += 1
                    log.error("task_deadline_exceeded", **fields, attempt=task.attempt, error=err)
            else:
                ok = await written(lambda: self.store.fail(task.id, task.token, error), **fields)
                if ok:
                    series.failed += 1
                    log.error("task_failed", **fields, attempt=task.attempt, error=err)
            if not ok:
                log.warning("task_write_rejected", **fields, write="fail")


async def written(write: Callable[[], Awaitable[T]], **fields: Any) -> T:
    """``await write()``, tried again after errors a later try can get past."""
    for i, pause in enumerate(WRITE_RETRIES):
        try:
            return await write()
        except Exception as exc:
            if is_fatal(exc):
                raise
            if i == 0:
                log.warning("outcome_write_retrying", **fields, error=describe_error(exc))
        await asyncio.sleep(pause)
    return await write()  # the last try: what it raises ends the attempt's outcome


def _default_policy() -> Any:
    from durable.retry import DEFAULT_POLICY

    return DEFAULT_POLICY


def _call(definition: Definition[Any, Any], task: Claimed, *args: Any, **kwargs: Any) -> Any:
    """``definition.fn(*args, **kwargs)``; arguments that cannot bind to its signature (a
    row written by hand, or by an older version of the code) fail the task at once."""
    try:
        return definition.fn(*args, **kwargs)
    except TypeError as exc:
        try:
            signature = inspect.signature(definition.fn)
            signature.bind(*args, **kwargs)
        except TypeError:
            bare = signature.replace(
                parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                return_annotation=signature.empty,
            )
            raise NonRetryable(
                f"the arguments of task {task.id} do not fit {task.name}{bare}: {exc}"
            ) from None
        except ValueError:  # no signature to check against
            pass
        raise


def _arguments(task: Claimed) -> tuple[list[Any], dict[str, Any]]:
    try:
        args, kwargs = loads(task.args), loads(task.kwargs)
    except ValueError as exc:
        raise NonRetryable(f"the task's arguments are not valid JSON: {exc}") from None
    if not isinstance(args, list):
        raise NonRetryable(f"the task's args must be a JSON array, not {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise NonRetryable(f"the task's kwargs must be a JSON object, not {type(kwargs).__name__}")
    return args, kwargs


class _Untimed:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_untimed = _Untimed()

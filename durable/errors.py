"""The errors a user of durable catches or raises."""

from __future__ import annotations


class DurableError(Exception):
    """Something went wrong in durable."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(DurableError):
    """The configuration or the registered code is invalid."""


class UnknownDefinition(DurableError):
    """No daemon has ever published a definition of this name (see durable.catalog)."""


class TaskFailed(DurableError):
    """A task failed; carries the remote error's type, message and traceback."""

    def __init__(
        self,
        task_id: int,
        type: str,
        message: str,
        traceback: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.type = type
        self.message = message
        self.traceback = traceback
        super().__init__(f"task {task_id} failed: {type}: {message}")

    def __reduce__(self) -> tuple[object, ...]:
        return (TaskFailed, (self.task_id, self.type, self.message, self.traceback))


class TaskCancelled(DurableError):
    """The task was cancelled."""

    def __init__(self, task_id: int | None = None) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} was cancelled" if task_id else None)


class ReplayAbort(BaseException):
    """Ends a workflow's attempt whatever the workflow catches.

    A BaseException, like ``asyncio.CancelledError``: neither ``except Exception`` nor
    ``except DurableError`` in a workflow swallows it. Once raised, every later durable
    call of the attempt raises it again, and so does returning from the workflow.
    """

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip().splitlines()[0])


class NonDeterminismError(ReplayAbort):
    """The workflow's code no longer matches its event log."""


class EventTimeout(DurableError, TimeoutError):
    """No event arrived before the timeout."""


class DeadlineExceeded(DurableError):
    """The task's deadline passed before it finished (it is not retried)."""


class NonRetryable(DurableError):
    """Raise it in a task to fail at once, without further attempts."""


class Retry(DurableError):
    """Raise it in a task to run it again after `delay` seconds (it counts as an attempt)."""

    def __init__(self, delay: float = 0.0, message: str | None = None) -> None:
        if delay < 0:
            raise ValueError("Retry delay must be >= 0")
        self.delay = float(delay)
        super().__init__(message or f"retry requested in {self.delay:g}s")


class LeaseLost(ReplayAbort):
    """This worker's claim on the task was taken over; the attempt is abandoned."""


class PayloadError(DurableError, ValueError):
    """Arguments or results must be JSON: this value is not."""

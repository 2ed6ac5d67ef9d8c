"""durable: durable execution for Python asyncio that lives entirely in Postgres."""

from durable.client import Client, Handle
from durable.connection import connect
from durable.context import Context
from durable.errors import (
    ConfigurationError,
    DeadlineExceeded,
    DurableError,
    EventTimeout,
    NonDeterminismError,
    NonRetryable,
    PayloadError,
    Retry,
    TaskCancelled,
    TaskFailed,
    UnknownDefinition,
)
from durable.models import CancelResult
from durable.registry import Definition, task, workflow
from durable.retry import RetryPolicy
from durable.service import Service, serve
from durable.taskcontext import TaskContext, current
from durable.version import __version__ as __version__

__all__ = [
    "CancelResult",
    "Client",
    "ConfigurationError",
    "Context",
    "DeadlineExceeded",
    "Definition",
    "DurableError",
    "EventTimeout",
    "Handle",
    "NonDeterminismError",
    "NonRetryable",
    "PayloadError",
    "Retry",
    "RetryPolicy",
    "Service",
    "TaskCancelled",
    "TaskContext",
    "TaskFailed",
    "UnknownDefinition",
    "connect",
    "current",
    "serve",
    "task",
    "workflow",
]

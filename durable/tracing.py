"""OpenTelemetry spans for task attempts and workflow steps, when the application has them.

durable never imports OpenTelemetry itself: tracing is on only when the process has
already imported it and set a real ``TracerProvider`` (``trace.set_tracer_provider(...)``
in the application, or ``opentelemetry-instrument durable run``), or after
:func:`configure`. Otherwise every function here is a no-op and nothing is stored.

What is traced:

- ``client.start`` stores the caller's trace context (W3C ``traceparent``, through the
  global propagator) in ``durable.tasks.trace_context``;
- every attempt (every run of a workflow, between suspensions) is a span
  ``durable.task NAME`` / ``durable.workflow NAME``, a child of that stored context;
- every ``ctx.step`` / ``ctx.transaction`` that runs (not a replayed one) is a span
  ``durable.step NAME`` under its workflow's span;
- a child started by a workflow stores the context of the workflow's span, so its
  attempts join the same trace (and inherits the parent's stored context when the
  parent's daemon does not trace).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from durable.models import Claimed

__all__ = ["attempt_span", "configure", "inject", "record_outcome", "step_span", "tracer"]

_configured: TracerProvider | None = None
_cache: tuple[TracerProvider, Tracer] | None = None
_NULL: AbstractContextManager[None] = nullcontext()


def configure(tracer_provider: TracerProvider | None) -> None:
    """Trace with ``tracer_provider`` instead of OpenTelemetry's global provider;
    None goes back to the global one (the default)."""
    global _configured, _cache
    _configured = tracer_provider
    _cache = None


def tracer() -> Tracer | None:
    """durable's tracer, or None when OpenTelemetry is not imported or not configured."""
    global _cache
    provider: TracerProvider | None = _configured
    if provider is None:
        api = sys.modules.get("opentelemetry.trace")
        if api is None:
            return None  # the application does not use OpenTelemetry: import nothing
        provider = api.get_tracer_provider()
        if isinstance(provider, api.ProxyTracerProvider | api.NoOpTracerProvider):
            return None  # imported, but no provider set: spans would go nowhere
    if _cache is not None and _cache[0] is provider:
        return _cache[1]
    from durable.version import __version__

    t = provider.get_tracer("durable", __version__)
    _cache = (provider, t)
    return t


def inject() -> str | None:
    """The current trace context as a JSON object (``{"traceparent": ...}``), or None."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return json.dumps(carrier, sort_keys=True) if carrier else None


def attempt_span(task: Claimed) -> AbstractContextManager[Span | None]:
    """A span, current while the attempt's code runs, under the task's stored context."""
    t = tracer()
    if t is None:
        return _NULL
    return _attempt_span(t, task)


@contextmanager
def _attempt_span(t: Tracer, task: Claimed) -> Iterator[Span]:
    from opentelemetry import propagate, trace

    parent = None
    if task.trace_context:
        try:
            carrier = json.loads(task.trace_context)
        except ValueError:
            carrier = None
        if isinstance(carrier, dict):
            parent = propagate.extract({str(k): str(v) for k, v in carrier.items()})
    attributes: dict[str, Any] = {
        "durable.task.id": task.id,
        "durable.task.name": task.name,
        "durable.task.kind": task.kind,
        "durable.queue": task.queue,
        "durable.attempt": task.attempt,
        "durable.branch": task.branch,
    }
    if task.parent_id is not None:
        attributes["durable.parent.id"] = task.parent_id
    span = t.start_span(
        f"durable.{task.kind} {task.name}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
    )
    # Exceptions are the attempt's outcome, recorded by record_outcome; a cancellation
    # reaching here is a shutdown or a lost lease, not an error of the task's code.
    with trace.use_span(span, end_on_exit=True, record_exception=False,
                        set_status_on_exception=False):
        yield span


def record_outcome(span: Span | None, outcome: tuple[str, Any]) -> None:
    """Mark the attempt span with how the attempt ended (runner outcomes)."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    kind, value = outcome
    span.set_attribute("durable.outcome", kind)
    if kind == "failed":
        exc, _delay, retryable = value
        span.set_attribute("durable.retryable", bool(retryable))
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    elif kind == "lost":
        span.set_status(Status(StatusCode.ERROR, str(value)))


def step_span(name: str, seq: int, kind: str) -> AbstractContextManager[Span | None]:
    """A span around one workflow step that runs; its exception marks it failed."""
    t = tracer()
    if t is None:
        return _NULL
    return t.start_as_current_span(
        f"durable.step {name}",
        attributes={"durable.step.name": name, "durable.step.seq": seq, "durable.step.kind": kind},
    )

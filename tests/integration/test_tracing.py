"""OpenTelemetry: one trace from the caller's span through a workflow, its steps and a child."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import durable
from durable import tracing
from tests.support.helpers import fetchval, running_daemon

QUEUE = "traced"


@durable.task(queue=QUEUE)
async def traced_child(n: int) -> int:
    return n * 2


@durable.workflow(queue=QUEUE)
async def traced_workflow(ctx: durable.Context, n: int) -> int:
    first = await ctx.step("add_one", lambda: n + 1)
    return int(await ctx.run(traced_child, first))


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    # durable's own provider, not OpenTelemetry's global one: the rest of the suite stays
    # untraced whatever order the tests run in.
    provider = TracerProvider()
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.configure(provider)
    try:
        yield provider, spans
    finally:
        tracing.configure(None)
        provider.shutdown()


def hexid(n: int, width: int) -> str:
    return format(n, f"0{width}x")


async def stored_context(dsn: str, task_id: int) -> dict[str, str]:
    text = await fetchval(
        dsn, "select trace_context::text from durable.tasks where id = $1", task_id
    )
    return dict(json.loads(text))


async def test_a_workflow_and_its_child_join_the_callers_trace(
    dsn: str, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, spans = exporter
    async with durable.connect(dsn) as client:
        with provider.get_tracer("caller").start_as_current_span("checkout") as caller:
            handle = await client.start(traced_workflow, 20)
        async with running_daemon(dsn, queues=QUEUE):
            assert await handle.result(timeout=20) == 42
    caller_ctx = caller.get_span_context()
    trace_id = caller_ctx.trace_id

    # The caller's context is stored with the task; the child stores its parent's span.
    stored = await stored_context(dsn, handle.id)
    assert stored["traceparent"].split("-")[1:3] == [
        hexid(trace_id, 32), hexid(caller_ctx.span_id, 16)
    ]
    child_id = await fetchval(dsn, "select id from durable.tasks where parent_id = $1", handle.id)
    child_stored = await stored_context(dsn, child_id)
    assert child_stored["traceparent"].split("-")[1] == hexid(trace_id, 32)

    finished: list[ReadableSpan] = [s for s in spans.get_finished_spans() if s.name != "checkout"]
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in finished:
        by_name.setdefault(s.name, []).append(s)
    assert set(by_name) == {
        "durable.workflow traced_workflow", "durable.step add_one", "durable.task traced_child"
    }
    assert all(s.context is not None and s.context.trace_id == trace_id for s in finished)

    # Two runs of the workflow (before and after the child), each directly under the caller.
    runs = by_name["durable.workflow traced_workflow"]
    assert len(runs) == 2
    for run in runs:
        assert run.parent is not None and run.parent.span_id == caller_ctx.span_id
        assert run.kind == trace.SpanKind.CONSUMER
        assert run.attributes is not None
        assert run.attributes["durable.task.id"] == handle.id
        assert run.attributes["durable.queue"] == QUEUE
        assert run.attributes["durable.attempt"] == 1
    outcomes = sorted(str((r.attributes or {})["durable.outcome"]) for r in runs)
    assert outcomes == ["completed", "suspended"]
    first_run = next(r for r in runs if (r.attributes or {})["durable.outcome"] == "suspended")
    assert first_run.context is not None

    # The step ran once (replayed the second time) and sits under the first run.
    [step] = by_name["durable.step add_one"]
    assert step.parent is not None and step.parent.span_id == first_run.context.span_id
    assert step.attributes is not None
    assert step.attributes["durable.step.seq"] == 0
    assert step.attributes["durable.step.kind"] == "step"

    # The child's attempt is a child of the run that started it.
    [child] = by_name["durable.task traced_child"]
    assert child.parent is not None and child.parent.span_id == first_run.context.span_id
    assert child.attributes is not None
    assert child.attributes["durable.task.id"] == child_id
    assert child.attributes["durable.parent.id"] == handle.id


@durable.task(queue=QUEUE, max_attempts=1)
async def traced_failure() -> None:
    raise ValueError("card declined")


async def test_a_failed_attempt_span_records_the_error(
    dsn: str, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, spans = exporter
    async with durable.connect(dsn) as client:
        with provider.get_tracer("caller").start_as_current_span("caller"):
            handle = await client.start(traced_failure)
        async with running_daemon(dsn, queues=QUEUE):
            with pytest.raises(durable.TaskFailed):
                await handle.result(timeout=20)
    [span] = [s for s in spans.get_finished_spans() if s.name == "durable.task traced_failure"]
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.status.description == "ValueError: card declined"
    assert [e.name for e in span.events] == ["exception"]


async def test_untraced_callers_store_no_context(dsn: str) -> None:
    # OpenTelemetry is imported here, but no provider is set and no span is current.
    assert tracing.tracer() is None
    async with durable.connect(dsn) as client:
        handle = await client.start(traced_child, 1)
        [other] = await client.start_many(traced_child, [[2]])
    rows = await fetchval(
        dsn, "select count(*) from durable.tasks where id = any($1) and trace_context is null",
        [handle.id, other.id],
    )
    assert rows == 2

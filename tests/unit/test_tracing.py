"""Tracing is off, and OpenTelemetry never imported, unless the application set it up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.support.helpers import ROOT


def python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_durable_imports_nothing_from_opentelemetry() -> None:
    out = python(
        """
        import sys
        import durable, durable.cli, durable.daemon, durable.runner, durable.tracing
        from durable import tracing
        from durable.models import Claimed
        task = Claimed(
            id=1, queue="q", name="n", kind="task", args="[]", kwargs="{}", attempt=1,
            max_attempts=3, timeout=None, token=7, branch=0, parent_id=None, root_id=None,
            cancel_requested=False,
            trace_context='{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}',
        )
        with tracing.attempt_span(task) as span:
            assert span is None
        with tracing.step_span("s", 0, "step") as step:
            assert step is None
        assert tracing.inject() is None and tracing.tracer() is None
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    assert out == "[]"


def test_tracing_follows_the_global_provider() -> None:
    out = python(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from durable import tracing

        assert tracing.tracer() is None, "imported but not configured: no spans"
        assert tracing.inject() is None, "no current span: nothing to carry"
        trace.set_tracer_provider(TracerProvider())
        assert tracing.tracer() is not None
        with trace.get_tracer("app").start_as_current_span("caller") as span:
            context = span.get_span_context()
            print(f"{context.trace_id:032x}-{context.span_id:016x}")
            print(tracing.inject())
        """
    )
    ids, carried = out.splitlines()
    assert json.loads(carried)["traceparent"].startswith(f"00-{ids}-")

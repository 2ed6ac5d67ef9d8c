"""Workflows that fan out into many children, for tests/faults/test_fan_out.py, run by
subprocess daemons (``durable run --app tests.apps.fan_out_app``) and in-process ones:
those of ``durable.tools.fan_out`` (which measures them), gates, and a gather of large
arguments and results.

The parents serve on ``QUEUE`` and the children on ``KIDS``: a daemon serving only
``QUEUE`` starts the children and leaves them queued, for a later daemon to run.
"""

from __future__ import annotations

import durable
from durable.tools.fan_out import KIDS, QUEUE, each, gather, leaf, seq, spawn

__all__ = ["GATE", "KIDS", "QUEUE", "each", "echo", "echoes", "finish_gate", "gather", "leaf",
           "seq", "spawn", "spawn_gate"]  # fmt: skip

GATE = 7301
"""The advisory lock the gates below wait for (the test holds it)."""


def spawn_gate(at: int) -> str:
    """A trigger that holds the insert of child ``leaf(at)`` until the test lets go."""
    return _gate("insert", f"new.name = '{leaf.name}' and new.args = '[{at}]'::jsonb")


def finish_gate(at: int) -> str:
    """A trigger that holds the completion of child ``leaf(at)`` (and of the children
    written in the same statement) until the test lets go."""
    return _gate(
        "update",
        f"new.name = '{leaf.name}' and new.args = '[{at}]'::jsonb"
        " and old.status::text = 'running' and new.status::text <> 'running'",
    )


def _gate(event: str, when: str) -> str:
    return f"""
create function public.fo_gate() returns trigger language plpgsql as $$
begin
    perform pg_advisory_xact_lock_shared({GATE});
    return new;
end $$;
create trigger fo_gate before {event} on durable.tasks for each row
    when ({when}) execute function public.fo_gate();
"""


@durable.task(name="fo_echo", queue=KIDS)
async def echo(text: str) -> str:
    return text


@durable.workflow(name="fo_echoes", queue=QUEUE, max_attempts=1)
async def echoes(ctx: durable.Context, n: int, size: int, last: int = 0) -> list[str]:
    """A gather of ``n`` children whose arguments and results are ``size`` characters
    long (the last one's ``last``, if given); the number each result starts with."""
    texts = [f"{i}:".ljust(last if last and i == n - 1 else size, "x") for i in range(n)]
    results = await ctx.gather(*(ctx.run(echo, t) for t in texts))
    return [r.partition(":")[0] for r in results]

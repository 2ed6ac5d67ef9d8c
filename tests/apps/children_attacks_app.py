"""A workflow and its children for tests/faults/test_children_attacks_3.py, run by
subprocess daemons (``durable run --app tests.apps.children_attacks_app``).

The parent serves on ``QUEUE`` and its children on ``KIDS``: a daemon serving only
``QUEUE`` starts the children and leaves them queued, for a later daemon to run.
"""

from __future__ import annotations

import durable

QUEUE = "ca3_parents"
KIDS = "ca3_kids"
SUSPEND_GATE = 731
"""In the update that suspends ``ca3k_parent`` (the test's trigger waits on it)."""

GATE_SQL = f"""
create function public.ca3_suspend_gate() returns trigger language plpgsql as $$
begin
    perform pg_advisory_xact_lock_shared({SUSPEND_GATE});
    return new;
end $$;
create trigger ca3_suspend_gate before update on durable.tasks for each row
    when (old.status::text = 'running' and new.status::text = 'waiting'
          and new.name = 'ca3k_parent')
    execute function public.ca3_suspend_gate();
"""


@durable.task(name="ca3k_double", queue=KIDS)
async def double(x: int) -> int:
    return 2 * x


@durable.workflow(name="ca3k_parent", queue=QUEUE, max_attempts=3)
async def parent(ctx: durable.Context, n: int) -> list[int]:
    return await ctx.gather(*(ctx.run(double, i) for i in range(n)))

"""Cron schedules: start each tick's task exactly once, however many daemons run."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from durable.codec import loads
from durable.cron import parse
from durable.errors import DurableError
from durable.logs import get_logger
from durable.models import DueSchedule, NewTask
from durable.registry import Definition, Registry
from durable.store import Store, is_fatal, is_transient

log = get_logger("durable.scheduler")


async def declare_schedules(store: Store, registry: Registry, now: datetime) -> None:
    """Record the schedules declared in code (``schedule=`` on a definition).

    Every daemon does this at startup; a schedule keeps its next run unless its cron
    expression or time zone changed. A definition that declares no schedule removes the
    one it declared before (``schedule=`` taken out of the code). A schedule added from
    the command line under a declared name is kept (`durable schedules remove` gives the
    name back to the code at the next start).
    """
    for d in registry.definitions():
        if d.schedule is None:
            continue
        cron = parse(d.schedule, d.timezone)
        if not await store.upsert_schedule(
            d.name, d.name, d.schedule, d.timezone, "[]", "{}", d.queue, "code",
            cron.next_after(now),
        ):
            log.warning("schedule_overridden", schedule=d.name,
                        note="added from the command line, kept instead of the code's")
    unscheduled = [d.name for d in registry.definitions() if d.schedule is None]
    if unscheduled:
        for name in await store.forget_code_schedules(unscheduled):
            log.info("schedule_removed", schedule=name, note="no longer declared in code")


async def run_schedules(
    store: Store, registry: Registry, now: datetime, skipped: dict[str, Any] | None = None
) -> datetime | None:
    """Start every schedule whose tick has come; returns when the next one is due.

    Ticks missed while no daemon ran are not all replayed: the latest one runs once.
    Several daemons may run this at once; a compare-and-set on the schedule's next run
    lets exactly one of them start each tick, and the tick is in the task's idempotency key.

    A schedule whose row cannot be used (an unknown time zone, a cron that does not
    parse, a queue name the tasks table refuses: written by hand or by older code) is
    logged once and left out, in ``skipped``, until its row changes; the others run.
    """
    skipped = {} if skipped is None else skipped
    for row in await store.due_schedules(now):
        name = row.name
        shape = row
        if skipped.get(name) == shape:
            continue
        skipped.pop(name, None)
        try:
            await _fire(store, registry, now, row)
        except Exception as exc:
            if not isinstance(exc, DurableError) and (is_transient(exc) or is_fatal(exc)):
                raise
            skipped[name] = shape
            log.error("schedule_skipped", schedule=name, error=f"{type(exc).__name__}: {exc}",
                      note="left out until its row changes")
    return await store.next_schedule(list(skipped))


async def _fire(store: Store, registry: Registry, now: datetime, row: DueSchedule) -> None:
    """Start the tick of one due schedule (unless another daemon did)."""
    cron = parse(row.cron, row.timezone)
    expected = row.next_run_at
    tick = cron.latest_at_or_before(now, expected - timedelta(microseconds=1)) or expected
    name = row.task_name
    d = registry.get(name)
    if d is None:
        # A task this daemon has no code for: the catalog knows its queue, kind and
        # defaults (another service's daemons run it); a name nobody published starts
        # with the defaults, on the schedule's queue if it has one.
        entry = await store.resolve_definition(name)
        d = entry.definition() if entry is not None else Definition.elsewhere(name)
    args, kwargs = loads(row.args), loads(row.kwargs)
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise DurableError(f"schedule {row.name!r}: args must be a JSON array and kwargs "
                           "a JSON object")
    task = NewTask.from_definition(d, args, kwargs)
    if row.queue:
        task = task._replace(queue=row.queue)
    task_id = await store.fire_schedule(row.name, expected, cron.next_after(now), tick, task)
    if task_id is not None:
        log.info("schedule_fired", schedule=row.name, tick=tick.isoformat(), task_id=task_id)

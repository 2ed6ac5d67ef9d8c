"""How far a page of the dashboard's task list reads: pure decisions of durable.admin."""

from __future__ import annotations

from datetime import UTC, datetime

from durable.admin import narrowed, stretch_floor
from durable.models import TaskFilter


def test_only_filters_that_can_skip_rows_are_bounded() -> None:
    assert not narrowed(TaskFilter())
    assert not narrowed(TaskFilter(task_id=7, name="x"))
    assert not narrowed(TaskFilter(idempotency_key="k", statuses=("failed",)))
    for f in (
        TaskFilter(statuses=("failed",)),
        TaskFilter(queue="q"),
        TaskFilter(name="n"),
        TaskFilter(since=datetime(2100, 1, 1, tzinfo=UTC)),
        TaskFilter(tags=("vip",)),
        TaskFilter(attributes={"a": 1}),
    ):
        assert narrowed(f), f


def test_the_stretch_ends_at_id_one_and_is_absent_when_not_bounded() -> None:
    name = TaskFilter(name="n")
    assert stretch_floor(name, 1000, 100) == 900
    assert stretch_floor(name, 50, 100) == 1
    assert stretch_floor(name, None, 100) is None  # an empty table
    assert stretch_floor(TaskFilter(), 1000, 100) is None
    assert stretch_floor(TaskFilter(task_id=3), 1000, 100) is None

"""The dashboard's pure parts: the task list's filter, the timeline, the charts, sessions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from durable.models import Finished, HistoryEntry, TaskFilter
from durable.ui import views
from durable.ui.auth import Auth

NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


def test_filter_reads_every_field() -> None:
    f, before = views.task_filter(
        {"status": "failed,cancelled", "queue": "q", "name": "n", "since": "1h",
         "until": "2026-01-31T11:30", "key": "k", "id": "7", "tag": "vip, eu",
         "attr": "region=eu tries:=3", "before": "100", "empty": " "},
        NOW,
    )  # fmt: skip
    assert f.statuses == ("failed", "cancelled") and f.queue == "q" and f.name == "n"
    assert f.since == NOW - timedelta(hours=1)
    assert f.until == datetime(2026, 1, 31, 11, 30, tzinfo=UTC)
    assert f.idempotency_key == "k" and f.task_id == 7 and before == 100
    assert f.tags == ("eu", "vip") and f.attributes == {"region": "eu", "tries": 3}
    assert views.task_filter({}, NOW)[0] == TaskFilter()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"status": "done"}, "status: expected some of queued"),
        ({"since": "yesterday"}, "since: expected a duration ago"),
        ({"id": "0"}, "id: expected a task id"),
        ({"id": "1" * 19}, "id: expected a task id"),
        ({"before": "-1"}, "before: expected a task id"),
        ({"attr": "region"}, "attr: expected name=value"),
        ({"tag": "x" * 101}, "a tag must be a string of 1 to 100"),
        ({"queue": "q" * 2001}, "queue: at most 2000 characters"),
    ],
)
def test_filter_errors_name_the_field(params: dict[str, str], message: str) -> None:
    with pytest.raises(views.FilterError) as caught:
        views.task_filter(params, NOW)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def entry(seq: int, kind: str, status: str, start: float, end: float | None, **kw: object) -> HistoryEntry:
    return HistoryEntry(
        seq=seq, kind=kind, name=f"e{seq}", status=status, result=None, error=None,
        child_id=kw.get("child_id"), child_status=kw.get("child_status"),  # type: ignore[arg-type]
        wake_at=kw.get("wake_at"), attempt=1, started_at=NOW + timedelta(seconds=start),  # type: ignore[arg-type]
        finished_at=NOW + timedelta(seconds=end) if end is not None else None,
    )  # fmt: skip


def test_timeline_places_bars_on_the_axis() -> None:
    history = [
        entry(0, "step", "completed", 0, 2),
        entry(1, "step", "failed", 2, 2),
        entry(2, "child", "completed", 4, 8, child_id=9, child_status="cancelled"),
        entry(3, "sleep", "pending", 8, None, wake_at=NOW + timedelta(seconds=20)),
    ]
    bars, ticks = views.timeline(history, NOW, None, NOW + timedelta(seconds=10))
    # The axis runs to the pending sleep's wake time, 20 s.
    assert [round(b.x, 3) for b in bars] == [0.0, 0.1, 0.2, 0.4]
    assert round(bars[0].width, 3) == 0.1 and bars[1].width == views.MIN_WIDTH
    assert round(bars[3].width, 3) == 0.6
    assert [b.outcome for b in bars] == ["ok", "failed", "cancelled", "pending"]
    assert bars[2].child_id == 9
    assert [t.label for t in ticks] == ["+0ms", "+5.0s", "+10.0s", "+15.0s", "+20.0s"]
    assert all(0 <= b.x <= 1 and b.x + b.width <= 1 + 1e-9 for b in bars)


def test_timeline_of_a_finished_task_ends_at_its_finish() -> None:
    bars, _ = views.timeline([entry(0, "step", "completed", 0, 1)], NOW, NOW + timedelta(seconds=4), NOW + timedelta(days=1))
    assert round(bars[0].width, 3) == 0.25
    assert views.timeline([], NOW, NOW, NOW)[0] == []


def test_charts_scale_to_the_busiest_bucket() -> None:
    charts = views.charts([
        Finished("q", "completed", 0, 10), Finished("q", "completed", 11, 5),
        Finished("q", "failed", 0, 2), Finished("q", "running", 0, 99),
        Finished("q", "completed", 12, 99),
    ])  # fmt: skip
    chart = charts["q"]
    assert chart.total_completed == 15 and chart.total_failed == 2
    assert chart.completed[-1].height == 1.0 and chart.completed[0].height == 0.5
    assert chart.failed[-1].count == 2 and len(chart.completed) == views.BUCKETS


def test_durations_and_cuts() -> None:
    assert [views.duration_text(s) for s in (0.25, 4.2, 200, 7500, 90000, float("nan"), -1)] == [
        "250ms", "4.2s", "3m 20s", "2h 5m", "1d 1h", "-", "0ms"]  # fmt: skip
    assert views.cut("abc", 2) == ("ab", True) and views.cut("ab", 2) == ("ab", False)


def test_sessions_are_signed_and_expire() -> None:
    auth = Auth("a-long-secret", "token", b"k" * 32)
    cookie = auth.new_session(now=1000.0)
    sid = auth.session(cookie, now=1001.0)
    assert sid is not None
    assert auth.session(cookie, now=1000.0 + 13 * 3600) is None  # expired
    forged = cookie.rsplit(".", 1)[0] + "." + "0" * 64
    assert auth.session(forged, now=1001.0) is None
    other = Auth("a-long-secret", "token", b"j" * 32)  # a restart draws a new key
    assert other.session(cookie, now=1001.0) is None
    assert auth.check_csrf(sid, auth.csrf(sid)) and not auth.check_csrf(sid, other.csrf(sid))
    assert not auth.check_csrf(sid, None)
    assert auth.check_secret("a-long-secret") and not auth.check_secret("a-long-secreT")


def test_a_secret_file_is_checked(tmp_path: object) -> None:
    from pathlib import Path

    from durable.errors import ConfigurationError

    base = Path(str(tmp_path))
    (base / "short").write_text("short\n")
    with pytest.raises(ConfigurationError, match=r"--token-file: .* must hold a secret of 8"):
        Auth.from_file("--token-file", base / "short", "token")
    with pytest.raises(ConfigurationError, match="--token-file: cannot read"):
        Auth.from_file("--token-file", base / "missing", "token")


def test_templates_and_static_files_ship_in_the_package() -> None:
    from importlib import resources

    root = resources.files("durable.ui")
    for name in ("templates/base.html", "templates/task.html", "static/live.js", "static/dashboard.css"):
        assert root.joinpath(name).is_file(), name

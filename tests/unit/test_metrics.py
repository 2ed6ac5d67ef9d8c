"""Metrics rendering and the DURABLE_HTTP / DURABLE_RETENTION settings, without a database."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from durable.metrics import BUCKETS, Metrics
from durable.settings import Settings, SettingsError, parse_duration


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(m.render().decode())
        for s in family.samples
    }


def test_counters_and_histogram_render_as_prometheus_text() -> None:
    m = Metrics()
    series = m.task("q", "send")
    series.claimed += 3
    series.completed += 2
    series.failed += 1
    for seconds in (0.001, 0.2, 7.0):
        series.observe(seconds)
    m.leases_reclaimed = 4
    out = samples(m)
    labels = {("queue", "q"), ("name", "send")}
    assert out[("durable_tasks_claimed_total", frozenset(labels))] == 3
    assert out[("durable_tasks_completed_total", frozenset(labels))] == 2
    assert out[("durable_tasks_failed_total", frozenset(labels))] == 1
    assert out[("durable_tasks_retried_total", frozenset(labels))] == 0

    def bucket(le: str) -> float:
        return out[("durable_attempt_duration_seconds_bucket", frozenset(labels | {("le", le)}))]

    assert bucket("0.005") == 1
    assert bucket("0.25") == 2
    assert bucket("5.0") == 2
    assert bucket("10.0") == 3
    assert bucket("+Inf") == 3
    assert out[("durable_attempt_duration_seconds_count", frozenset(labels))] == 3
    assert out[("durable_attempt_duration_seconds_sum", frozenset(labels))] == pytest.approx(7.201)
    assert out[("durable_leases_reclaimed_total", frozenset())] == 4
    assert out[("durable_listener_connected", frozenset())] == 0
    # No depth reading yet: no depth gauges rather than made-up zeros.
    assert not any(name.startswith("durable_queue_") for name, _ in out)


def test_a_duration_on_a_bound_falls_in_that_bucket() -> None:
    m = Metrics()
    s = m.task("q", "n")
    s.observe(1.0)
    s.observe(math.inf)
    assert s.buckets[BUCKETS.index(1.0)] == 1 and s.buckets[-1] == 1


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.task("q", "n").claimed += 1
    assert b"durable_tasks_claimed_total{" not in b.render()
    assert b'durable_tasks_claimed_total{name="n",queue="q"} 1.0' in a.render()


def test_series_are_cached_per_queue_and_name() -> None:
    m = Metrics()
    assert m.task("q", "n") is m.task("q", "n")
    assert m.task("q", "n") is not m.task("q", "m")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        (":9090", ("", 9090)),
        ("localhost:80", ("localhost", 80)),
        ("[::1]:9090", ("::1", 9090)),
        (" metrics.internal:9100 ", ("metrics.internal", 9100)),
    ],
)
def test_http_setting(text: str, expected: tuple[str, int]) -> None:
    assert Settings.from_env({"DURABLE_HTTP": text}).http == expected


@pytest.mark.parametrize(
    "text", ["9090", "host", "host:", "host:port", "host:65536", "a b:80", "host:-1",
             "[::1:80", "host:9090/metrics", "host:+80"],
)  # fmt: skip
def test_http_setting_rejects(text: str) -> None:
    with pytest.raises(SettingsError, match=r"^DURABLE_HTTP: expected host:port"):
        Settings.from_env({"DURABLE_HTTP": text})


def test_http_flag_is_named() -> None:
    with pytest.raises(SettingsError, match=r"^--http: "):
        Settings.from_env({}, http="nope")
    assert Settings.from_env({}).http is None


def test_retention_setting() -> None:
    assert Settings.from_env({}).retention is None
    assert Settings.from_env({"DURABLE_RETENTION": "7d"}).retention == 7 * 86400
    assert Settings.from_env({"DURABLE_RETENTION": "90m"}).retention == 5400
    assert Settings.from_env({"DURABLE_RETENTION": "1s"}).retention == 1
    assert Settings.from_env({"DURABLE_RETENTION": "36500d"}).retention == 36500 * 86400
    # Past a century the cutoff is a date neither PostgreSQL nor Python holds: every prune
    # pass would fail.
    for bad in ("0", "forever", "-1d", "7 days", "0.5s", "36501d", "1000000d", "9" * 40 + "d"):
        with pytest.raises(SettingsError, match=r"^DURABLE_RETENTION: expected a duration from 1s"):
            Settings.from_env({"DURABLE_RETENTION": bad})


def test_durations_take_days() -> None:
    assert parse_duration("2d") == 172800
    assert parse_duration("1.5D") == 129600

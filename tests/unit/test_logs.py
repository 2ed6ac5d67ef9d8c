"""durable.logs: JSON lines, console output, levels, and password redaction."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog

from durable import logs
from durable.logs import configure, get_logger, redact

SECRET = "s3cret"


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logs._threshold = 0  # structlog's defaults write every level


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_json_is_one_object_per_line_with_event_level_timestamp() -> None:
    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    log = get_logger("durable.test")
    log.info("task_claimed", task_id="t1", queue="orders")
    log.warning("lease_lost", task_id="t2")

    first, second = json_lines(stream)
    assert first["event"] == "task_claimed"
    assert first["level"] == "info"
    assert first["task_id"] == "t1"
    assert first["queue"] == "orders"
    assert first["logger_name"] == "durable.test"
    assert second["event"] == "lease_lost"
    assert second["level"] == "warning"
    stamp = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)


def test_auto_is_json_off_a_tty_and_console_on_one() -> None:
    piped = io.StringIO()
    configure(fmt="auto", stream=piped)
    get_logger().info("daemon_started", queues=2)
    assert json_lines(piped)[0]["event"] == "daemon_started"

    terminal = TTY()
    configure(fmt="auto", stream=terminal)
    get_logger().info("daemon_started", queues=2)
    line = terminal.getvalue()
    assert line.count("\n") == 1
    assert "daemon_started" in line and "queues=2" in line
    assert not line.lstrip().startswith("{")
    assert "\x1b[" not in line  # colourless


def test_console_format_even_off_a_tty() -> None:
    stream = io.StringIO()
    configure(fmt="console", stream=stream)
    get_logger().info("worker_idle", queue="email")
    text = stream.getvalue()
    assert "worker_idle" in text and "queue=email" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_level_filters_lower_levels() -> None:
    stream = io.StringIO()
    configure(level="warning", fmt="json", stream=stream)
    log = get_logger()
    log.debug("noisy")
    log.info("chatty")
    log.error("broken")
    assert [line["event"] for line in json_lines(stream)] == ["broken"]


def test_enabled_says_which_levels_the_configuration_writes() -> None:
    # Hot paths ask before building an event: the answer must match what is written.
    for level in logs.LEVELS:
        stream = io.StringIO()
        configure(level=level, fmt="json", stream=stream)
        log = get_logger()
        for name in logs.LEVELS:
            getattr(log, name)(name)
        written = [line["event"] for line in json_lines(stream)]
        assert written == [name for name in logs.LEVELS if logs.enabled(name)]
        assert written[0] == level


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure(fmt="json")
    get_logger().info("to_stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["event"] == "to_stderr"


def test_reconfiguring_reaches_loggers_created_earlier() -> None:
    log = get_logger("early")
    first, second = io.StringIO(), io.StringIO()
    configure(fmt="json", stream=first)
    log.info("one")
    configure(fmt="json", stream=second)
    log.info("two")
    assert [line["event"] for line in json_lines(first)] == ["one"]
    assert [line["event"] for line in json_lines(second)] == ["two"]


def test_context_variables_are_merged() -> None:
    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    structlog.contextvars.bind_contextvars(task_id="abc")
    get_logger().info("step_done")
    assert json_lines(stream)[0]["task_id"] == "abc"


@pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml")])
def test_configure_rejects_unknown_level_or_format(level: str, fmt: str) -> None:
    with pytest.raises(ValueError):
        configure(level=level, fmt=fmt, stream=io.StringIO())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"postgresql://u:{SECRET}@h/db", "postgresql://u:***@h/db"),
        (
            f"postgres://u:{SECRET}@h:5432/db?sslmode=require",
            "postgres://u:***@h:5432/db?sslmode=require",
        ),
        (
            f"connect to postgresql://u:{SECRET}@h/db failed",
            "connect to postgresql://u:***@h/db failed",
        ),
        (f"postgresql://:{SECRET}@h/db", "postgresql://:***@h/db"),
        (f"postgresql://u:p@{SECRET}@h/db", "postgresql://u:***@h/db"),
        (f"host=h password={SECRET} user=u", "host=h password=*** user=u"),
        (f"host=h password='{SECRET} x' user=u", "host=h password=*** user=u"),
        (
            f"postgresql://h/db?password={SECRET}&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        (f"PGPASSWORD={SECRET}", "PGPASSWORD=***"),
        (f"{{'password': '{SECRET}'}}", "{'password': ***}"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("password authentication failed for user u", "password authentication failed for user u"),
        ("plain text", "plain text"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_a_logged_dsn_never_emits_its_password() -> None:
    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    log = get_logger()
    dsn = f"postgresql://app:{SECRET}@db:5432/shop"
    log.info("pool_opened", dsn=dsn, password=SECRET, dsn_password=SECRET)
    log.info("kv_dsn", dsn=f"host=db password={SECRET}", nested={"urls": [dsn], "Password": SECRET})
    log.error("connect_failed", error=ConnectionError(f"cannot reach {dsn}"))
    try:
        raise RuntimeError(f"boom at {dsn}")
    except RuntimeError:
        log.exception("crashed")

    output = stream.getvalue()
    assert SECRET not in output
    records = json_lines(stream)
    assert [r["event"] for r in records] == ["pool_opened", "kv_dsn", "connect_failed", "crashed"]
    assert records[0]["dsn"] == "postgresql://app:***@db:5432/shop"
    assert records[0]["password"] == "***"
    assert records[0]["dsn_password"] == "***"
    assert records[1]["nested"] == {
        "urls": ["postgresql://app:***@db:5432/shop"],
        "Password": "***",
    }
    assert "ConnectionError" in records[2]["error"]
    assert "RuntimeError: boom at postgresql://app:***@db" in records[3]["exception"]


def test_console_output_is_redacted_too() -> None:
    stream = TTY()
    configure(fmt="auto", stream=stream)
    log = get_logger()
    try:
        raise RuntimeError(f"boom at postgresql://app:{SECRET}@db/shop")
    except RuntimeError:
        log.exception("crashed", dsn=f"postgresql://app:{SECRET}@db/shop")
    output = stream.getvalue()
    assert "crashed" in output and "RuntimeError" in output
    assert SECRET not in output


def test_objects_without_secrets_are_left_alone() -> None:
    marker = object()
    event_dict: dict[str, Any] = {"event": "x", "thing": marker, "count": 3}
    assert logs.redact_secrets(None, "info", event_dict) == {
        "event": "x",
        "thing": marker,
        "count": 3,
    }


def test_timestamps_are_utc_iso() -> None:
    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    get_logger().info("tick")
    stamp = json_lines(stream)[0]["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", stamp)


def test_library_warnings_become_json_events_with_their_traceback_and_no_secret() -> None:
    import logging

    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    try:
        raise ConnectionRefusedError(f"postgresql://app:{SECRET}@db:5432/x refused")
    except ConnectionRefusedError:
        logging.getLogger("asyncpg.pool").warning("Failed to restore the pool", exc_info=True)
    [record] = json_lines(stream)
    assert record["event"] == "library_log"
    assert record["level"] == "warning"
    assert record["logger_name"] == "asyncpg.pool"
    assert record["message"] == "Failed to restore the pool"
    assert "ConnectionRefusedError" in record["exception"]
    assert SECRET not in stream.getvalue()


class _Shown:
    def __structlog__(self) -> str:
        return "shown"


def test_json_lines_are_what_structlogs_renderer_writes() -> None:
    event_dict: dict[str, Any] = {
        "logger_name": "durable.daemon", "task_id": 7, "seconds": 0.25, "ok": True,
        "none": None, "text": "é\n\"", "items": [1, "two", {"three": 3.0}],
        "thing": object(), "shown": _Shown(), "event": "task_completed", "level": "info",
    }
    expected = structlog.processors.JSONRenderer()(None, "info", dict(event_dict))
    assert logs.render_json(None, "info", dict(event_dict)) == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"nested": {"api_secret": SECRET}},  # no "@" nor "ass" in the line but the key's name
        {"SECRET_TOKEN": SECRET},
        {"conf": {"PASSWD": SECRET}},
        {"pa\u017f\u017fword": SECRET},  # a long s, which a case-blind match takes for "s"
        {"error": ValueError(f"postgresql://u:{SECRET}@db/x")},
        {"deep": [[[[[f"postgresql://u:{SECRET}@db/x"]]]]]},
    ],
)
def test_a_json_line_is_redacted_whatever_holds_the_secret(fields: dict[str, Any]) -> None:
    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    get_logger().info("event", **fields)
    assert SECRET not in stream.getvalue()
    assert json_lines(stream)[0]["event"] == "event"


def test_a_cyclic_value_is_reported_as_the_standard_encoder_does() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        logs.render_json(None, "info", {"event": "x", "loop": loop})

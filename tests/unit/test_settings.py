"""Settings.from_env: defaults, every variable, precedence, and one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from durable.settings import (
    ENV_VARS,
    LIBPQ_VARIABLES,
    Settings,
    SettingsError,
    parse_duration,
    unknown_variables,
)

SECRET = "s3cret-Pw"


def error_for(env: dict[str, str], **overrides: object) -> str:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env, **overrides)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    return message


def test_defaults_from_an_empty_environment() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.database_url is None
    assert settings.use_libpq_env is False
    assert settings.listen_url is None
    assert settings.queues == ()
    assert settings.concurrency == 10
    assert settings.poll_interval == 5.0
    assert settings.lease == 30.0
    assert settings.shutdown_grace == 30.0
    assert settings.log_level == "info"
    assert settings.log_format == "auto"
    assert settings.apps == ()
    assert settings.home is None
    assert settings.queue_limits == {"default": 10}
    assert settings.dsn_for_logs is None


def test_reads_os_environ_when_no_mapping_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_CONCURRENCY", "7")
    assert Settings.from_env().concurrency == 7


def test_every_variable_is_parsed() -> None:
    env = {
        "DURABLE_DATABASE_URL": "postgresql://app:pw@db.internal:6432/shop",
        "DURABLE_LISTEN_URL": "postgres://app:pw@db.internal:5432/shop",
        "DURABLE_QUEUES": " orders=8 , email=32,reports ",
        "DURABLE_CONCURRENCY": "4",
        "DURABLE_POLL_INTERVAL": "500ms",
        "DURABLE_LEASE": "1m",
        "DURABLE_SHUTDOWN_GRACE": "0",
        "DURABLE_LOG_LEVEL": "DEBUG",
        "DURABLE_LOG_FORMAT": "Json",
        "DURABLE_APP": "shop.tasks, shop.workflows,shop.tasks",
        "DURABLE_HOME": "/var/lib/durable",
        "DURABLE_UI_ALLOWED_HOSTS": "Dash.Example.com., [::1],10.0.0.5,dash.example.com",
    }
    settings = Settings.from_env(env)
    assert settings.database_url == "postgresql://app:pw@db.internal:6432/shop"
    assert settings.use_libpq_env is False
    assert settings.listen_url == "postgres://app:pw@db.internal:5432/shop"
    assert settings.queues == (("orders", 8), ("email", 32), ("reports", None))
    assert settings.concurrency == 4
    assert settings.poll_interval == 0.5
    assert settings.lease == 60.0
    assert settings.shutdown_grace == 0.0
    assert settings.log_level == "debug"
    assert settings.log_format == "json"
    assert settings.apps == ("shop.tasks", "shop.workflows")
    assert settings.home == Path("/var/lib/durable")
    assert settings.ui_allowed_hosts == ("dash.example.com", "::1", "10.0.0.5")
    assert settings.queue_limits == {"orders": 8, "email": 32, "reports": 4}


def test_home_expands_the_user_directory() -> None:
    home = Settings.from_env({"DURABLE_HOME": "~/durable"}).home
    assert home == Path("~/durable").expanduser()
    assert "~" not in str(home)


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", None), (" AUTO ", None), ("0", 0), ("64", 64)]
)
def test_claim_ahead_is_auto_or_a_count(value: str, expected: int | None) -> None:
    assert Settings.from_env({"DURABLE_CLAIM_AHEAD": value}).claim_ahead == expected
    assert Settings.from_env({}).claim_ahead is None


def test_empty_variables_count_as_unset() -> None:
    env = {"DURABLE_DATABASE_URL": "", "DURABLE_CONCURRENCY": "  ", "DURABLE_QUEUES": ""}
    assert Settings.from_env(env) == Settings()


@pytest.mark.parametrize(
    ("env", "url", "libpq"),
    [
        (
            {
                "DURABLE_DATABASE_URL": "postgresql://a@h/durable",
                "DATABASE_URL": "postgresql://b@h/generic",
                "PGHOST": "pghost",
            },
            "postgresql://a@h/durable",
            False,
        ),
        (
            {"DATABASE_URL": "postgresql://b@h/generic", "PGHOST": "pghost"},
            "postgresql://b@h/generic",
            False,
        ),
        *(({name: "x"}, None, True) for name in LIBPQ_VARIABLES),
        ({"PGSSLMODE_UNRELATED": "x"}, None, False),
        ({}, None, False),
    ],
)
def test_database_url_precedence(env: dict[str, str], url: str | None, libpq: bool) -> None:
    settings = Settings.from_env(env)
    assert settings.database_url == url
    assert settings.use_libpq_env is libpq


def test_a_durable_url_hides_a_foreign_database_url() -> None:
    # DATABASE_URL often belongs to another tool; it is not validated when unused.
    env = {"DURABLE_DATABASE_URL": "postgresql://h/db", "DATABASE_URL": "mysql://h/db"}
    assert Settings.from_env(env).database_url == "postgresql://h/db"


def test_overrides_beat_the_environment() -> None:
    env = {
        "DURABLE_DATABASE_URL": "postgresql://env/db",
        "DURABLE_LISTEN_URL": "postgresql://env/listen",
        "DURABLE_QUEUES": "env=1",
        "DURABLE_CONCURRENCY": "2",
        "DURABLE_POLL_INTERVAL": "2",
        "DURABLE_LEASE": "20",
        "DURABLE_SHUTDOWN_GRACE": "20",
        "DURABLE_LOG_LEVEL": "error",
        "DURABLE_LOG_FORMAT": "console",
        "DURABLE_APP": "env_app",
        "DURABLE_HOME": "/env",
    }
    settings = Settings.from_env(
        env,
        database_url="postgresql://flag/db",
        listen_url="postgresql://flag/listen",
        queues="flag=3,bare",
        concurrency=9,
        poll_interval="250ms",
        lease=45,
        shutdown_grace=1.5,
        log_level="warning",
        log_format="json",
        apps=["flag_app", "other.app"],
        home=Path("/flag"),
    )
    assert settings == Settings(
        database_url="postgresql://flag/db",
        listen_url="postgresql://flag/listen",
        queues=(("flag", 3), ("bare", None)),
        concurrency=9,
        poll_interval=0.25,
        lease=45.0,
        shutdown_grace=1.5,
        log_level="warning",
        log_format="json",
        apps=("flag_app", "other.app"),
        home=Path("/flag"),
    )
    assert settings.queue_limits == {"flag": 3, "bare": 9}


def test_none_overrides_are_ignored() -> None:
    settings = Settings.from_env({"DURABLE_CONCURRENCY": "3"}, concurrency=None, queues=None)
    assert settings.concurrency == 3


def test_a_database_url_override_beats_libpq_variables() -> None:
    settings = Settings.from_env({"PGHOST": "h"}, database_url="postgresql://flag/db")
    assert settings.database_url == "postgresql://flag/db"
    assert settings.use_libpq_env is False


def test_queue_overrides_accept_a_mapping_or_pairs() -> None:
    assert Settings.from_env({}, queues={"a": 2, "b": None}).queues == (("a", 2), ("b", None))
    assert Settings.from_env({}, queues=[("a", 2), "b=3,c"]).queues == (
        ("a", 2),
        ("b", 3),
        ("c", None),
    )


def test_unknown_override_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="queue"):
        Settings.from_env({}, queue="orders")


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().concurrency = 3  # type: ignore[misc]  # asserting the runtime guard


def test_bare_queue_names_follow_a_later_concurrency_change() -> None:
    settings = Settings.from_env({"DURABLE_QUEUES": "a,b=2"})
    assert dataclasses.replace(settings, concurrency=6).queue_limits == {"a": 6, "b": 2}


# (variable, bad value, expected fragment of the message)
BAD_VALUES = [
    ("DURABLE_QUEUES", "orders=abc", "name=N[,name=N...]"),
    ("DURABLE_QUEUES", "orders=0", "from 1 to 100000"),
    ("DURABLE_QUEUES", "orders=100001", "from 1 to 100000"),
    ("DURABLE_QUEUES", "orders=-1", "from 1 to 100000"),
    ("DURABLE_QUEUES", "orders=", "name=N"),
    ("DURABLE_QUEUES", "=5", "without '=' or ','"),
    ("DURABLE_QUEUES", "a=1,,b=2", "without '=' or ','"),
    ("DURABLE_QUEUES", "a=1=2", "name=N"),
    ("DURABLE_QUEUES", "a=1,a=2", "'a' is given twice"),
    ("DURABLE_QUEUES", "a,a", "'a' is given twice"),
    ("DURABLE_QUEUES", "q" * 201, "1 to 200 characters"),
    ("DURABLE_CONCURRENCY", "0", "whole number from 1 to 100000"),
    ("DURABLE_CLAIM_AHEAD", "-1", "auto or a whole number from 0 to 100000"),
    ("DURABLE_CLAIM_AHEAD", "lots", "auto or a whole number from 0 to 100000"),
    ("DURABLE_CLAIM_AHEAD", "100001", "auto or a whole number from 0 to 100000"),
    ("DURABLE_CONCURRENCY", "100001", "whole number from 1 to 100000"),
    ("DURABLE_CONCURRENCY", "1.5", "whole number"),
    ("DURABLE_CONCURRENCY", "+5", "whole number"),
    ("DURABLE_CONCURRENCY", "ten", "whole number"),
    ("DURABLE_POLL_INTERVAL", "0", "positive duration"),
    ("DURABLE_POLL_INTERVAL", "0ms", "positive duration"),
    ("DURABLE_POLL_INTERVAL", "-1", "positive duration"),
    ("DURABLE_POLL_INTERVAL", "5 minutes", "500ms"),
    ("DURABLE_POLL_INTERVAL", "nan", "positive duration"),
    ("DURABLE_POLL_INTERVAL", "inf", "positive duration"),
    ("DURABLE_LEASE", "0", "at least 1s"),
    ("DURABLE_LEASE", "500ms", "at least 1s"),
    ("DURABLE_LEASE", "-30", "at least 1s"),
    ("DURABLE_SHUTDOWN_GRACE", "-1", "duration"),
    ("DURABLE_SHUTDOWN_GRACE", "soon", "duration"),
    ("DURABLE_LOG_LEVEL", "loud", "debug, info, warning, error"),
    ("DURABLE_LOG_FORMAT", "xml", "auto, json, console"),
    ("DURABLE_APP", "shop-tasks", "module names"),
    ("DURABLE_APP", "shop..tasks", "module names"),
    ("DURABLE_APP", "shop,class", "module names"),
    ("DURABLE_APP", ",", "module names"),
    ("DURABLE_DATABASE_URL", "mysql://u@h/db", "postgresql://"),
    ("DURABLE_DATABASE_URL", "postgresql+asyncpg://u@h/db", "postgresql://"),
    ("DURABLE_DATABASE_URL", "host=h dbname=db", "postgresql://"),
    ("DURABLE_DATABASE_URL", "postgresql://[::1/db", "postgresql://"),
    ("DATABASE_URL", "sqlite:///tmp/x.db", "postgresql://"),
    ("DURABLE_LISTEN_URL", "redis://h", "postgresql://"),
    ("DURABLE_UI_ALLOWED_HOSTS", "dash.example.com:443", "host names or addresses"),
    ("DURABLE_UI_ALLOWED_HOSTS", "dash example", "host names or addresses"),
    ("DURABLE_UI_ALLOWED_HOSTS", "-dash.example", "host names or addresses"),
    ("DURABLE_UI_ALLOWED_HOSTS", "a,,b", "host names or addresses"),
    ("DURABLE_UI_ALLOWED_HOSTS", "*", "host names or addresses"),
]


@pytest.mark.parametrize(("variable", "value", "fragment"), BAD_VALUES)
def test_malformed_variable_is_one_line_naming_it(variable: str, value: str, fragment: str) -> None:
    message = error_for({variable: value})
    assert message.startswith(f"{variable}: expected ")
    assert fragment in message
    assert repr(value) in message


def test_queues_message_matches_the_documented_form() -> None:
    assert error_for({"DURABLE_QUEUES": "orders=abc"}) == (
        "DURABLE_QUEUES: expected name=N[,name=N...] with N a whole number from 1 to 100000,"
        " got 'orders=abc'"
    )


@pytest.mark.parametrize(
    ("field", "flag", "value"),
    [
        ("queues", "--queues", "orders=abc"),
        ("queues", "--queues", ""),
        ("queues", "--queues", 5),
        ("concurrency", "--concurrency", 0),
        ("concurrency", "--concurrency", True),
        ("concurrency", "--concurrency", "many"),
        ("poll_interval", "--poll-interval", 0),
        ("poll_interval", "--poll-interval", float("nan")),
        ("lease", "--lease", 0.5),
        ("shutdown_grace", "--shutdown-grace", -1),
        ("log_level", "--log-level", "loud"),
        ("log_format", "--log-format", "yaml"),
        ("apps", "--app", "not a module"),
        ("apps", "--app", ["ok", 3]),
        ("database_url", "--database-url", "mysql://h/db"),
        ("database_url", "--database-url", ""),
        ("listen_url", "--listen-url", "http://h"),
        ("home", "--home", ""),
    ],
)
def test_malformed_override_names_the_flag(field: str, flag: str, value: object) -> None:
    # The environment is valid; the error must come from the flag.
    message = error_for({"DURABLE_QUEUES": "ok=1"}, **{field: value})
    assert message.startswith(f"{flag}: expected ")


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("DURABLE_DATABASE_URL", f"mysql://user:{SECRET}@host/db"),
        ("DURABLE_DATABASE_URL", f"postgresql+asyncpg://user:{SECRET}@host/db"),
        ("DURABLE_DATABASE_URL", f"postgresql://user:{SECRET}@[::1/db"),
        ("DURABLE_DATABASE_URL", f"postgresql:/user:{SECRET}@host/db"),
        ("DURABLE_DATABASE_URL", f"user:{SECRET}@host/db"),
        ("DURABLE_DATABASE_URL", f"host=h password={SECRET}"),
        ("DATABASE_URL", f"mysql://user:{SECRET}@host/db"),
        ("DURABLE_LISTEN_URL", f"mysql://user:{SECRET}@host/db"),
    ],
)
def test_a_malformed_url_never_shows_its_password(variable: str, url: str) -> None:
    message = error_for({variable: url})
    assert message.startswith(f"{variable}: ")
    assert SECRET not in message
    assert "***" in message


def test_a_malformed_url_flag_never_shows_its_password() -> None:
    message = error_for({}, database_url=f"mysql://user:{SECRET}@host/db")
    assert message.startswith("--database-url: ")
    assert SECRET not in message


def test_password_never_in_repr_or_dsn_for_logs() -> None:
    settings = Settings.from_env(
        {
            "DURABLE_DATABASE_URL": f"postgresql://user:{SECRET}@host:5432/db",
            "DURABLE_LISTEN_URL": f"postgresql://user:{SECRET}@direct:5432/db",
        }
    )
    assert settings.database_url == f"postgresql://user:{SECRET}@host:5432/db"
    assert settings.dsn_for_logs == "postgresql://user:***@host:5432/db"
    assert SECRET not in repr(settings)
    assert "direct:5432" in repr(settings)


def test_dsn_for_logs_keeps_a_url_without_password() -> None:
    settings = Settings.from_env({"DURABLE_DATABASE_URL": "postgresql://user@host/db"})
    assert settings.dsn_for_logs == "postgresql://user@host/db"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5", 5.0),
        ("0.5", 0.5),
        (".25", 0.25),
        ("2.", 2.0),
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1.5m", 90.0),
        ("2h", 7200.0),
        (" 10 S ", 10.0),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "s", "-1", "1w", "1 2", "1e3", "nan", "inf", "5ms5", "1,5", "9" * 400]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_env_vars_document_every_variable() -> None:
    names = [name for name, _default, _text in ENV_VARS]
    assert len(names) == len(set(names))
    assert set(names) == {
        "DURABLE_UI",
        "DURABLE_UI_LISTEN",
        "DURABLE_UI_ALLOWED_HOSTS",
        "DURABLE_UI_TOKEN_FILE",
        "DURABLE_UI_PASSWORD_FILE",
        "DURABLE_DATABASE_URL",
        "DATABASE_URL",
        "DURABLE_DATABASE_URL_FILE",
        "DURABLE_LISTEN_URL",
        "DURABLE_QUEUES",
        "DURABLE_CONCURRENCY",
        "DURABLE_POLL_INTERVAL",
        "DURABLE_LEASE",
        "DURABLE_CLAIM_AHEAD",
        "DURABLE_SHUTDOWN_GRACE",
        "DURABLE_LOG_LEVEL",
        "DURABLE_LOG_FORMAT",
        "DURABLE_APP",
        "DURABLE_HTTP",
        "DURABLE_HTTP_MAX_CONNECTIONS",
        "DURABLE_RETENTION",
        "DURABLE_RETENTION_VACUUM",
        "DURABLE_STATEMENT_CACHE",
        "DURABLE_WORKFLOW_CACHE",
        "DURABLE_HISTORY_WARNING",
        "DURABLE_HOME",
    }
    assert all(default and text for _name, default, text in ENV_VARS)


def test_every_documented_variable_is_read() -> None:
    # Setting a malformed value in each documented variable must be noticed.
    for name, _default, _text in ENV_VARS:
        with pytest.raises(SettingsError, match=f"^{name}: "):
            Settings.from_env({name: "\x00bad=value,,"})


def test_unknown_variables_flags_typos() -> None:
    env = {"DURABLE_CONCURENCY": "8", "DURABLE_LEASE": "30", "PATH": "/bin", "DATABASE_URL": "x"}
    assert unknown_variables(env) == ("DURABLE_CONCURENCY",)


def test_the_database_url_comes_from_a_file(tmp_path: Path) -> None:
    """A mounted secret (the container convention): no password in the environment of
    every child process, nor on the command line where `ps` shows it to everyone."""
    secret = tmp_path / "database_url"
    secret.write_text(f"postgresql://app:{SECRET}@db:5432/shop\n")
    env = {"DURABLE_DATABASE_URL_FILE": str(secret)}
    assert Settings.from_env(env).database_url == f"postgresql://app:{SECRET}@db:5432/shop"
    flag = Settings.from_env({}, database_url_file=str(secret))
    assert flag.database_url == f"postgresql://app:{SECRET}@db:5432/shop"
    # A flag wins over a variable, whichever form either takes.
    assert Settings.from_env(env, database_url="postgresql://flag/db").database_url == (
        "postgresql://flag/db"
    )
    assert Settings.from_env(
        {"DURABLE_DATABASE_URL": "postgresql://env/db"}, database_url_file=str(secret)
    ).database_url == f"postgresql://app:{SECRET}@db:5432/shop"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "DURABLE_DATABASE_URL_FILE: cannot read '{path}': No such file or directory"),
        ("", "DURABLE_DATABASE_URL_FILE: '{path}' is empty; expected a URL"),
        (f"mysql://app:{SECRET}@db/shop", "DURABLE_DATABASE_URL_FILE: expected a URL"),
    ],
)
def test_a_bad_url_file_is_one_line_without_the_secret(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "database_url"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"DURABLE_DATABASE_URL_FILE": str(path)})
    text = str(raised.value)
    assert text.startswith(message.format(path=path)), text
    assert "\n" not in text and SECRET not in text


def test_a_url_and_a_url_file_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "database_url"
    path.write_text("postgresql://db/shop")
    env = {"DURABLE_DATABASE_URL": "postgresql://db/x", "DURABLE_DATABASE_URL_FILE": str(path)}
    with pytest.raises(SettingsError, match=r"^DURABLE_DATABASE_URL and DURABLE_DATABASE_URL_FILE"):
        Settings.from_env(env)


def test_statement_cache_and_retention_vacuum_are_read_and_checked() -> None:
    from durable.errors import ConfigurationError

    s = Settings.from_env({"DURABLE_STATEMENT_CACHE": "0", "DURABLE_RETENTION_VACUUM": "ON"})
    assert (s.statement_cache, s.retention_vacuum) == (0, "on")
    assert Settings.from_env({}, statement_cache=0).statement_cache == 0
    assert Settings.from_env({}, statement_cache=500).statement_cache == 500
    assert (Settings.from_env({}).statement_cache, Settings.from_env({}).retention_vacuum) == (
        100, "auto"
    )
    for variable, bad in (("DURABLE_STATEMENT_CACHE", "-1"), ("DURABLE_STATEMENT_CACHE", "x"),
                          ("DURABLE_STATEMENT_CACHE", "100001"),
                          ("DURABLE_RETENTION_VACUUM", "sometimes")):
        with pytest.raises(ConfigurationError, match=variable):
            Settings.from_env({variable: bad})


def test_workflow_cache_and_history_warning() -> None:
    assert Settings.from_env({}).workflow_cache == 1000
    assert Settings.from_env({}).history_warning == 10_000
    env = {"DURABLE_WORKFLOW_CACHE": "0", "DURABLE_HISTORY_WARNING": " off "}
    settings = Settings.from_env(env)
    assert (settings.workflow_cache, settings.history_warning) == (0, None)
    assert Settings.from_env({"DURABLE_HISTORY_WARNING": "1"}).history_warning == 1
    assert Settings.from_env({}, workflow_cache=1_000_000).workflow_cache == 1_000_000


@pytest.mark.parametrize("raw", ["-1", "1000001", "1.5", "lots", "1e3"])
def test_workflow_cache_rejects(raw: str) -> None:
    assert error_for({"DURABLE_WORKFLOW_CACHE": raw}) == (
        f"DURABLE_WORKFLOW_CACHE: expected a whole number from 0 to 1000000, got {raw!r}"
    )


@pytest.mark.parametrize("raw", ["0", "-5", "1000000001", "on", "10k"])
def test_history_warning_rejects(raw: str) -> None:
    assert error_for({"DURABLE_HISTORY_WARNING": raw}) == (
        "DURABLE_HISTORY_WARNING: expected off or a whole number from 1 to 1000000000, "
        f"got {raw!r}"
    )

"""A login role without privileges, for the least-privilege and secrets tests."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from durable.store import quote_ident
from tests.support.helpers import execute

APP_ROLE = "durable_app"
PASSWORD = "s3cr3t-pw"


async def app_role(dsn: str) -> None:
    """Create ``durable_app`` (a login role, no superuser, no create) if the server lacks
    it, with a password; roles are server-wide, so it may exist from an earlier test."""
    role = quote_ident(APP_ROLE)
    await execute(
        dsn,
        f"do $$ begin create role {role} login nosuperuser nocreatedb nocreaterole;"
        " exception when duplicate_object then null; end $$",
    )
    # ALTER ROLE takes no parameters: the literal is quoted here.
    await execute(dsn, f"alter role {role} password {literal(PASSWORD)}")


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def as_app(dsn: str, password: str | None = PASSWORD) -> str:
    """``dsn`` logging in as ``durable_app`` (with its password)."""
    parts = urlsplit(dsn)
    secret = f":{quote(password, safe='')}" if password else ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{APP_ROLE}{secret}@{host}"))

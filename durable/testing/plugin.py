"""The pytest fixtures of ``durable.testing`` (enabled with ``pytest_plugins =
["durable.testing"]`` in the root conftest.py, or ``-p durable.testing``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from durable.testing.env import Env
from durable.testing.server import TestServer, fresh_database, template_database, test_server


@pytest.fixture(scope="session")
def durable_server() -> Iterator[TestServer]:
    """The session's Postgres: ``DURABLE_TEST_DSN`` (a server where tests may create and
    drop databases), else an embedded one started in a temporary home."""
    with test_server() as server:
        yield server


@pytest.fixture(scope="session")
def durable_template(durable_server: TestServer) -> Iterator[str]:
    """A database migrated once per session, copied for each test."""
    with template_database(durable_server.dsn) as name:
        yield name


@pytest.fixture
def durable_dsn(durable_server: TestServer, durable_template: str) -> Iterator[str]:
    """The URL of a fresh, migrated database for this test only."""
    with fresh_database(durable_server.dsn, durable_template) as dsn:
        yield dsn


@pytest_asyncio.fixture
async def durable_env(durable_dsn: str) -> AsyncIterator[Env]:
    """An ``Env`` on this test's database: a client, and a worker serving every task and
    workflow defined with the decorators (for other options, open an ``Env`` yourself)."""
    async with Env(durable_dsn) as env:
        yield env

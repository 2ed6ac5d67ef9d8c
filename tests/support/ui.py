"""The dashboard in a test: its server on a free port in the test's event loop, and a
page of Debian's Chromium driven by Playwright (no browser is downloaded)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from durable.ui.auth import Auth
from durable.ui.server import UiServer

CHROMIUM = os.environ.get("DURABLE_CHROMIUM", "/usr/bin/chromium")


@asynccontextmanager
async def dashboard(
    dsn: str, auth: Auth | None = None, allowed_hosts: tuple[str, ...] = ()
) -> AsyncIterator[str]:
    """The dashboard serving ``dsn``; its base URL."""
    server = UiServer("127.0.0.1", 0, dsn, auth, allowed_hosts=allowed_hosts)
    await server.listen()
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        yield f"http://127.0.0.1:{server.port}"
        tg.cancel_scope.cancel()


@asynccontextmanager
async def browser(args: tuple[str, ...] = (), **context: Any) -> AsyncIterator[Any]:
    """A page of a fresh headless Chromium; ``args``: more command-line switches,
    ``context``: Playwright's context options."""
    from playwright import async_api

    async with async_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", *args])
        try:
            page_context = await b.new_context(**context)
            yield await page_context.new_page()
        finally:
            await b.close()

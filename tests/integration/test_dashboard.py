"""The dashboard in a real browser: headless Chromium (Debian's, driven by Playwright;
nothing is downloaded) against a real daemon and database. Task names start with ``ui_``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

import durable
from durable.ui.auth import Auth
from durable.ui.server import UiServer
from tests.support.helpers import execute, running_daemon, wait_status
from tests.support.roles import literal
from tests.support.ui import CHROMIUM, browser, dashboard

playwright_api = pytest.importorskip("playwright.async_api")
WIDE = {"width": 1280, "height": 900}
"""The window the pages are drawn in."""

TOKEN = "open-sesame-42"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"no {CHROMIUM}: apt-get install chromium"),
]

FLAKY: dict[str, bool] = {"fixed": False}


@durable.task(queue="ui", max_attempts=1)
async def ui_flaky(order: str) -> str:
    if not FLAKY["fixed"]:
        raise RuntimeError(f"payment service down for {order}")
    return f"paid {order}"


@durable.task(queue="ui")
async def ui_ship(order: str) -> str:
    return f"shipped {order}"


@durable.workflow(queue="ui")
async def ui_order(ctx: durable.Context, order: str) -> dict[str, Any]:
    reserved = await ctx.step("reserve", _reserve, order)
    approval = await ctx.wait_for_event("approved", timeout=600)
    shipped = await ctx.run(ui_ship, order)
    return {"reserved": reserved, "approval": approval, "shipped": shipped}


async def _reserve(order: str) -> str:
    return f"held {order}"


def token_auth(tmp_path: Path) -> Auth:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return Auth.from_file("--token-file", path, "token")


async def sign_in(page: Any, base: str) -> None:
    await page.goto(base + "/")
    assert page.url.startswith(base + "/login")
    await page.fill("input[name=secret]", "wrong-token")
    await page.click("text=Sign in >> nth=-1")
    assert "is not the one" in await page.inner_text("main")
    await page.fill("input[name=secret]", TOKEN)
    await page.click("button:has-text('Sign in')")
    await page.wait_for_url(base + "/")


async def test_every_page_opens_read_only_and_follows_a_workflow_live(dsn: str) -> None:
    FLAKY["fixed"] = False
    async with durable.connect(dsn) as client, running_daemon(dsn, queues="ui"), \
            dashboard(dsn) as base, browser(viewport=WIDE) as page:  # fmt: skip
        order = await client.start(ui_order, "A-1", tags=["vip"], attributes={"region": "eu"})
        failed = await client.start(ui_flaky, "A-2")
        await client.start("ui_nobody_serves", queue="ui")
        await wait_status(dsn, failed.id, "failed")
        await wait_status(dsn, order.id, "waiting")

        await page.goto(base + "/")
        assert await page.inner_text("h1") == "Queues"
        assert "read-only" in await page.inner_text("header")
        row = page.locator("tr[data-queue=ui]")
        assert await row.count() == 1
        assert "1 failed" in await row.inner_text()
        banner = await page.inner_text(".banner")
        assert "ui_nobody_serves" in banner and "no live daemon serves" in banner
        await page.wait_for_selector("#live.on")  # the event stream is open

        await page.goto(base + "/tasks?tag=vip")
        assert await page.locator("table.tasks tbody tr").count() == 1
        await page.goto(base + "/tasks?attr=region%3Deu&status=waiting")
        assert await page.locator(f"tr[data-id='{order.id}']").count() == 1
        await page.goto(base + "/tasks?since=banana")
        assert "since: expected a duration" in await page.inner_text("[role=alert]")
        await page.goto(base + "/workers")
        assert "live" in await page.inner_text("#workers")
        # The catalog the daemon published: its definitions, the daemon serving them.
        row = page.locator("#definitions tr[data-name=ui_order]")
        assert await row.count() == 1
        assert "workflow" in await row.inner_text() and "ui" in await row.inner_text()

        await page.goto(f"{base}/tasks/{failed.id}")
        assert "payment service down for A-2" in await page.inner_text("main")
        assert await page.locator("#action-retry").count() == 0
        refused = await page.request.post(f"{base}/tasks/{failed.id}/retry", form={"csrf": "x"})
        assert refused.status == 403 and "read-only" in await refused.text()
        await wait_status(dsn, failed.id, "failed")

        # Follow the workflow as it runs: the page is never reloaded.
        await page.goto(f"{base}/tasks/{order.id}")
        await page.wait_for_selector("#live.on")
        await page.evaluate("window.__kept = 'same page'")
        assert await page.inner_text("#task-status") == "waiting"
        assert await page.locator("g.bar").count() == 2  # reserve, the event wait
        await client.send_event(order.id, "approved", {"by": "ops"})
        await playwright_api.expect(page.locator("#task-status")).to_have_text(
            "completed", timeout=20000
        )
        assert await page.evaluate("window.__kept") == "same page"
        assert await page.locator("g.bar.ok").count() == 3  # reserve, the event, the child
        child = page.locator("g.kind-child a")
        await child.click()
        await page.wait_for_selector("text=ui_ship")
        assert "shipped A-1" in await page.inner_text("main")


async def test_retry_through_the_dashboard_with_a_token(dsn: str, tmp_path: Path) -> None:
    FLAKY["fixed"] = False
    async with durable.connect(dsn) as client, running_daemon(dsn, queues="ui"), \
            dashboard(dsn, token_auth(tmp_path)) as base, browser(viewport=WIDE) as page:  # fmt: skip
        failed = await client.start(ui_flaky, "B-1")
        others = [await client.start(ui_flaky, f"B-{i}", tags=["batch"]) for i in (2, 3)]
        for task in (failed, *others):
            await wait_status(dsn, task.id, "failed")
        # Without a session, pages send to the sign-in form and actions are refused.
        async with httpx.AsyncClient(follow_redirects=False) as http:
            assert (await http.get(base + "/tasks")).status_code == 303
            assert (await http.post(f"{base}/tasks/{failed.id}/retry")).status_code == 403
        await sign_in(page, base)
        await page.goto(f"{base}/tasks/{failed.id}")
        assert await page.inner_text("#task-status") == "failed"
        # CSRF: the session alone is not enough, nor a form from another origin.
        no_token = await page.request.post(f"{base}/tasks/{failed.id}/retry", form={"back": "/"})
        assert no_token.status == 403 and "CSRF" in await no_token.text()
        csrf = await page.get_attribute("form[action$='/retry'] input[name=csrf]", "value")
        elsewhere = await page.request.post(
            f"{base}/tasks/{failed.id}/retry", form={"csrf": csrf or ""},
            headers={"Origin": "http://evil.example"},
        )  # fmt: skip
        assert elsewhere.status == 403
        assert await wait_status(dsn, failed.id, "failed") == "failed"

        FLAKY["fixed"] = True
        await page.click("#action-retry")
        assert "retried" in await page.inner_text("[role=status]")
        await playwright_api.expect(page.locator("#task-status")).to_have_text(
            "completed", timeout=20000
        )
        assert "paid B-1" in await page.inner_text("main")

        # Bulk retry of a filtered set: the two tagged failures, not the rest.
        await page.goto(f"{base}/tasks?status=failed&tag=batch")
        assert await page.locator("table.tasks tbody tr[data-id]").count() == 2
        await page.click("form.bulk button")
        assert "retried 2 of 2" in await page.inner_text("[role=status]")
        for task in others:
            assert await wait_status(dsn, task.id, "completed") == "completed"

        # Cancel, and an event to a finished task, each said in one line.
        waiting = await client.start(ui_order, "B-9")
        await wait_status(dsn, waiting.id, "waiting")
        await page.goto(f"{base}/tasks/{waiting.id}")
        await page.click("#action-cancel")
        assert "cancelled 1 task(s)" in await page.inner_text("[role=status]")
        assert await wait_status(dsn, waiting.id, "cancelled") == "cancelled"
        await page.fill("form.event input[name=name]", "approved")
        await page.click("form.event button")
        assert "has finished: not sent" in await page.inner_text("[role=status]")


async def test_a_role_that_can_only_read(dsn: str, tmp_path: Path) -> None:
    """Every page works for a role with SELECT alone on the schema; an action it cannot
    take says so in one line instead of failing the page."""
    role = "durable_reader"
    await execute(dsn, f"do $$ begin create role {role} login password {literal('reader-pw')};"
                       " exception when duplicate_object then null; end $$")  # fmt: skip
    database = dsn.rsplit("/", 1)[1]
    await execute(dsn, f'grant connect on database "{database}" to {role}')
    await execute(dsn, f"grant usage on schema durable to {role}")
    await execute(dsn, f"grant select on all tables in schema durable to {role}")
    reader = dsn.replace("postgres@", f"{role}:reader-pw@", 1) if "postgres@" in dsn else None
    if reader is None:
        pytest.skip("the test server's URL names no user to replace")
    FLAKY["fixed"] = False
    async with durable.connect(dsn) as client, running_daemon(dsn, queues="ui"):
        failed = await client.start(ui_flaky, "C-1", tags=["ro"])
        await wait_status(dsn, failed.id, "failed")
    async with dashboard(reader, token_auth(tmp_path)) as base, browser(viewport=WIDE) as page:
        await sign_in(page, base)
        for path in ("/", "/tasks", "/tasks?tag=ro", f"/tasks/{failed.id}", "/workers"):
            response = await page.goto(base + path)
            assert response is not None and response.status == 200, path
        await page.goto(f"{base}/tasks/{failed.id}")
        await page.click("#action-retry")
        alert = await page.inner_text("[role=alert]")
        assert alert.startswith("the database refused: permission denied"), alert
    assert await wait_status(dsn, failed.id, "failed") == "failed"


async def test_what_tasks_hold_is_shown_escaped(dsn: str) -> None:
    """Names, labels, arguments and errors are the users' data: never markup."""
    evil = "<script>alert(1)</script>"
    async with durable.connect(dsn) as client, dashboard(dsn) as base:
        task = await client.start(
            evil, evil, allow_unknown=True, tags=[evil], attributes={evil: evil}
        )
        async with httpx.AsyncClient() as http:
            for path in ("/", "/tasks", f"/tasks/{task.id}", "/tasks?tag=" + evil):
                page = await http.get(base + path)
                assert page.status_code == 200, path
                assert evil not in page.text, path
            detail = await http.get(f"{base}/tasks/{task.id}")
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail.text
            assert "default-src 'self'" in detail.headers["content-security-policy"]


async def test_the_daemon_serves_the_dashboard_beside_its_probes(dsn: str) -> None:
    async with running_daemon(dsn, queues="ui", http="127.0.0.1:0", ui="on") as daemon:
        assert isinstance(daemon.http, UiServer)
        base = f"http://127.0.0.1:{daemon.http.port}"
        async with httpx.AsyncClient() as http:
            assert (await http.get(base + "/healthz")).json()["status"] == "ok"
            ready = await http.get(base + "/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            assert "durable_" in (await http.get(base + "/metrics")).text
            overview = await http.get(base + "/")
            assert overview.status_code == 200 and 'data-queue="ui"' in overview.text
    async with running_daemon(dsn, queues="ui", http="127.0.0.1:0") as daemon:
        assert not isinstance(daemon.http, UiServer)  # off unless DURABLE_UI=on


async def test_fork_and_replay_make_branches_the_page_can_show(dsn: str, tmp_path: Path) -> None:
    async with durable.connect(dsn) as client, running_daemon(dsn, queues="ui"), \
            dashboard(dsn, token_auth(tmp_path)) as base, browser(viewport=WIDE) as page:  # fmt: skip
        order = await client.start(ui_order, "D-1")
        await wait_status(dsn, order.id, "waiting")
        await client.send_event(order.id, "approved", "first")
        await wait_status(dsn, order.id, "completed")
        await sign_in(page, base)
        await page.goto(f"{base}/tasks/{order.id}")
        assert await page.locator("g.bar").count() == 3
        # Fork at the event wait: a new branch keeps the reserve step and waits again.
        await page.click("form[action$='/fork']:has(input[name=at][value='1']) button")
        assert "forked at 1 on branch 1" in await page.inner_text("[role=status]")
        if await wait_status(dsn, order.id, "waiting", "completed") == "waiting":
            await client.send_event(order.id, "approved", "second")
        await playwright_api.expect(page.locator("#task-status")).to_have_text(
            "completed", timeout=20000
        )
        assert await page.locator(".branches b").inner_text() == "1"
        await page.click(".branches a:text-is('0')")
        assert page.url.endswith("?branch=0")
        assert await page.locator("g.bar").count() == 3
        await page.click("#action-replay")
        assert "replayed on branch 2" in await page.inner_text("[role=status]")


async def test_the_overview_updates_live_and_a_filter_reads_one_stretch(dsn: str) -> None:
    """The overview changes in place as tasks arrive, run and finish (no reload); a task
    list filter that matches nothing recent searches one stretch of ids, says so, and
    leads on to the older match."""
    FLAKY["fixed"] = True
    # The old match, then more than one stretch of newer tasks.
    await execute(
        dsn,
        "insert into durable.tasks (queue, name, status, finished_at) "
        "select 'bulk', case when g = 1 then 'ui_rare' else 'ui_common' end, 'completed', "
        "now() from generate_series(1, 100500) g",
    )
    async with durable.connect(dsn) as client, dashboard(dsn) as base, browser(viewport=WIDE) as page:
        await page.goto(base + "/")
        await page.wait_for_selector("#live.on")
        await page.evaluate("window.__kept = 'same page'")
        assert await page.locator("tr[data-queue=ui]").count() == 0
        task = await client.start(ui_flaky, "L-1")
        row = page.locator("tr[data-queue=ui]")
        await playwright_api.expect(row.locator("td.num").first).to_have_text("1", timeout=20000)
        async with running_daemon(dsn, queues="ui"):
            await wait_status(dsn, task.id, "completed")
            await playwright_api.expect(row.locator("td.chart")).to_contain_text(
                "1 ok", timeout=20000
            )
            await playwright_api.expect(row.locator("td.num").first).to_have_text("0")
        assert await page.evaluate("window.__kept") == "same page"

        await page.goto(base + "/tasks?name=ui_rare")
        assert "No tasks match in this stretch" in await page.inner_text("#tasklist")
        assert "older tasks are not searched yet" in await page.inner_text(".pager")
        await page.click("a[rel=next]")
        await page.wait_for_selector("table.tasks tbody tr[data-id]")
        assert await page.locator("table.tasks tbody tr[data-id]").count() == 1
        assert "ui_rare" in await page.inner_text("table.tasks")
        assert ", the oldest." in await page.inner_text(".pager")
        assert await page.locator("a[rel=next]").count() == 0

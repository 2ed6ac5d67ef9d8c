"""DNS rebinding: a page elsewhere that points a name of its own at 127.0.0.1 reaches the
dashboard as that name. The dashboard on a loopback address answers only to loopback
names and DURABLE_UI_ALLOWED_HOSTS; the daemon's probes answer to any. Against a real
server and database, and Debian's Chromium resolving the attacker's name to 127.0.0.1.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx
import pytest

from durable.ui.server import UiServer
from tests.support.helpers import ROOT, fetchval, running_daemon
from tests.support.ui import CHROMIUM, browser, dashboard

SECRET = "card-4242-4242-4242"
REBIND = "rebind.test"
"""The attacker's name; Chromium resolves it to 127.0.0.1 (--host-resolver-rules)."""


async def task_with_secret(dsn: str) -> int:
    """A finished task whose arguments the dashboard shows: what a rebinding page reads."""
    return int(
        await fetchval(
            dsn,
            "insert into durable.tasks (queue, name, kind, status, finished_at, args) "
            "values ('hosts', 'pay', 'task', 'completed', now(), $1::jsonb) returning id",
            f'["{SECRET}"]',
        )
    )


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def test_every_dashboard_path_refuses_a_foreign_host(dsn: str) -> None:
    task = await task_with_secret(dsn)
    async with dashboard(dsn) as base, httpx.AsyncClient() as http:
        port = port_of(base)
        paths = ["/", "/tasks", f"/tasks/{task}", "/workers", "/events", "/login",
                 "/static/dashboard.css", "/nowhere"]  # fmt: skip
        for path in paths:
            refused = await http.get(base + path, headers={"Host": f"{REBIND}:{port}"})
            assert refused.status_code == 403, path
            assert "does not answer to the host" in refused.text, path
            assert SECRET not in refused.text
        posted = await http.post(base + f"/tasks/{task}/retry", headers={"Host": REBIND})
        assert posted.status_code == 403 and "does not answer" in posted.text
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"LOCALHOST:{port}"):
            page = await http.get(base + f"/tasks/{task}", headers={"Host": host})
            assert page.status_code == 200 and SECRET in page.text, host


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"no {CHROMIUM}")
async def test_a_rebound_name_in_a_real_browser_reads_nothing(dsn: str) -> None:
    pytest.importorskip("playwright.async_api")
    task = await task_with_secret(dsn)
    rules = (f"--host-resolver-rules=MAP {REBIND} 127.0.0.1",)
    async with dashboard(dsn) as base, browser(args=rules) as page:
        rebound = f"http://{REBIND}:{port_of(base)}/tasks/{task}"
        answer = await page.goto(rebound)
        assert answer is not None and answer.status == 403
        text = await page.inner_text("body")
        assert "does not answer to the host" in text and SECRET not in text
        # The same page by its own address shows the secret: the refusal is the Host's.
        await page.goto(f"{base}/tasks/{task}")
        assert SECRET in await page.inner_text("body")
    async with dashboard(dsn, allowed_hosts=(REBIND,)) as base, browser(args=rules) as page:
        answer = await page.goto(f"http://{REBIND}:{port_of(base)}/tasks/{task}")
        assert answer is not None and answer.status == 200
        assert SECRET in await page.inner_text("body")


async def test_the_daemons_probes_answer_any_host_its_dashboard_does_not(dsn: str) -> None:
    async with running_daemon(dsn, queues="hosts", http="127.0.0.1:0", ui="on") as daemon:
        assert isinstance(daemon.http, UiServer)
        base = f"http://127.0.0.1:{daemon.http.port}"
        foreign = {"Host": "10.1.2.3:9090"}  # how a kubelet or Prometheus may name it
        async with httpx.AsyncClient() as http:
            assert (await http.get(base + "/healthz", headers=foreign)).status_code == 200
            assert (await http.get(base + "/readyz", headers=foreign)).status_code == 200
            assert (await http.get(base + "/metrics", headers=foreign)).status_code == 200
            assert (await http.get(base + "/", headers=foreign)).status_code == 403
            assert (await http.get(base + "/")).status_code == 200
    async with running_daemon(
        dsn, queues="hosts", http="127.0.0.1:0", ui="on", ui_allowed_hosts="dash.example"
    ) as daemon:
        assert isinstance(daemon.http, UiServer)
        base = f"http://127.0.0.1:{daemon.http.port}"
        async with httpx.AsyncClient() as http:
            page = await http.get(base + "/", headers={"Host": "dash.example"})
            assert page.status_code == 200
            assert (await http.get(base + "/", headers={"Host": REBIND})).status_code == 403


def test_a_bad_allowed_host_is_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "durable", "ui", "--database-url",
         "postgresql://nobody@127.0.0.1:1/x", "--allowed-hosts", "dash.example:443"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("durable: --allowed-hosts: expected comma-separated host")
    assert done.stderr.count("\n") == 1, done.stderr

"""Attacks on the dashboard: authentication, CSRF, injection, hostile filters and
actions, against a real server, database and headless Chromium (Debian's; nothing is
downloaded). Each guards what held, or what was broken and is fixed.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx
import pytest

from durable.ui.auth import COOKIE, Auth
from tests.support.helpers import execute, fetchval
from tests.support.ui import CHROMIUM, browser, dashboard

playwright_api = pytest.importorskip("playwright.async_api")

TOKEN = "open-sesame-42"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"no {CHROMIUM}"),
]

EVIL = (
    '"><img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>'
    "<svg onload=window.__pwned=1>\u202ejavascript:window.__pwned=1"
)
"""Markup, an event handler, a bidi override and a javascript: URL, in 200 characters."""


# -- plumbing ---------------------------------------------------------------------------


@contextmanager
def other_site(pages: dict[str, str]) -> Iterator[str]:
    """A second web server on another local port serving ``pages`` (path: HTML)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def raw(port: int, request: bytes) -> bytes:
    """Send ``request`` as given and read the answer to the end (run in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def watch_dialogs(page: Any) -> list[str]:
    """Every alert, confirm or prompt the page opens (each dismissed)."""
    seen: list[str] = []

    async def dismiss(dialog: Any) -> None:
        seen.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", dismiss)
    return seen


def token_auth(tmp_path: Path) -> Auth:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return Auth.from_file("--token-file", path, "token")


async def failed_task(dsn: str, kind: str = "task") -> int:
    """A finished (failed) task, written directly: no daemon runs in these tests."""
    return int(
        await fetchval(
            dsn,
            "insert into durable.tasks (queue, name, kind, status, finished_at, error) "
            "values ('atk', 'atk_job', $1, 'failed', now(), "
            "'{\"type\": \"RuntimeError\", \"message\": \"down\"}') returning id",
            kind,
        )
    )


async def status_of(dsn: str, task_id: int) -> str:
    return str(await fetchval(dsn, "select status from durable.tasks where id = $1", task_id))


@asynccontextmanager
async def session(base: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client signed in through the form."""
    async with httpx.AsyncClient(base_url=base, follow_redirects=False, timeout=60) as http:
        signed = await http.post("/login", data={"secret": TOKEN, "next": "/"})
        assert signed.status_code == 303 and COOKIE in http.cookies
        yield http


async def csrf_of(http: httpx.AsyncClient, task_id: int) -> str:
    page = await http.get(f"/tasks/{task_id}")
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


async def sign_in(page: Any, base: str) -> None:
    await page.goto(base + "/")
    await page.fill("input[name=secret]", TOKEN)
    await page.click("button:has-text('Sign in')")
    await page.wait_for_url(base + "/")


FLASH = re.compile(r'<p class="flash (ok|failed)" role="(?:status|alert)">([^<]*)</p>')


def shown(page: httpx.Response) -> list[str]:
    """The one-line outcomes a page shows, an error's after "error: "."""
    return [("error: " if kind == "failed" else "") + html.unescape(text)
            for kind, text in FLASH.findall(page.text)]  # fmt: skip


async def flash(http: httpx.AsyncClient, response: httpx.Response) -> str:
    """The one-line outcome an action redirects with, as the page it sends back to shows it."""
    assert response.status_code == 303, (response.status_code, response.text)
    said = shown(await http.get(response.headers["location"]))
    assert len(said) == 1, said
    return said[0]


# -- authentication and authorisation -----------------------------------------------------


SPELLINGS = [
    ("POST", "/tasks/{id}/retry", {}),
    ("POST", "/tasks/{id}/retry/", {}),
    ("POST", "/TASKS/{id}/RETRY", {}),
    ("POST", "//tasks/{id}/retry", {}),
    ("POST", "/tasks//{id}/retry", {}),
    ("POST", "/tasks/%7Bid%7D/retry", {}),
    ("POST", "/tasks/{id}/%72etry", {}),
    ("POST", "/tasks/{id}/retry?_method=POST", {}),
    ("POST", "/tasks/retry?status=failed", {}),
    ("PUT", "/tasks/{id}/retry", {}),
    ("PATCH", "/tasks/{id}/retry", {}),
    ("DELETE", "/tasks/{id}/retry", {}),
    ("GET", "/tasks/{id}/retry", {"X-HTTP-Method-Override": "POST"}),
    ("HEAD", "/tasks/{id}/retry", {}),
    ("OPTIONS", "/tasks/{id}/retry", {}),
    ("POST", "/tasks/{id}/retry", {"Content-Type": "application/json"}),
    ("POST", "/tasks/{id}/retry", {"Content-Type": "text/plain"}),
    ("POST", "/tasks/{id}/retry", {"Authorization": "Bearer " + TOKEN[:-1] + "x"}),
    ("POST", "/tasks/{id}/retry", {"Authorization": "bearer " + TOKEN}),
    ("POST", "/tasks/{id}/retry", {"Authorization": "Basic " + TOKEN}),
    ("POST", "/tasks/{id}/retry", {"Cookie": f"{COOKIE}=forged.99999999999.00"}),
]


@pytest.mark.parametrize("secret", [False, True], ids=["read-only", "token-no-session"])
async def test_no_spelling_method_or_header_makes_an_action_act(
    dsn: str, tmp_path: Path, secret: bool
) -> None:
    task = await failed_task(dsn)
    auth = token_auth(tmp_path) if secret else None
    async with dashboard(dsn, auth) as base:
        port = urlsplit(base).port
        for method, path, headers in SPELLINGS:
            url = path.replace("%7Bid%7D", str(task)).replace("{id}", str(task))
            # A raw request: no client normalises the path's spelling.
            body = b"csrf=x&back=/"
            head = f"{method} {url} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            if "Content-Type" not in headers:
                head += "Content-Type: application/x-www-form-urlencoded\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            answer = await anyio.to_thread.run_sync(raw, port or 0, head.encode() + body)
            status = int(answer.split(b" ", 2)[1])
            # 401: a wrong Bearer token, refused as HTTP has it.
            assert status in (401, 403, 404, 405, 307), (method, url, headers, answer[:200])
            if status == 307:  # the trailing slash: sent on to the guarded path
                location = re.search(rb"location: (\S+)", answer, re.I)
                assert location is not None and location.group(1).decode() == f"{base}/tasks/{task}/retry"
            if status == 403 and not secret:
                assert b"read-only" in answer
        assert await status_of(dsn, task) == "failed"


async def test_csrf_tokens_are_bound_to_the_session_the_key_and_the_form(
    dsn: str, tmp_path: Path
) -> None:
    task = await failed_task(dsn)
    path = tmp_path / "token"
    path.write_text(TOKEN)
    first = Auth.from_file("--token-file", path, "token")
    async with dashboard(dsn, first) as base, session(base) as http:
        old_cookie = http.cookies[COOKIE]
        old_csrf = await csrf_of(http, task)
    # The same secret, a restart: a new key signs everyone out.
    async with dashboard(dsn, Auth.from_file("--token-file", path, "token")) as base, \
            session(base) as http, session(base) as other:  # fmt: skip
        csrf = await csrf_of(http, task)
        theirs = await csrf_of(other, task)
        assert csrf != theirs
        url = f"/tasks/{task}/retry"
        refused = [
            await http.post(url, data={"back": "/"}),
            await http.post(url, data={"csrf": "", "back": "/"}),
            await http.post(url, data={"csrf": theirs, "back": "/"}),
            await http.post(url, data={"csrf": old_csrf, "back": "/"}),
            await http.post(url, data={"csrf": csrf.upper(), "back": "/"}),
            await http.post(url + "?csrf=" + csrf, data={"back": "/"}),
            await http.post(url, json={"csrf": csrf, "back": "/"}),
            await http.post(url, content=f"csrf={csrf}", headers={"Content-Type": "text/plain"}),
            await http.post(url, data={"csrf": csrf}, headers={"Origin": "null"}),
            await http.post(url, data={"csrf": csrf}, headers={"Origin": "http://127.0.0.1:1"}),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        async with httpx.AsyncClient(base_url=base) as stale:
            stale.cookies.set(COOKIE, old_cookie)
            gone = await stale.post(url, data={"csrf": old_csrf})
            assert gone.status_code == 403 and "sign in first" in gone.text
        assert await status_of(dsn, task) == "failed"
        # The right token, as a multipart form too, acts.
        done = await http.post(url, files={"csrf": (None, csrf), "back": (None, "/")})
        assert await flash(http, done) == f"task {task} retried"
        assert await status_of(dsn, task) == "queued"


async def test_a_form_from_another_local_port_is_refused_in_the_browser(
    dsn: str, tmp_path: Path
) -> None:
    """Cookies do not tell ports apart and SameSite sees one site: Origin must refuse it."""
    task = await failed_task(dsn)
    async with dashboard(dsn, token_auth(tmp_path)) as base, browser() as page:
        async with session(base) as http:
            csrf = await csrf_of(http, task)  # even a leaked token of another session
        attack = (
            f'<form id=f method=post action="{base}/tasks/{task}/retry">'
            f'<input name=csrf value="{csrf}"><input name=back value="/"></form>'
            "<script>document.getElementById('f').submit()</script>"
        )
        with other_site({"/": attack}) as evil:
            await sign_in(page, base)
            async with page.expect_response(f"{base}/tasks/{task}/retry") as answer:
                await page.goto(evil + "/")
            response = await answer.value
            assert response.status == 403
            assert "another site" in await response.text()
    assert await status_of(dsn, task) == "failed"


async def test_the_session_cookie_is_httponly_strict_and_secure_behind_tls(
    dsn: str, tmp_path: Path
) -> None:
    async with dashboard(dsn, token_auth(tmp_path)) as base, browser() as page:
        async with httpx.AsyncClient(base_url=base) as http:
            plain = await http.post("/login", data={"secret": TOKEN})
            cookie = plain.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
            proxied = await http.post(
                "/login", data={"secret": TOKEN}, headers={"X-Forwarded-Proto": "https"}
            )
            assert "secure" in proxied.headers["set-cookie"].lower()
            wrong = await http.post("/login", data={"secret": TOKEN + "x"})
            assert wrong.status_code == 403 and "set-cookie" not in wrong.headers
        await sign_in(page, base)
        assert await page.evaluate("document.cookie") == ""


@pytest.mark.parametrize(
    "target",
    ["//evil.example/", "/\\evil.example/", "https://evil.example/", "/\t/evil.example/",
     "/%2F%2Fevil.example/", "\\\\evil.example/", "javascript:alert(1)"],
)  # fmt: skip
async def test_sign_in_and_actions_send_back_only_to_the_dashboard(
    dsn: str, tmp_path: Path, target: str
) -> None:
    task = await failed_task(dsn)
    async with dashboard(dsn, token_auth(tmp_path)) as base, browser() as page:
        dialogs = watch_dialogs(page)
        await page.goto(f"{base}/login?next={quote(target)}")
        await page.fill("input[name=secret]", TOKEN)
        async with page.expect_navigation():
            await page.click("button:has-text('Sign in')")
        assert urlsplit(page.url).netloc == urlsplit(base).netloc, page.url
        await page.goto(f"{base}/tasks/{task}")
        await page.evaluate(
            "t => document.querySelector('#action-cancel').form.back.value = t", target
        )
        async with page.expect_navigation():
            await page.click("#action-cancel")
        assert urlsplit(page.url).netloc == urlsplit(base).netloc, page.url
        assert dialogs == []


async def test_sign_out_is_a_csrf_checked_form(dsn: str, tmp_path: Path) -> None:
    async with dashboard(dsn, token_auth(tmp_path)) as base, browser() as page:
        attack = (
            f'<form id=f method=post action="{base}/logout"></form>'
            "<script>document.getElementById('f').submit()</script>"
        )
        with other_site({"/": attack}) as evil:
            await sign_in(page, base)
            async with page.expect_response(f"{base}/logout") as answer:
                await page.goto(evil + "/")
            assert (await answer.value).status == 403
        await page.goto(base + "/tasks")
        assert page.url == base + "/tasks"  # still signed in


async def test_a_session_ends_at_sign_out(dsn: str, tmp_path: Path) -> None:
    async with dashboard(dsn, token_auth(tmp_path)) as base, session(base) as http:
        kept = http.cookies[COOKIE]
        # Signing out is a form like the actions: without its CSRF token it is refused.
        assert (await http.post("/logout")).status_code == 403
        page = await http.get("/")
        found = re.search(r'action="/logout"><input type="hidden" name="csrf" value="([0-9a-f]+)"',
                          page.text)  # fmt: skip
        assert found is not None, page.text
        assert (await http.post("/logout", data={"csrf": found.group(1)})).status_code == 303
        async with httpx.AsyncClient(base_url=base) as replay:
            replay.cookies.set(COOKIE, kept)
            assert (await replay.get("/tasks")).status_code == 303  # to the sign-in form


async def test_guessing_the_secret_by_header_is_as_slow_as_by_the_form(
    dsn: str, tmp_path: Path
) -> None:
    async with dashboard(dsn, token_auth(tmp_path)) as base, httpx.AsyncClient(base_url=base) as http:
            started = time.monotonic()
            form = await http.post("/login", data={"secret": "guess-0000"})
            by_form = time.monotonic() - started
            assert form.status_code == 403 and by_form >= 0.5
            started = time.monotonic()
            for i in range(5):
                guess = await http.get("/", headers={"Authorization": f"Bearer guess-{i:04}"})
                assert guess.status_code == 401
            assert time.monotonic() - started >= 5 * 0.5


async def test_a_non_ascii_cookie_or_csrf_token_is_refused_not_a_500(
    dsn: str, tmp_path: Path
) -> None:
    task = await failed_task(dsn)
    async with dashboard(dsn, token_auth(tmp_path)) as base:
        async with httpx.AsyncClient(base_url=base) as http:
            page = await http.get("/tasks", headers=[(b"Cookie", f"{COOKIE}=a.1.\u00e9".encode())])
            assert page.status_code == 303, page.status_code
        async with session(base) as http:
            act = await http.post(f"/tasks/{task}/retry", data={"csrf": "\u00e9"})
            assert act.status_code == 403, act.status_code
    assert await status_of(dsn, task) == "failed"


async def test_a_non_ascii_bearer_token_or_secret_is_a_401_not_a_500(
    dsn: str, tmp_path: Path
) -> None:
    """The header's bytes are compared as sent, in constant time, whatever they hold."""
    task = await failed_task(dsn)
    path = tmp_path / "password"
    path.write_text("p\u00e4ssw\u00f6rd-\u263a\n")
    async with dashboard(dsn, Auth.from_file("--password-file", path, "password")) as base:
        port = urlsplit(base).port or 0
        tokens = [b"\xe9", "\u00e9\u263a".encode(), b"\xff\xfe\x80", b"\xed\xa0\x80",
                  "p\u00e4ssw\u00f6rd-\u263a".encode("latin-1", "replace")]  # fmt: skip
        for token in tokens:
            for head in (b"GET / HTTP/1.1", f"POST /tasks/{task}/retry HTTP/1.1".encode()):
                request = (head + b"\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token
                           + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")  # fmt: skip
                answer = await anyio.to_thread.run_sync(raw, port, request)
                assert answer.startswith(b"HTTP/1.1 401 "), (token, head, answer[:200])
                assert b"www-authenticate: bearer" in answer.lower()
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            # The right secret, sent as UTF-8 bytes, opens; typed in the form, too.
            good = [(b"Authorization", "Bearer p\u00e4ssw\u00f6rd-\u263a".encode())]
            assert (await http.get("/", headers=good)).status_code == 200
            form = await http.post("/login", data={"secret": "p\u00e4ssw\u00f6rd-\u263a"})
            assert form.status_code == 303 and COOKIE in form.cookies
            # A lone surrogate (UTF-8 of U+D800) in the form: refused, not a 500.
            odd = await http.post("/login", content=b"secret=%ED%A0%80",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert odd.status_code == 403, odd.status_code
    assert await status_of(dsn, task) == "failed"


async def test_a_rotated_secret_file_is_read_again_without_a_restart(
    dsn: str, tmp_path: Path
) -> None:
    from structlog.testing import capture_logs

    new = "rotated-token-0001"
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")

    def rotate(text: str) -> None:
        """As a secret manager does: a new file renamed over the old one."""
        fresh = tmp_path / "token.new"
        fresh.write_text(text)
        os.replace(fresh, path)

    async with dashboard(dsn, Auth.from_file("--token-file", path, "token")) as base, \
            session(base) as signed, httpx.AsyncClient(base_url=base, timeout=30) as http:  # fmt: skip

        async def opens(token: str) -> int:
            return (await http.get("/", headers={"Authorization": f"Bearer {token}"})).status_code

        assert await opens(TOKEN) == 200 and (await signed.get("/")).status_code == 200
        rotate(new + "\n")
        assert await opens(new) == 200
        assert await opens(TOKEN) == 401
        # A new secret signs everyone out, as a restart does.
        assert (await signed.get("/")).status_code == 303
        # Written over in place (same inode), a token of another length: read again too.
        path.write_text(new + "-2\n")
        assert await opens(new + "-2") == 200 and await opens(new) == 401
        with capture_logs() as logs:
            for broken in ("", "short\n", None):
                if broken is None:
                    path.unlink()
                else:
                    rotate(broken)
                # Fail closed: no secret opens, and the form refuses too.
                assert await opens(new + "-2") == 401 and await opens("short") == 401
                refused = await http.post("/login", data={"secret": new + "-2"})
                assert refused.status_code == 403 and COOKIE not in refused.cookies
        said = [e for e in logs if e["event"] == "ui_secret_unusable"]
        # One line a change, naming the file, never the secret.
        assert len(said) == 3, logs
        assert all(e["log_level"] == "error" and str(path) in e["problem"] for e in said), said
        assert "--token-file" in said[0]["problem"] and "8 to" in said[1]["problem"]
        assert not any(new in repr(e) or TOKEN in repr(e) for e in logs), logs
        rotate(TOKEN)
        assert await opens(TOKEN) == 200 and await opens(new + "-2") == 401


# -- injection -----------------------------------------------------------------------------

INSPECT = """() => {
  const bad = [];
  for (const el of document.querySelectorAll('*')) {
    for (const a of el.attributes) {
      if (a.name.startsWith('on')) bad.push(el.tagName + ' ' + a.name);
      if (['href', 'src', 'action', 'xlink:href'].includes(a.name) && /^\\s*javascript:/i.test(a.value))
        bad.push(el.tagName + ' ' + a.name + '=' + a.value);
    }
  }
  return {bad, scripts: Array.from(document.scripts).map(s => s.src),
          imgs: document.images.length, pwned: window.__pwned || 0};
}"""


async def plant_hostile_rows(dsn: str) -> int:
    """Everything a page shows, holding EVIL: written in SQL, past the client's checks."""
    child = await fetchval(
        dsn, "insert into durable.tasks (queue, name, status, finished_at) "
        "values ($1::text, $1::text, 'completed', now()) returning id", EVIL,
    )  # fmt: skip
    value = json.dumps({EVIL: EVIL, "list": [EVIL]})
    error = json.dumps({"type": EVIL, "message": EVIL, "traceback": EVIL})
    task = await fetchval(
        dsn,
        "insert into durable.tasks (queue, name, kind, status, args, result, error, "
        "idempotency_key, tags, attributes, waiting_event, parent_id, finished_at) "
        "values ($1::text, $1::text, 'workflow', 'completed', jsonb_build_array($2::jsonb), "
        "$2::jsonb, $3::jsonb, $1, array[$1::text, 'javascript:alert(1)'], $2::jsonb, $1, $4, "
        "now()) "
        "returning id",
        EVIL, value, error, child,
    )  # fmt: skip
    await execute(
        dsn,
        "insert into durable.events (task_id, branch, seq, kind, name, digest, status, "
        "result, error, child_id, attempt, finished_at) values "
        "($1, 0, 0, 'step', $2, 'd', 'failed', null, $3::jsonb, null, 1, now()), "
        "($1, 0, 1, 'event', $2, 'd', 'completed', $4::jsonb, null, null, 1, now()), "
        "($1, 0, 2, 'child', $2, 'd', 'completed', null, null, $5, 1, now())",
        task, EVIL, error, value, child,
    )  # fmt: skip
    await execute(
        dsn,
        "insert into durable.workers (id, host, pid, queues, names) "
        "values (gen_random_uuid(), $1::text, 1, jsonb_build_object($1::text, 2), array[$1::text])",
        EVIL,
    )
    await execute(
        dsn,
        "insert into durable.definitions (name, kind, queue, max_attempts, priority, retry, "
        "keyed, version, digest, published_by) "
        "values ($1::text, 'task', $1::text, 1, 0, '{}', false, left($1::text, 100), 'd', "
        "gen_random_uuid())",
        EVIL,
    )
    await execute(
        dsn,
        "insert into durable.schedules (name, task_name, cron, timezone, queue, next_run_at, "
        "last_task_id, last_run_at) "
        "values ($1::text, $1::text, $1::text, left($1::text, 100), $1::text, now(), $2, now())",
        EVIL, task,
    )  # fmt: skip
    await execute(dsn, "insert into durable.tasks (queue, name) values ($1::text, $1::text)", EVIL)
    return int(task)


async def test_hostile_text_is_never_markup_in_the_browser_nor_after_a_live_refresh(
    dsn: str,
) -> None:
    task = await plant_hostile_rows(dsn)
    paths = [
        "/", "/tasks", "/tasks?queue=" + quote(EVIL), "/tasks?tag=" + quote(EVIL),
        "/tasks?name=" + quote(EVIL) + "&status=" + quote(EVIL), f"/tasks/{task}",
        f"/tasks/{task}?err={quote(EVIL)}&msg={quote(EVIL)}", "/workers",
        "/tasks?since=" + quote(EVIL),
    ]  # fmt: skip
    async with dashboard(dsn) as base, browser() as page:
        dialogs = watch_dialogs(page)
        for path in paths:
            response = await page.goto(base + path)
            assert response is not None and response.status in (200, 400), path
            await page.wait_for_selector("#live.on")
            if response.status == 200:  # live.js fetched the page again and swapped it in
                await page.wait_for_selector("body[data-refreshed]", state="attached")
            found = await page.evaluate(INSPECT)
            assert found == {"bad": [], "scripts": [base + "/static/live.js"], "imgs": 0,
                             "pwned": 0}, (path, found)  # fmt: skip
            if path in ("/", "/tasks", f"/tasks/{task}", "/workers"):
                assert EVIL in await page.inner_text("main"), path  # shown, as text
        # A notification swaps the regions in again: still text.
        await page.goto(f"{base}/tasks/{task}")
        await page.wait_for_selector("body[data-refreshed]", state="attached")
        before = await page.get_attribute("body", "data-refreshed")
        await execute(dsn, "select pg_notify('durable_ready', $1)", EVIL)
        await page.wait_for_function(
            "b => document.body.getAttribute('data-refreshed') !== b", arg=before
        )
        assert (await page.evaluate(INSPECT))["bad"] == []
        assert dialogs == [] and await page.evaluate("window.__pwned || 0") == 0


async def test_the_event_stream_carries_a_hostile_payload_as_json_data(dsn: str) -> None:
    payload = "x\n\nevent: change\ndata: <script>alert(1)</script>\r\nid: 9\n\n"
    async with dashboard(dsn) as base, httpx.AsyncClient(timeout=30) as http, \
            http.stream("GET", base + "/events") as stream:  # fmt: skip
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            assert await anext(lines) == "retry: 2000"
            await execute(dsn, "select pg_notify('durable_control', $1)", payload)
            seen: list[str] = []
            with anyio.fail_after(20):
                async for line in lines:
                    seen.append(line)
                    if line.startswith("data:") and "durable_control" in line:
                        break
            fields = [line.split(":", 1)[0] for line in seen if line]
            assert set(fields) <= {"event", "data"}, seen
            assert all(line == "event: change" for line in seen if line.startswith("event"))
            data = json.loads(seen[-1][len("data: "):])
            assert data == {"channel": "durable_control", "payload": payload}


async def test_streams_nobody_reads_do_not_stop_the_pages(dsn: str) -> None:
    task = await failed_task(dsn)
    async with dashboard(dsn) as base:
        port = urlsplit(base).port or 0
        idle: list[socket.socket] = []
        try:
            for i in range(40):
                s = socket.create_connection(("127.0.0.1", port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                target = f"/events?task={task}" if i % 2 else "/events"
                s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                idle.append(s)
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                with anyio.fail_after(10):
                    for path in ("/", "/tasks", f"/tasks/{task}", "/workers"):
                        assert (await http.get(path)).status_code == 200, path
        finally:
            for s in idle:
                s.close()


# -- filters and paging -------------------------------------------------------------------

HELD_400 = [
    "/tasks?id=-1", "/tasks?id=0", "/tasks?id=1e9", "/tasks?id=9999999999999999999",
    "/tasks?before=-1", "/tasks?before=abc", "/tasks?before=1%27%3B--",
    "/tasks?status=failed%27%20or%201%3D1--", "/tasks?queue=" + "q" * 2001,
    "/tasks?since=banana", "/tasks?since=inf", "/tasks?since=nan", "/tasks?since=1e308",
    "/tasks?since=99999999d", "/tasks?attr=x:=1e999", "/tasks?tag=%00", "/tasks?attr=a%3D%00",
    "/tasks?tag=" + ",".join(f"t{i}" for i in range(30)),
]  # fmt: skip


async def test_hostile_filters_that_held_give_a_400_quickly(dsn: str) -> None:
    await failed_task(dsn)
    async with dashboard(dsn) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        for path in HELD_400:
            started = time.monotonic()
            page = await http.get(path)
            assert page.status_code == 400, (path, page.status_code)
            assert "role=\"alert\"" in page.text and time.monotonic() - started < 2, path
        # Repeated parameters: the last one counts, and the page answers.
        twice = await http.get("/tasks?status=failed&status=completed&id=1&id=2")
        assert twice.status_code == 200


async def test_a_task_id_past_bigint_in_the_path_is_not_a_500(dsn: str) -> None:
    async with dashboard(dsn) as base, httpx.AsyncClient(base_url=base) as http:
        for path in ("/tasks/9223372036854775808", "/tasks/99999999999999999999"):
            page = await http.get(path)
            assert page.status_code in (400, 404), (path, page.status_code)


async def test_a_superscript_digit_as_branch_or_stream_task_is_not_a_500(dsn: str) -> None:
    task = await failed_task(dsn)
    async with dashboard(dsn) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        page = await http.get(f"/tasks/{task}?branch=%C2%B2")
        assert page.status_code == 200, page.status_code
        async with http.stream("GET", "/events?task=%C2%B2") as stream:
            assert stream.status_code == 200, stream.status_code


async def test_a_nul_in_a_text_filter_is_a_400(dsn: str) -> None:
    async with dashboard(dsn) as base, httpx.AsyncClient(base_url=base) as http:
        for field in ("queue", "name", "key"):
            page = await http.get(f"/tasks?{field}=a%00b")
            assert page.status_code == 400, (field, page.status_code)


async def test_a_time_filter_at_the_calendar_edge_is_a_400(dsn: str) -> None:
    async with dashboard(dsn) as base, httpx.AsyncClient(base_url=base) as http:
        for query in ("since=0001-01-01T00:00%2B05:00", "until=9999-12-31T23:59-05:00"):
            page = await http.get("/tasks?" + query)
            assert page.status_code in (200, 400), (query, page.status_code)


# -- actions -------------------------------------------------------------------------------


async def test_actions_on_finished_tasks_and_a_double_submit_say_so_in_one_line(
    dsn: str, tmp_path: Path
) -> None:
    task = await failed_task(dsn)
    async with dashboard(dsn, token_auth(tmp_path)) as base, session(base) as http:
        csrf = await csrf_of(http, task)

        async def act(what: str, **form: str) -> str:
            return await flash(
                http, await http.post(f"/tasks/{task}/{what}", data={"csrf": csrf, **form})
            )

        assert await act("cancel") == f"task {task} had finished"
        assert await act("event", name="go", payload="{}") == f"task {task} has finished: not sent"
        assert (await act("event", name="go", payload="{nope")).startswith("error: event payload")
        assert (await act("event", name="go", payload='"\\u0000"')).startswith("error: payload")
        assert (await act("fork", at="-1")).startswith("error: fork: at must be")
        assert (await act("explode")).startswith("error: no action")
        assert (await act("retry")) == f"task {task} retried"
        again = await act("retry")  # the same form, posted twice
        assert again.startswith(f"error: task {task} is queued: only a finished task"), again
        assert await status_of(dsn, task) == "queued"
        # An id past bigint, on an action: one line, not a 500.
        huge = await http.post("/tasks/99999999999999999999/retry", data={"csrf": csrf})
        assert (await flash(http, huge)).startswith("error: the database refused")


async def test_the_event_form_posted_twice_delivers_the_event_once(
    dsn: str, tmp_path: Path
) -> None:
    """A double click, or the browser sending the form again after a reload: the form's
    one-time key delivers it once; the form drawn again sends anew."""
    flow = int(await fetchval(
        dsn, "insert into durable.tasks (queue, name, kind, status) "
        "values ('atk', 'atk_flow', 'workflow', 'queued') returning id",
    ))  # fmt: skip

    async def event_form(http: httpx.AsyncClient) -> dict[str, str]:
        page = await http.get(f"/tasks/{flow}")
        form = re.search(r'<form[^>]*action="/tasks/\d+/event".*?</form>', page.text, re.S)
        assert form is not None, page.text
        fields = dict(re.findall(r'name="(\w+)" value="([^"]*)"', form.group(0)))
        assert {"csrf", "back", "key"} <= set(fields), fields
        return {**fields, "name": "go", "payload": '{"n": 1}'}

    async with dashboard(dsn, token_auth(tmp_path)) as base, session(base) as http:
        form = await event_form(http)
        for _ in range(3):
            assert await flash(http, await http.post(f"/tasks/{flow}/event", data=form)) == \
                "event 'go' sent"  # fmt: skip
        signals = "select count(*) from durable.signals where task_id = $1"
        assert await fetchval(dsn, signals, flow) == 1
        again = await event_form(http)
        assert again["key"] != form["key"]
        await http.post(f"/tasks/{flow}/event", data=again)
        assert await fetchval(dsn, signals, flow) == 2
        # A key no index could hold: one line, nothing sent.
        huge = await http.post(f"/tasks/{flow}/event", data={**again, "key": "k" * 3000})
        assert (await flash(http, huge)).startswith("error: idempotency_key must be at most")
        assert await fetchval(dsn, signals, flow) == 2


async def test_a_flash_message_cannot_be_forged_by_a_link(dsn: str, tmp_path: Path) -> None:
    """A link to the real dashboard saying what its sender likes shows nothing: an outcome
    shows only to the session whose action it was, for a minute."""
    from durable.ui.flash import Flashes

    task = await failed_task(dsn)
    lie = "Your session expired: paste your token at evil.example"
    fake = Flashes().seal("any", "error", lie)
    forged = [
        f"?err={quote(lie)}", f"?msg={quote(lie)}", f"?flash={quote(fake)}",
        f"?flash={quote(fake.split('.')[0])}.{'0' * 64}", "?flash=%C3%A9.%C3%A9", "?flash=..",
    ]  # fmt: skip
    async with dashboard(dsn, token_auth(tmp_path)) as base, browser() as page:
        await sign_in(page, base)
        for query in forged:
            await page.goto(f"{base}/tasks/{task}{query}")
            assert await page.locator("p.flash").count() == 0, query
            assert lie not in await page.inner_text("main"), query
        # The real outcome: after the redirect, after a reload.
        await page.click("#action-retry")
        assert await page.inner_text("[role=status]") == f"task {task} retried"
        await page.reload()
        assert await page.inner_text("[role=status]") == f"task {task} retried"
        # The same link, opened by another session: nothing.
        async with session(base) as other:
            assert shown(await other.get(page.url)) == []
    # Sealed for a session, it opens for that session only, and only for a minute.
    flashes = Flashes()
    sealed = flashes.seal("sid", "ok", "done", now=1000.0)
    assert flashes.open("sid", sealed, now=1059.0) == ("ok", "done")
    assert flashes.open("sid", sealed, now=1061.0) is None
    assert flashes.open("other", sealed, now=1001.0) is None
    assert Flashes().open("sid", sealed, now=1001.0) is None  # a restart draws a new key


async def test_a_deeply_nested_event_payload_is_refused_in_one_line(
    dsn: str, tmp_path: Path
) -> None:
    task = await failed_task(dsn, "workflow")
    async with dashboard(dsn, token_auth(tmp_path)) as base, session(base) as http:
        csrf = await csrf_of(http, task)
        sent = await http.post(
            f"/tasks/{task}/event", data={"csrf": csrf, "name": "go", "payload": "[" * 100_000}
        )
        assert sent.status_code == 303, sent.status_code


async def test_a_fork_past_the_end_or_of_a_plain_task_is_refused(
    dsn: str, tmp_path: Path
) -> None:
    plain = await failed_task(dsn)
    flow = await failed_task(dsn, "workflow")
    async with dashboard(dsn, token_auth(tmp_path)) as base, session(base) as http:
        csrf = await csrf_of(http, flow)
        past = await flash(
            http, await http.post(f"/tasks/{flow}/fork", data={"csrf": csrf, "at": "999"})
        )
        of_plain = await flash(
            http, await http.post(f"/tasks/{plain}/fork", data={"csrf": csrf, "at": "0"})
        )
        assert past.startswith("error:") and "past the end" in past, past
        assert of_plain.startswith("error:") and "not a workflow" in of_plain, of_plain


async def test_a_bulk_retry_past_its_limit_says_what_it_left(dsn: str, tmp_path: Path) -> None:
    await execute(
        dsn,
        "insert into durable.tasks (queue, name, status, finished_at) "
        "select 'bulk', 'atk_bulk', 'failed', now() from generate_series(1, 10050)",
    )
    some = int(await fetchval(dsn, "select max(id) from durable.tasks"))
    async with dashboard(dsn, token_auth(tmp_path)) as base, session(base) as http:
        csrf = await csrf_of(http, some)
        # 10,000 retries in one request: seconds on a loaded machine, past httpx's 5 s.
        done = await flash(http, await http.post(
            "/tasks/retry?status=failed&queue=bulk", data={"csrf": csrf}, timeout=120
        ))
        queued = await fetchval(dsn, "select count(*) from durable.tasks where status = 'queued'")
        assert queued == 10_000 and done.startswith("retried 10000"), done
        assert "10050" in done or "limit" in done or "50" in done.split("of", 1)[1], done

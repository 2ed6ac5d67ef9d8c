"""The dashboard as a Starlette application: server-rendered pages (Jinja2), forms for
the actions, and /events, the server-sent events that keep pages live."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from durable.admin import Admin
from durable.errors import DurableError
from durable.logs import get_logger, redact
from durable.models import TERMINAL, TaskFilter
from durable.store import DatabaseError, Store
from durable.ui import views
from durable.ui.auth import COOKIE, SESSION_SECONDS, Auth
from durable.ui.flash import PARAM, Flashes, with_flash
from durable.ui.hosts import HostCheck, Hosts
from durable.ui.live import TICK, LiveHub, sse
from durable.validation import InvalidValue

log = get_logger("durable.ui")
HERE = Path(__file__).parent
LIVE_WITHIN = 60.0
"""A daemon heard from within this many seconds serves; past it, it is lost."""
BULK_LIMIT = 10_000
"""Most tasks one bulk retry acts on."""
READ_ONLY = (
    "read-only: start the dashboard with --token-file or --password-file to enable actions"
)

Probe = Callable[[], Awaitable[tuple[int, str, bytes]]]


class Dashboard:
    """The pages over one store; ``auth`` None makes it read-only."""

    def __init__(self, store: Store, hub: LiveHub, auth: Auth | None) -> None:
        self.store = store
        self.admin = Admin(store)
        self.hub = hub
        self.auth = auth
        self.flashes = Flashes()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals.update(duration=views.duration_text, ago=self._ago)
        self._guessing = asyncio.Lock()
        """Held through the pause after a wrong secret: guesses, by the form or by header,
        in parallel or not, come one at a time, at most two a second."""

    def _ago(self, when: datetime | None) -> str:
        if when is None:
            return "-"
        seconds = (self.store.now() - when).total_seconds()
        return views.duration_text(abs(seconds)) + (" ago" if seconds >= 0 else " from now")

    # -- plumbing -----------------------------------------------------------------------

    def session(self, request: Request) -> str | None:
        if self.auth is None:
            return None
        sid = self.auth.session(request.cookies.get(COOKIE))
        bearer = _bearer(request)
        if sid is None and bearer is not None and self.auth.check_secret(bearer):
            sid = "bearer"
        return sid

    async def signed_in(self, request: Request) -> str | None:
        """``session``, paying for a wrong secret in a header as the sign-in form does."""
        sid = self.session(request)
        if sid is None and _bearer(request) is not None:
            await self._wrong_secret()
        return sid

    def refused(self, request: Request) -> Response | None:
        """A request with a wrong Bearer header: 401, as HTTP has it for a bad credential."""
        if _bearer(request) is None:
            return None
        return PlainTextResponse("refused: wrong Bearer token", 401,
                                 headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})  # fmt: skip

    async def _wrong_secret(self) -> None:
        async with self._guessing:
            await anyio.sleep(0.5)

    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        sid = self.session(request)
        said = self.flashes.open(sid or "", request.query_params.get(PARAM))
        kind, text = said if said is not None else ("", None)
        return self.templates.TemplateResponse(
            request, template,
            {"auth": self.auth, "can_act": sid is not None,
             "csrf": self.auth.csrf(sid) if self.auth is not None and sid else "",
             "read_only": READ_ONLY, "message": text if kind == "ok" else None,
             "error": text if kind == "error" else None, "now": self.store.now(), **context},
            status_code=status,
            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                     "Content-Security-Policy": "default-src 'self'; style-src 'self'; "
                     "img-src 'self' data:; frame-ancestors 'none'"},
        )  # fmt: skip

    def guard(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Pages: with a secret configured, only for a signed-in session."""

        async def guarded(request: Request) -> Response:
            if self.auth is not None and await self.signed_in(request) is None:
                login = RedirectResponse("/login?next=" + quote(request.url.path), 303)
                return self.refused(request) or login
            return await handler(request)

        return guarded

    def action(
        self, handler: Callable[[Request, dict[str, str]], Awaitable[str]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Forms that act: refused without a secret, a session, its CSRF token and, when
        the browser names one, our own origin. Redirects back with a one-line outcome."""

        async def acting(request: Request) -> Response:
            if self.auth is None:
                return PlainTextResponse(READ_ONLY, 403)
            sid = await self.signed_in(request)
            if sid is None:
                return self.refused(request) or PlainTextResponse("sign in first", 403)
            form, refused = await self._checked_form(request, sid)
            if refused is not None:
                return refused
            back = form.get("back") or "/"
            if not back.startswith("/") or back.startswith("//"):
                back = "/"
            try:
                kind, said = "ok", await handler(request, form)
            except (DurableError, InvalidValue, ValueError) as exc:
                kind, said = "error", str(exc)
            except DatabaseError as exc:
                kind, said = "error", redact(f"the database refused: {exc}").splitlines()[0]
            return RedirectResponse(with_flash(back, self.flashes.seal(sid, kind, said)), 303)

        return acting

    async def _checked_form(
        self, request: Request, sid: str
    ) -> tuple[dict[str, str], Response | None]:
        """The form posted, or why it is refused: from another site, or without the CSRF
        token of its session (a Bearer header carries none)."""
        assert self.auth is not None
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return {}, PlainTextResponse("refused: the form came from another site", 403)
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        if sid != "bearer" and not self.auth.check_csrf(sid, form.get("csrf")):
            return form, PlainTextResponse("refused: missing or wrong CSRF token", 403)
        return form, None

    # -- pages ---------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        depth, _health = await self.store.queue_depth()
        finished = await self.store.dashboard.finished_last_hour()
        limits = {q.name: q for q in await self.admin.queue_limits()}
        workers = await self.admin.workers()
        live = [w for w in workers if w.stopped_at is None and w.silence < LIVE_WITHIN]
        charts = views.charts(finished)
        queues = sorted({*(d[0] for d in depth), *charts, *limits, *(q for w in live for q in w.queues)})
        by_queue = {d[0]: d for d in depth}
        rows = [
            {
                "name": q,
                "queued": by_queue.get(q, (q, 0, 0, 0, None))[1],
                "running": by_queue.get(q, (q, 0, 0, 0, None))[2],
                "waiting": by_queue.get(q, (q, 0, 0, 0, None))[3],
                "oldest": by_queue.get(q, (q, 0, 0, 0, None))[4],
                "chart": charts.get(q),
                "limit": limits.get(q),
                "daemons": [w for w in live if q in w.queues],
            }
            for q in queues
        ]
        return self.page(
            request, "overview.html", queues=rows, unserved=await self.admin.unserved(LIVE_WITHIN),
            schedules=await self.admin.schedules(), live=len(live), title="Overview",
        )  # fmt: skip

    async def tasks(self, request: Request) -> Response:
        params = {k: v for k, v in request.query_params.items() if k != PARAM}
        try:
            f, before = views.task_filter(params, self.store.now())
        except InvalidValue as exc:
            return self.page(request, "tasks.html", 400, rows=[], filter_error=str(exc),
                             searched=None, params=params, next_query=None,
                             title="Tasks")  # fmt: skip
        page = await self.admin.search_page(f, before=before, size=views.PAGE)
        next_query = (
            views.filter_query(params, before=str(page.next_before))
            if page.next_before is not None else None
        )  # fmt: skip
        return self.page(
            request, "tasks.html", rows=page.rows, params=params, filter_error=None,
            searched=page.searched,
            next_query=next_query, first_query=views.filter_query(params, before=None),
            paged=before is not None, bulk=views.filter_query(params, before=None),
            title="Tasks",
        )  # fmt: skip

    async def task(self, request: Request) -> Response:
        task_id = int(request.path_params["task_id"])
        info = await self.store.get_task(task_id) if task_id < 2**63 else None
        if info is None:
            return self.page(request, "missing.html", 404, task_id=task_id, title="No such task")
        branches = await self.store.branches(task_id) or [info.branch]
        raw = request.query_params.get("branch", "")
        branch = int(raw) if _digits(raw) and int(raw) in branches else info.branch
        history = await self.store.history(task_id, branch)
        tags, attributes = await self.store.dashboard.task_labels(task_id)
        bars, ticks = views.timeline(history, info.created_at, info.finished_at, self.store.now())
        values = {
            "args": views.shown_json(info.args if not info.kwargs else
                                     {"args": info.args, "kwargs": info.kwargs}),
            "result": views.shown_json(info.result) if info.status == "completed" else None,
        }  # fmt: skip
        return self.page(
            request, "task.html", info=info, branches=branches, branch=branch, history=history,
            bars=bars, ticks=ticks, values=values, tags=tags, attributes=attributes,
            children=await self.store.dashboard.children(task_id), cut=views.cut,
            title=f"Task {task_id}", event_key=secrets.token_urlsafe(18),
            finished=info.status in TERMINAL,
        )  # fmt: skip

    async def workers(self, request: Request) -> Response:
        workers = await self.admin.workers(200)
        definitions = await self.admin.definitions(LIVE_WITHIN)
        return self.page(request, "workers.html", workers=workers, live_within=LIVE_WITHIN,
                         definitions=definitions, title="Definitions and workers")  # fmt: skip

    # -- live ----------------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        raw = request.query_params.get("task", "")
        task_id = int(raw) if _digits(raw) and 0 < int(raw) < 2**63 else None

        async def stream() -> AsyncIterator[bytes]:
            async with self.hub.subscribe() as queue:
                # Subscribed and the task's state read before the page hears the stream
                # is open: the page then reloads once (live.js), which covers whatever
                # changed between its rendering and now; anything later reaches it here.
                seen = await self.store.dashboard.task_progress(task_id) if task_id else None
                yield b"retry: 2000\n\n"
                while not self.hub.closing:
                    with anyio.move_on_after(1.0 if task_id is not None else TICK) as timer:
                        channel, payload = await queue.get()
                        if self.hub.closing:
                            return
                        # Coalesce a burst into one event: the page reloads once.
                        await asyncio.sleep(0.2)
                        while not queue.empty():
                            queue.get_nowait()
                        yield sse("change", {"channel": channel, "payload": payload})
                        continue
                    if timer.cancelled_caught:
                        if task_id is None:
                            yield sse("change", {"channel": "tick", "payload": ""})
                            continue
                        # The task's own row and event count: a workflow's steps notify
                        # nothing, so its page looks again while it runs.
                        now = await self.store.dashboard.task_progress(task_id)
                        if now != seen:
                            yield sse("change", {"channel": "progress", "payload": str(task_id)})
                        seen = now

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # -- sign in --------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        target = request.query_params.get("next", "/")
        if self.auth is None:
            return RedirectResponse("/", 303)
        if request.method == "GET":
            return self.page(request, "login.html", next=target, failed=False, title="Sign in")
        form = await request.form()
        given = form.get("secret")
        target = str(form.get("next") or "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        if not isinstance(given, str) or not self.auth.check_secret(given):
            await self._wrong_secret()
            return self.page(request, "login.html", 403, next=target, failed=True, title="Sign in")
        response = RedirectResponse(target, 303)
        response.set_cookie(
            COOKIE, self.auth.new_session(), max_age=SESSION_SECONDS, httponly=True,
            samesite="strict", secure=request.url.scheme == "https",
        )  # fmt: skip
        return response

    async def logout(self, request: Request) -> Response:
        """A form like the actions (our origin, the session's CSRF token): the session
        ends for good, whatever kept a copy of its cookie."""
        sid = self.session(request)
        if self.auth is not None and sid is not None and sid != "bearer":
            _form, refused = await self._checked_form(request, sid)
            if refused is not None:
                return refused
            self.auth.end(request.cookies.get(COOKIE))
        response = RedirectResponse("/login" if self.auth else "/", 303)
        response.delete_cookie(COOKIE)
        return response

    # -- actions --------------------------------------------------------------------------

    async def act(self, request: Request, form: dict[str, str]) -> str:
        task_id = int(request.path_params["task_id"])
        what = request.path_params["what"]
        if what == "retry":
            await self.store.restart(task_id, "retry")
            return f"task {task_id} retried"
        if what == "replay":
            branch = await self.store.restart(task_id, "replay")
            return f"task {task_id} replayed on branch {branch}"
        if what == "fork":
            at = form.get("at", "")
            if not _digits(at):
                raise InvalidValue(f"fork: at must be an event position (0, 1, ...), got {at!r}")
            info = await self.store.get_task(task_id) if task_id < 2**63 else None
            if info is not None and info.kind != "workflow":
                raise InvalidValue(
                    f"fork: task {task_id} is a plain task, not a workflow: it has no event "
                    "log to fork (retry runs it again)"
                )
            if info is not None:
                log = await self.store.history(task_id, info.branch)
                events = log[-1].seq + 1 if log else 0  # as durable.restart counts it
                if int(at) > events:
                    raise InvalidValue(
                        f"fork: {at} is past the end of the event log (branch {info.branch} "
                        f"has {events} event(s)): give 0 to {events}"
                    )
            branch = await self.store.restart(task_id, "fork", int(at))
            return f"task {task_id} forked at {at} on branch {branch}"
        if what == "cancel":
            hit = await self.store.cancel([task_id])
            ended = [i for i, _s, done in hit if not done]
            return f"cancelled {len(ended)} task(s)" if ended else f"task {task_id} had finished"
        if what == "event":
            name = form.get("name", "")
            text = form.get("payload", "").strip() or "null"
            try:
                payload = json.loads(text)
            except ValueError:
                raise InvalidValue(f"event payload: expected JSON, got {text[:60]!r}") from None
            except RecursionError:
                raise InvalidValue("event payload: nested too deeply") from None
            from durable.codec import dumps
            from durable.validation import idempotency_key
            from durable.validation import text as valid_text

            valid_text(name, "event name")
            # The form's one-time key: the same form posted again (a double click, a
            # browser resending it) delivers nothing more.
            key = form.get("key") or None
            if key is not None:
                key = f"dashboard:{key}"
                idempotency_key(key)
            sent = await self.store.send_event(task_id, name, dumps(payload, what="payload"), key)
            return f"event {name!r} sent" if sent else f"task {task_id} has finished: not sent"
        raise InvalidValue(f"no action {what!r}")

    async def bulk_retry(self, request: Request, form: dict[str, str]) -> str:
        f, _ = views.task_filter(dict(request.query_params), self.store.now())
        statuses = tuple(s for s in (f.statuses or ("failed",)) if s in ("failed", "cancelled"))
        if not statuses:
            raise InvalidValue("bulk retry: filter by status failed or cancelled")
        wanted = TaskFilter(**{**vars(f), "statuses": statuses})
        ids: list[int] = []
        before = None
        while len(ids) < BULK_LIMIT:
            page = await self.admin.search_tasks(wanted, before=before, limit=1000)
            if not page:
                break
            ids += [t.id for t in page]
            before = page[-1].id
        more = len(ids) >= BULK_LIMIT and bool(
            await self.admin.search_tasks(wanted, before=before, limit=1)
        )
        ids = ids[:BULK_LIMIT]
        retried = 0
        for i in range(0, len(ids), 1000):
            retried += await self.admin.retry_many(ids[i : i + 1000], statuses)
        if more:
            return (
                f"retried {retried} of the newest {len(ids)} matching task(s): more match, "
                f"past the limit of {BULK_LIMIT} one retry takes; retry again for the rest"
            )
        return f"retried {retried} of {len(ids)} matching task(s)"


def create_app(
    store: Store, hub: LiveHub, auth: Auth | None, probes: dict[str, Probe] | None = None,
    hosts: Hosts | None = None,
) -> Starlette:
    """The dashboard's application; ``probes`` adds the daemon's /healthz, /readyz,
    /metrics when it serves the dashboard on DURABLE_HTTP; ``hosts``, the names it answers
    to (durable.ui.hosts; the probes answer to any)."""
    d = Dashboard(store, hub, auth)
    routes = [
        Route("/", d.guard(d.overview)),
        Route("/tasks", d.guard(d.tasks)),
        Route("/tasks/{task_id:int}", d.guard(d.task)),
        Route("/workers", d.guard(d.workers)),
        Route("/events", d.guard(d.events)),
        Route("/login", d.login, methods=["GET", "POST"]),
        Route("/logout", d.logout, methods=["POST"]),
        Route("/tasks/retry", d.action(d.bulk_retry), methods=["POST"]),
        Route("/tasks/{task_id:int}/{what}", d.action(d.act), methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    for path, probe in (probes or {}).items():
        routes.append(Route(path, _probe(probe), methods=["GET", "HEAD"]))
    middleware = (
        [] if hosts is None else [Middleware(HostCheck, hosts=hosts, exempt=list(probes or {}))]
    )
    return Starlette(routes=routes, middleware=middleware, exception_handlers={Exception: _failed})


def _probe(probe: Probe) -> Callable[[Request], Awaitable[Response]]:
    async def respond(_request: Request) -> Response:
        status, ctype, body = await probe()
        return Response(body, status, media_type=ctype, headers={"Cache-Control": "no-store"})

    return respond


async def _failed(request: Request, exc: Exception) -> Response:
    log.error("ui_handler_error", path=request.url.path, error=redact(f"{type(exc).__name__}: {exc}"))
    return HTMLResponse("<h1>Internal error</h1><p>See the dashboard's log.</p>", 500)


def _bearer(request: Request) -> bytes | None:
    """The token of an ``Authorization: Bearer`` header as the bytes sent (Starlette reads
    a header as Latin-1, which gives them back whatever they were), else None."""
    header = request.headers.get("authorization", "")
    return header[7:].encode("latin-1") if header.startswith("Bearer ") else None


def _digits(text: str) -> bool:
    """Only the ASCII digits ``int`` reads ("²" is a digit to ``str.isdigit``)."""
    return text.isascii() and text.isdigit()

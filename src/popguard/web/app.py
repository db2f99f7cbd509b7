"""The operator's web page: server-rendered screens (Jinja2), one Server-Sent Events
stream per tab, the operators' actions behind a CSRF token, and logins slowed as
POP3's are.

Nothing secret is handed to a template: the screens carry rows of the commands'
data (transcripts have their passwords redacted by the probes), never the API token,
a mailbox's password or a health mailbox's credentials.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from popguard.directory.directory import COMPONENT_STATES, Directory
from popguard.directory.web_users import find_web_user, verified_user
from popguard.errors import UserError
from popguard.health import api_client
from popguard.web import actions, screens
from popguard.web.events import EventLog, Snapshot
from popguard.web.sessions import LOGIN_COOKIE, SESSION_COOKIE, Session, Sessions

REFRESH_SECONDS = 10  # without JavaScript, a page reloads itself this often
KEEPALIVE_SECONDS = 15.0  # a comment on an idle stream, so proxies keep it open
FEED_SHOWN = 200
LATEST_SHOWN = 8  # the organization page's newest events: what was found, what was done
MAX_FORM_SIZE = 16 * 1024
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _environment() -> jinja2.Environment:
    templates = resources.files("popguard.web") / "templates"
    loader = jinja2.FunctionLoader(lambda name: (templates / name).read_text())
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    env.filters["state_icon"] = lambda value: STATE_ICONS.get(str(value), "?")
    return env


# State is told by a word and a sign as well as a colour.
STATE_ICONS = {"Healthy": "✔", "Degraded": "▲", "Unhealthy": "✖", "Repairing": "⚙",
               "Disabled": "○", "Unknown": "?"}  # fmt: skip


@dataclass
class WebPage:
    data: Path
    log: EventLog
    secure: bool  # served over TLS: the cookies say Secure
    sessions: Sessions

    def app(self) -> web.Application:
        self.env = _environment()
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_FORM_SIZE)
        static = Path(str(resources.files("popguard.web") / "static"))
        app.add_routes(
            [
                web.get("/login", self._login_form),
                web.post("/login", self._login),
                web.post("/logout", self._logout),
                web.get("/", self._organization),
                web.get("/servers/{name}", self._server),
                web.get("/probe", self._probe),
                web.get("/recovery", self._recovery),
                web.get("/copies", self._copies),
                web.get("/events", self._events),
                web.get("/stream", self._stream),
                web.post("/actions/{name}", self._action),
                web.static("/static", static),
            ]
        )
        return app

    # Guarding every request ---------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        open_paths = request.path in ("/login", "/favicon.ico") or request.path.startswith(
            "/static/"
        )
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None and await self._gone(session):
            self.sessions.drop(session.token)
            session = None
        request["session"] = session
        try:
            if session is None and not open_paths:
                if request.method == "GET" and request.path != "/stream":
                    raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
                raise web.HTTPUnauthorized(text="log in first (/login)")
            if request.method == "POST" and request.path != "/login":
                form = await request.post()
                assert session is not None
                if not session.csrf_matches(str(form.get("csrf", ""))):
                    raise web.HTTPForbidden(text="a valid CSRF token is required with every POST")
            response = await handler(request)
        except UserError as exc:
            response = self._render(request, "error.html", status=400, message=str(exc))
        self._headers(response)
        return response

    async def _gone(self, session: Session) -> bool:
        """A user removed from the directory loses the sessions they had."""
        user = await asyncio.to_thread(self._user, session.user)
        return user is None or user.role != session.role

    def _user(self, name: str) -> Any:
        with Directory(self.data) as directory:
            return find_web_user(directory, name)

    @staticmethod
    def _headers(response: web.StreamResponse) -> None:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if response.content_type == "text/html":
            response.headers.setdefault("Cache-Control", "no-store")

    def _render(self, request: web.Request, template: str, status: int = 200,
                **context: Any) -> web.Response:  # fmt: skip
        session: Session | None = request.get("session")
        context.setdefault("title", "popguard")
        html = self.env.get_template(template).render(
            session=session,
            path=request.path_qs,
            refresh=REFRESH_SECONDS,
            last_event=self.log.last_id,
            states=COMPONENT_STATES,
            done=self._done(request),
            **context,
        )
        return web.Response(text=html, content_type="text/html", status=status)

    def _done(self, request: web.Request) -> str:
        return request.query.get("done", "")[:500]

    async def _gather(self, gather: Callable[[Directory], Any]) -> Any:
        def run() -> Any:
            with Directory(self.data) as directory:
                return gather(directory)

        return await asyncio.to_thread(run)

    # Logging in ---------------------------------------------------------------------

    def _cookie(self, response: web.StreamResponse, name: str, value: str) -> None:
        response.set_cookie(name, value, httponly=True, samesite="Strict", secure=self.secure,
                            path="/")  # fmt: skip

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        # The token already given stays: a second login form (another tab, the
        # browser's own requests) must not void the first one's.
        token = request.cookies.get(LOGIN_COOKIE, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", token):
            token = secrets.token_urlsafe(32)
        response = self._render(request, "login.html", csrf=token, error="",
                                next=_local(request.query.get("next", "/")))  # fmt: skip
        self._cookie(response, LOGIN_COOKIE, token)
        return response

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        given, expected = str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not secrets.compare_digest(given.encode(), expected.encode()):
            raise web.HTTPForbidden(text="a valid CSRF token is required with every POST")
        name, password = str(form.get("user", "")).strip(), str(form.get("password", ""))
        client = request.remote or ""
        # POP3's rule: a guess waits out the delay the earlier failures earned, then
        # fails slower each time, per address and per user.
        await asyncio.sleep(self.sessions.delays.wait_before(client, name))
        user = await asyncio.to_thread(self._verify, name, password)
        if user is None:
            await asyncio.sleep(self.sessions.delays.record_failure(client, name))
            token = secrets.token_urlsafe(32)
            response = self._render(request, "login.html", status=401, csrf=token,
                                    error="wrong user name or password",
                                    next=_local(str(form.get("next", "/"))))  # fmt: skip
            self._cookie(response, LOGIN_COOKIE, token)
            return response
        self.sessions.delays.record_success(client, name)
        session = self.sessions.create(user.name, user.role)
        response = web.HTTPSeeOther(_local(str(form.get("next", "/"))))
        self._cookie(response, SESSION_COOKIE, session.token)
        response.del_cookie(LOGIN_COOKIE, path="/")
        return response

    def _verify(self, name: str, password: str) -> Any:
        with Directory(self.data) as directory:
            return verified_user(directory, name, password)

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    # Screens ------------------------------------------------------------------------

    async def _organization(self, request: web.Request) -> web.StreamResponse:
        org = await self._gather(lambda d: screens.organization(self.data, d))
        latest = self.log.newest_first(LATEST_SHOWN)
        return self._render(request, "organization.html", org=org, title="Organization",
                            events=latest, when=screens.api_time)  # fmt: skip

    async def _server(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        view = await self._gather(lambda d: screens.server(self.data, d, name))
        return self._render(request, "server.html", view=view, title=view.name)

    async def _probe(self, request: web.Request) -> web.StreamResponse:
        server = request.query.get("server", "")
        identity = request.query.get("identity", "")
        resource = request.query.get("resource", "")
        if not server or not identity:
            raise UserError("a probe screen needs ?server=NAME&identity=SET\\PROBE&resource=...")
        view = await self._gather(lambda d: screens.probe(self.data, d, server, identity,
                                                          resource))  # fmt: skip
        return self._render(request, "probe.html", view=view, title=identity)

    async def _recovery(self, request: web.Request) -> web.StreamResponse:
        view = await self._gather(lambda d: screens.recovery(self.data, d))
        return self._render(request, "recovery.html", view=view, title="Recovery and alerts")

    async def _copies(self, request: web.Request) -> web.StreamResponse:
        rows = await self._gather(screens.copies)
        servers = await self._gather(lambda d: [s.name for s in d.list_servers()
                                                if "mailbox" in s.roles])  # fmt: skip
        return self._render(request, "copies.html", rows=rows, servers=servers,
                            title="Database copies")  # fmt: skip

    async def _events(self, request: web.Request) -> web.StreamResponse:
        events = self.log.newest_first(FEED_SHOWN)
        return self._render(request, "events.html", events=events, title="Events",
                            when=screens.api_time)  # fmt: skip

    # Live ---------------------------------------------------------------------------

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: every event after the one the page saw last (its
        Last-Event-ID on a reconnect, ?last= on the first connect: the id the page
        was rendered with), then each new one as it comes."""
        given = request.headers.get("Last-Event-ID") or request.query.get("last", "")
        try:
            last = int(given) if given else self.log.last_id
        except ValueError:
            raise web.HTTPBadRequest(text="Last-Event-ID is an event id (a number)") from None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store"})  # fmt: skip
        self._headers(response)
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        deadline = time.monotonic() + KEEPALIVE_SECONDS
        while True:
            events = self.log.after(last)
            if events is None:  # missed more than the log keeps: the page reloads
                await response.write(_sse(self.log.last_id, "reset", {"text": "reload"}))
                last = self.log.last_id
                continue
            for event in events:
                data = {"text": event.text, "at": screens.api_time(event.at), **event.data}
                await response.write(_sse(event.id, event.kind, data))
                last = event.id
            if time.monotonic() > deadline:
                await response.write(b": keepalive\n\n")
                deadline = time.monotonic() + KEEPALIVE_SECONDS
            await self.log.wait(last, KEEPALIVE_SECONDS)

    # Actions ------------------------------------------------------------------------

    async def _action(self, request: web.Request) -> web.StreamResponse:
        session: Session = request["session"]
        if not session.is_operator:
            raise web.HTTPForbidden(text="viewers see everything and change nothing")
        form = {k: str(v) for k, v in (await request.post()).items()}
        name = request.match_info["name"]
        back = _local(form.get("back", "/"))
        try:
            done = await asyncio.to_thread(actions.run, self.data, name, form, session.user)
        except UserError as exc:
            return self._render(request, "error.html", status=400, message=str(exc), back=back)
        separator = "&" if "?" in back else "?"
        return web.HTTPSeeOther(f"{back}{separator}{urlencode({'done': done.result})}")


def _sse(event_id: int, kind: str, data: dict[str, Any]) -> bytes:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def _local(target: str) -> str:
    """Only a path on this site: a login link must not send anyone elsewhere."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def look(data: Path, seen_changes: dict[str, int]) -> Snapshot:
    """What the watcher compares: the cells, the actions, the alerts, where each
    database is active, the operators' actions; and the health sets' changes each
    server recorded after the Id in `seen_changes` (all it keeps for one not in it)."""
    with Directory(data) as directory:
        org = screens.organization(data, directory)
        actions_rows = api_client.ask_each(data, directory, None, "recoveryactions")
        alert_rows = api_client.ask_each(data, directory, None, "alerts")
        change_rows = api_client.ask_each(
            data, directory, None,
            lambda server: f"healthsetchanges?after={seen_changes.get(server, 0)}",
        )  # fmt: skip
        operator = screens.operator_actions(directory)
    unanswered = frozenset(
        str(r["Server"]) for r in actions_rows + alert_rows + change_rows if "Error" in r
    )
    return Snapshot(
        cells=org.cells,
        actions={(r["Server"], r["Id"]): r for r in actions_rows if "Id" in r},
        alerts={(r["Server"], r["Id"]): r for r in alert_rows if "Id" in r},
        active={d["Name"]: d["ActiveServer"] for d in org.databases},
        operator={r["Id"]: r for r in operator},
        set_changes=[r for r in change_rows if "Id" in r],
        answered=frozenset(org.servers) - unanswered,
        unanswered=unanswered,
    )

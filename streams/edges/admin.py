"""`messenger-streams admin`: the self-serve onboarding page (server-rendered aiohttp, no JavaScript).

The product document's flow: the pages list with their status and the "Activate Facebook source"
toggle; "Log in with Facebook" (Facebook Login's OAuth dialog → code → long-lived user token →
`/me/accounts`); a checklist of the user's pages with a skill each; routing mode and default
skill; the external user's agent id and nickname; Done. Every change goes through the same
`Onboarding` rules as `messenger-streams pages` and is live in every worker and dispatcher within
seconds.

Security: one admin password (MESSENGER_STREAMS_ADMIN_PASSWORD, compared in constant time), a
random session id in an HttpOnly SameSite=Lax cookie (Secure when the public URL is https), a CSRF
token on every form, an OAuth `state` bound to the session, no page token ever rendered (the
tokens from /me/accounts stay in the server-side session until Done, then are stored encrypted),
no query strings in logs, and it binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from schemas.pages import PageActivity
from streams.core.config import ConfigError, ConnectorConfig, load_config
from streams.core.mirror import MirrorError, TopicMirror
from streams.core.pages import PageDirectory, PagesError, PagesWriter, decode_activity, ensure_activity_topic
from streams.core.process import CliError, configure_logging, quiet_kafka_startup, run_until_signalled
from streams.core.settings import Settings, load_settings
from streams.core.tokens import Secret, TokenCipher, load_app_secret, load_cipher
from streams.edges.graph import (
    DEFAULT_API_VERSION,
    DEFAULT_DIALOG_URL,
    DEFAULT_GRAPH_URL,
    AccountPage,
    GraphClient,
    GraphError,
)
from streams.edges.onboarding import Onboarding, OnboardingError, Report
from streams.rules.onboarding import LOGIN_SCOPES

log = logging.getLogger("messenger_streams.admin")

PASSWORD_ENV = "MESSENGER_STREAMS_ADMIN_PASSWORD"  # noqa: S105 - the variable's name
COOKIE = "ms_admin"
DEFAULT_PORT = 6068
MAX_SESSIONS = 1000  # server-side sessions kept (oldest dropped first)
SESSION_TTL = 8 * 3600.0  # seconds a session lives without use
MAX_FLASH = 20
TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class Session:
    sid: str
    csrf: str
    authed: bool = False
    seen: float = field(default_factory=time.monotonic)
    oauth_state: str | None = None
    fb_pages: list[AccountPage] | None = None  # from /me/accounts, tokens kept server-side only
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind: ok / error, text)

    def say(self, kind: str, text: str) -> None:
        self.flash = [*self.flash, (kind, text)][-MAX_FLASH:]


class Sessions:
    """Server-side sessions by random id, at most MAX_SESSIONS, each expiring SESSION_TTL after last use."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, ttl: float = SESSION_TTL) -> None:
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self.max_sessions = max_sessions
        self.ttl = ttl

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        now = time.monotonic()
        if now - s.seen > self.ttl:
            del self._by_id[sid]
            return None
        s.seen = now
        self._by_id.move_to_end(sid)
        return s

    def new(self) -> Session:
        while len(self._by_id) >= self.max_sessions:
            self._by_id.popitem(last=False)
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        self._by_id[s.sid] = s
        return s

    def drop(self, sid: str) -> None:
        self._by_id.pop(sid, None)

    def __len__(self) -> int:
        return len(self._by_id)


def password_matches(given: str, expected: Secret) -> bool:
    """Constant-time comparison (of digests, so the length of the password does not show either)."""
    a = hashlib.sha256(given.encode("utf-8", "replace")).digest()
    b = hashlib.sha256(expected.reveal().encode("utf-8")).digest()
    return hmac.compare_digest(a, b)


@dataclass
class AdminOptions:
    settings: Settings
    config: ConnectorConfig
    password: Secret
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    public_url: str | None = None  # what the browser sees (for the OAuth redirect URI)
    graph: GraphClient | None = None  # None: no App Secret, Facebook Login is unavailable
    cipher: TokenCipher | None = None
    failed_login_delay: float = 1.0

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def redirect_uri(self) -> str:
        return self.base_url + "/facebook/callback"


def _fmt_ms(ms: int | None) -> str:
    if not ms:
        return "—"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class AdminServer:
    """The admin web app over one started directory, writer and activity mirror."""

    def __init__(self, opts: AdminOptions) -> None:
        self.opts = opts
        self.sessions = Sessions()
        self.directory = PageDirectory(opts.config, opts.settings)
        self.writer = PagesWriter(opts.settings)
        self.activity: TopicMirror[PageActivity] | None = None
        self.onboarding = Onboarding(self.directory, self.writer, by="admin", graph=opts.graph, cipher=opts.cipher)
        self.secure_cookie = urlsplit(opts.base_url).scheme == "https"
        self.jinja = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=jinja2.StrictUndefined
        )
        self.jinja.filters["when"] = _fmt_ms
        self.runner: web.AppRunner | None = None

    # --- life cycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.directory.start()
        if self.opts.cipher is not None:
            self.onboarding.check_cipher()  # a wrong key stops start-up, before anything is written
        await self.writer.start()
        await ensure_activity_topic(self.opts.settings)
        activity: TopicMirror[PageActivity] = TopicMirror(
            self.opts.settings.bootstrap_servers, self.opts.settings.topics.name("pages_activity"), decode_activity
        )
        try:
            await activity.start()
        except MirrorError as exc:
            raise PagesError(str(exc)) from None
        self.activity = activity
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, self.opts.host, self.opts.port).start()
        except OSError as exc:
            raise PagesError(f"cannot listen on {self.opts.host}:{self.opts.port} (MESSENGER_STREAMS_ADMIN_PORT): "
                             f"{exc.strerror or exc}") from None

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.activity is not None:
            await self.activity.stop()
            self.activity = None
        await self.writer.stop()
        await self.directory.stop()
        if self.opts.graph is not None:
            await self.opts.graph.close()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers], client_max_size=256 * 1024)
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/admin.css", self.css)
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/", self.index)
        r.add_post("/source", self.source)
        r.add_post("/account", self.account)
        r.add_post("/pages/{page_id}/{action}", self.page_action)
        r.add_get("/facebook/login", self.facebook_login)
        r.add_get("/facebook/callback", self.facebook_callback)
        r.add_get("/connect", self.connect_page)
        r.add_post("/connect", self.connect)
        return app

    # --- plumbing -----------------------------------------------------------------------------------
    @web.middleware
    async def _headers(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            resp = exc
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
        )
        if isinstance(resp, web.HTTPException):
            raise resp
        return resp

    def _render(self, name: str, status: int = 200, **ctx: Any) -> web.Response:
        html = self.jinja.get_template(name).render(**ctx)
        return web.Response(text=html, content_type="text/html", status=status)

    def _session(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def _set_cookie(self, resp: web.StreamResponse, s: Session) -> None:
        resp.set_cookie(COOKIE, s.sid, httponly=True, samesite="Lax", secure=self.secure_cookie, path="/")

    def _authed(self, request: web.Request) -> Session:
        s = self._session(request)
        if s is None or not s.authed:
            raise web.HTTPSeeOther("/login")
        return s

    async def _form(self, request: web.Request, s: Session) -> dict[str, str]:
        """The POSTed form, after checking its CSRF token (403 otherwise)."""
        try:
            data = await request.post()
        except ValueError:
            raise web.HTTPBadRequest(text="the form could not be read") from None
        token = data.get("csrf")
        if not isinstance(token, str) or not hmac.compare_digest(token, s.csrf):
            raise web.HTTPForbidden(text="invalid or missing CSRF token: reload the page and try again")
        return {k: v for k, v in data.items() if isinstance(v, str)}

    # --- pages --------------------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        ok = self.directory.ready
        return web.json_response({"status": "ok" if ok else "starting"}, status=200 if ok else 503)

    async def css(self, request: web.Request) -> web.Response:
        return web.Response(text=(TEMPLATES / "admin.css").read_text(encoding="utf-8"), content_type="text/css",
                            headers={"Cache-Control": "max-age=300"})

    async def login_page(self, request: web.Request) -> web.Response:
        s = self._session(request)
        if s is not None and s.authed:
            raise web.HTTPSeeOther("/")
        if s is None:
            s = self.sessions.new()
        resp = self._render("login.html", csrf=s.csrf, error=None, flash=[])
        self._set_cookie(resp, s)
        return resp

    async def login(self, request: web.Request) -> web.Response:
        s = self._session(request)
        if s is None:
            raise web.HTTPSeeOther("/login")
        form = await self._form(request, s)
        if not password_matches(form.get("password", ""), self.opts.password):
            await asyncio.sleep(self.opts.failed_login_delay)  # slows guessing down
            return self._render("login.html", status=400, csrf=s.csrf, error="wrong password", flash=[])
        self.sessions.drop(s.sid)  # a new id once logged in (no session fixation)
        fresh = self.sessions.new()
        fresh.authed = True
        resp = web.HTTPSeeOther("/")
        self._set_cookie(resp, fresh)
        raise resp

    async def logout(self, request: web.Request) -> web.Response:
        s = self._authed(request)
        await self._form(request, s)
        self.sessions.drop(s.sid)
        resp = web.HTTPSeeOther("/login")
        resp.del_cookie(COOKIE, path="/")
        raise resp

    def _rows(self) -> list[dict[str, Any]]:
        act = self.activity
        rows = []
        for v in self.directory.views():
            ev = act.get(f"event:{v.page_id}") if act else None
            snd = act.get(f"send:{v.page_id}") if act else None
            rows.append({
                **v.as_dict(),
                "last_event_at": ev.at if ev else None,
                "last_send_at": snd.at if snd else None,
                "last_send_result": snd.result if snd else None,
            })
        return rows

    async def index(self, request: web.Request) -> web.Response:
        s = self._authed(request)
        flash, s.flash = s.flash, []
        return self._render(
            "index.html", csrf=s.csrf, flash=flash, account=self.directory.account, pages=self._rows(),
            skills=sorted(self.directory.skills), login_available=self.opts.graph is not None,
        )

    async def source(self, request: web.Request) -> web.Response:
        s = self._authed(request)
        form = await self._form(request, s)
        on = form.get("active") == "on"
        await self.onboarding.set_account(active=on)
        s.say("ok", "Facebook source activated" if on else
              "Facebook source deactivated: events of every page go to the dead-letter topic (page_disabled)")
        raise web.HTTPSeeOther("/")

    async def account(self, request: web.Request) -> web.Response:
        s = self._authed(request)
        form = await self._form(request, s)
        try:
            await self._save_account(form)
        except OnboardingError as exc:
            s.say("error", str(exc))
            raise web.HTTPSeeOther("/") from None
        s.say("ok", "account settings saved")
        raise web.HTTPSeeOther("/")

    async def _save_account(self, form: dict[str, str]) -> None:
        await self.onboarding.set_account(
            mode=form.get("mode") or None,
            default_skill=(form.get("default_skill") or "").strip() or None,
            unknown_pages=form.get("unknown_pages") or None,
            external_agent_id=(form.get("external_agent_id") or "").strip() or None,
            external_nickname=(form.get("external_nickname") or "").strip() or None,
        )

    async def page_action(self, request: web.Request) -> web.Response:
        s = self._authed(request)
        form = await self._form(request, s)
        page_id = request.match_info["page_id"]
        action = request.match_info["action"]
        if action == "enable":
            report = await self.onboarding.enable(page_id, True)
        elif action == "disable":
            report = await self.onboarding.enable(page_id, False)
        elif action == "disconnect":
            report = await self.onboarding.disconnect(page_id)
        elif action == "set":
            report = await self.onboarding.set_page(
                page_id, skill=(form.get("skill") or "").strip() or None,
                locale=(form.get("locale") or "").strip() or None,
            )
        else:
            raise web.HTTPNotFound(text=f"unknown page action {action!r}")
        s.say("ok" if report.ok else "error", report.line())
        raise web.HTTPSeeOther("/")

    # --- Facebook Login -----------------------------------------------------------------------------
    async def facebook_login(self, request: web.Request) -> web.Response:
        s = self._authed(request)
        if self.opts.graph is None:
            s.say("error", "Log in with Facebook needs the App Secret: set MESSENGER_STREAMS_APP_SECRET")
            raise web.HTTPSeeOther("/")
        s.oauth_state = secrets.token_urlsafe(24)
        raise web.HTTPSeeOther(self.opts.graph.login_url(self.opts.redirect_uri, s.oauth_state, LOGIN_SCOPES))

    async def facebook_callback(self, request: web.Request) -> web.Response:
        s = self._authed(request)
        q = request.query
        state, expected = q.get("state", ""), s.oauth_state
        s.oauth_state = None
        if not expected or not hmac.compare_digest(state, expected):
            s.say("error", "Facebook Login: the answer does not match this login (state); try again")
            raise web.HTTPSeeOther("/")
        if "error" in q or not q.get("code"):
            why = q.get("error_description") or q.get("error_reason") or q.get("error") or "no code"
            s.say("error", f"Facebook Login was not completed: {why[:200]}")
            raise web.HTTPSeeOther("/")
        graph = self.opts.graph
        assert graph is not None  # noqa: S101 - facebook_login checked it
        try:
            user_token = await graph.exchange_code(q["code"], self.opts.redirect_uri)
            user_token = await graph.long_lived(user_token)
            s.fb_pages = await graph.pages(user_token)
        except GraphError as exc:
            s.say("error", f"Facebook Login failed: {exc}")
            raise web.HTTPSeeOther("/") from None
        if not s.fb_pages:
            s.say("error", "this Facebook user administers no pages (or did not grant pages_show_list)")
            raise web.HTTPSeeOther("/")
        raise web.HTTPSeeOther("/connect")

    async def connect_page(self, request: web.Request) -> web.Response:
        s = self._authed(request)
        if not s.fb_pages:
            raise web.HTTPSeeOther("/facebook/login")
        rows = []
        for p in s.fb_pages:
            v = self.directory.view(p.page_id)
            rows.append({
                "page_id": p.page_id, "name": p.name, "tasks": ", ".join(p.tasks),
                "status": v.status if v else "not connected",
                "checked": v is not None and v.connected,
                "skill": (v.skill if v else None) or "",
                "locale": v.locale if v else "en_US",
            })
        flash, s.flash = s.flash, []
        return self._render("connect.html", csrf=s.csrf, flash=flash, pages=rows, account=self.directory.account,
                            skills=sorted(self.directory.skills))

    async def connect(self, request: web.Request) -> web.Response:
        s = self._authed(request)
        form = await self._form(request, s)
        if not s.fb_pages:
            raise web.HTTPSeeOther("/facebook/login")
        reports: list[Report] = []
        for p in s.fb_pages:
            if form.get(f"connect_{p.page_id}") != "on":
                continue
            skill = (form.get(f"skill_{p.page_id}") or "").strip() or None
            locale = (form.get(f"locale_{p.page_id}") or "").strip() or None
            reports.append(await self.onboarding.connect(p.page_id, skill, p.token, name=p.name, locale=locale))
        try:
            await self._save_account(form)
            await self.onboarding.set_account(active=True)
        except OnboardingError as exc:
            s.say("error", str(exc))
        for r in reports:
            s.say("ok" if r.ok else "error", r.line())
        if not reports:
            s.say("error", "no page was selected")
        if all(r.ok for r in reports) and reports:
            s.fb_pages = None  # done: the page tokens leave the session
            raise web.HTTPSeeOther("/")
        raise web.HTTPSeeOther("/connect")


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--host", default=env("MESSENGER_STREAMS_ADMIN_HOST", "127.0.0.1"),
                        help="address to bind (env MESSENGER_STREAMS_ADMIN_HOST; default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=int(env("MESSENGER_STREAMS_ADMIN_PORT") or DEFAULT_PORT),
                        help="port (env MESSENGER_STREAMS_ADMIN_PORT; default %(default)s)")
    parser.add_argument("--public-url", default=env("MESSENGER_STREAMS_ADMIN_PUBLIC_URL"),
                        help="the URL people open (env MESSENGER_STREAMS_ADMIN_PUBLIC_URL; default http://HOST:PORT); "
                        "its /facebook/callback must be a Valid OAuth Redirect URI of the app")
    parser.add_argument("--graph-url", default=env("MESSENGER_STREAMS_GRAPH_URL", DEFAULT_GRAPH_URL))
    parser.add_argument("--dialog-url", default=env("MESSENGER_STREAMS_FACEBOOK_DIALOG_URL", DEFAULT_DIALOG_URL),
                        help="Facebook Login dialog base URL (env MESSENGER_STREAMS_FACEBOOK_DIALOG_URL)")
    parser.add_argument("--api-version", default=env("MESSENGER_STREAMS_GRAPH_API_VERSION", DEFAULT_API_VERSION))
    parser.add_argument("--app-secret-file", default=None,
                        help="file holding the App Secret (default: env MESSENGER_STREAMS_APP_SECRET[_FILE])")


def options_from_args(args: argparse.Namespace) -> AdminOptions:
    password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        raise CliError(f"no admin password: set {PASSWORD_ENV}")
    if len(password) < 8:
        raise CliError(f"{PASSWORD_ENV} is too short: use at least 8 characters")
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be 1-65535, got {args.port}")
    for name in ("graph_url", "dialog_url"):
        if not getattr(args, name).startswith(("http://", "https://")):
            raise CliError(f"--{name.replace('_', '-')} must be an http(s) URL")
    if args.public_url and not args.public_url.startswith(("http://", "https://")):
        raise CliError("--public-url must be an http(s) URL")
    settings = load_settings()
    config = load_config()
    secret = load_app_secret(args.app_secret_file)
    graph = None
    if secret is not None:
        graph = GraphClient(config.account.app_id, secret, graph_url=args.graph_url, dialog_url=args.dialog_url,
                            api_version=args.api_version)
    return AdminOptions(settings=settings, config=config, password=Secret(password), host=args.host, port=args.port,
                        public_url=args.public_url, graph=graph, cipher=load_cipher(required=secret is not None))


async def serve(
    opts: AdminOptions, stop: asyncio.Event, on_ready: Callable[[AdminServer], Awaitable[None]] | None = None
) -> None:
    server = AdminServer(opts)
    try:
        with quiet_kafka_startup():
            await server.start()
        print(f"admin page on {opts.base_url}/ (binds {opts.host}:{opts.port})", flush=True)
        if opts.graph is None:
            print("no MESSENGER_STREAMS_APP_SECRET: Log in with Facebook is off (pages list and settings work)",
                  flush=True)
        if on_ready is not None:
            await on_ready(server)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await server.stop()


def run(args: argparse.Namespace) -> int:
    """Entry point of `messenger-streams admin`."""
    opts = options_from_args(args)
    configure_logging(opts.settings.log_level)
    try:
        run_until_signalled(lambda stop: serve(opts, stop))
    except (PagesError, OSError) as exc:
        raise CliError(str(exc)) from None
    except ConfigError:
        raise
    return 0

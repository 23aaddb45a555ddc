"""A local fake of the Graph API Send endpoint and the thread-control edges (#15): records every
request, answers with scripted successes and errors (real error bodies from tests/samples); the
onboarding endpoints (#14) come from `OnboardingFake`.

Counting sends (for the dispatcher's tests and the chaos suite): a request *delivered* a message when
the fake answered it 200, whether or not the dispatcher lived to read the answer. `deliveries()`
counts them per outbox id (the `message.metadata` the conversation stage sets), `duplicates()` lists
the outbox ids whose same part was delivered more than once, `max_concurrent` the most requests one
recipient had open at once. `GET /_stats` serves the same as JSON for a fake in another process.

Beyond sends: the onboarding endpoints (#14, `OnboardingFake`: Login, /me/accounts, debug_token,
subscribed_apps, 190 mode, appsecret_proof checks) and the User Profile and Personas APIs (#17,
`FakePeople`). `GET /{version}/{id}` is shared: a page of the fake user answers its name, any other
id is a person whose profile is read."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from tests.kafkatools import free_port

SAMPLES = Path(__file__).parent / "samples"
# #15: Conversation Routing edges; they answer {"success": true} and are recorded like sends
THREAD_EDGES = ("pass_thread_control", "take_thread_control", "request_thread_control", "release_thread_control")
SEND_EDGES = ("messages", *THREAD_EDGES)


def sample_error(name: str) -> dict[str, Any]:
    """A real Graph error body from tests/samples (e.g. '28_send_api_error_551_person_unavailable')."""
    path = next(SAMPLES.glob(f"{name}*.json"))
    return dict(orjson.loads(path.read_bytes()))


def graph_error(code: int, message: str, subcode: int | None = None, type_: str = "OAuthException") -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "type": type_, "code": code, "fbtrace_id": "AbCdEfG"}
    if subcode is not None:
        err["error_subcode"] = subcode
    return {"error": err}


RATE_LIMIT = graph_error(613, "(#613) Calls to this API have exceeded the rate limit.")
TEMPORARY = graph_error(1200, "Temporary send message failure. Please try again later", type_="FacebookApiException")
BAD_TOKEN = graph_error(190, "Error validating access token: Session has expired on Tuesday.", 463)
PERSON_UNAVAILABLE = sample_error("28_")
OUTSIDE_WINDOW = sample_error("29_")


@dataclass
class Answer:
    status: int = 200
    body: dict[str, Any] | None = None  # None: a success with a fresh message_id
    delay: float = 0.0


@dataclass
class GraphRequest:
    path: str
    query: dict[str, str]
    body: dict[str, Any]
    at: float
    status: int = 0
    mid: str | None = None  # the message_id the fake answered with

    @property
    def psid(self) -> str:
        return str(self.body.get("recipient", {}).get("id"))

    @property
    def edge(self) -> str:
        """The Graph edge called: `messages`, or a thread-control edge (#15)."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def text(self) -> str | None:
        msg = self.body.get("message")
        return msg.get("text") if isinstance(msg, dict) else None

    @property
    def outbox_id(self) -> str | None:
        """The outbox id the conversation stage puts in `message.metadata` (None for sender actions)."""
        msg = self.body.get("message")
        meta = msg.get("metadata") if isinstance(msg, dict) else None
        return str(meta) if meta is not None else None

    @property
    def delivered(self) -> bool:
        return self.status == 200


def deliveries(requests: Iterable[GraphRequest]) -> Counter[str]:
    """Outbox id → requests that delivered a message (answered 200). A split text counts one per part."""
    return Counter(r.outbox_id for r in requests if r.delivered and r.outbox_id is not None)


def duplicates(requests: Iterable[GraphRequest]) -> dict[str, int]:
    """Outbox id → times its most-repeated part was delivered, for the ids delivered more than once
    (the same body twice: a message the person saw twice). Empty when every send happened once."""
    seen: Counter[tuple[str, str]] = Counter()
    for r in requests:
        if r.delivered and r.outbox_id is not None:
            seen[(r.outbox_id, orjson.dumps(r.body, option=orjson.OPT_SORT_KEYS).decode())] += 1
    out: dict[str, int] = {}
    for (oid, _), n in seen.items():
        if n > 1:
            out[oid] = max(out.get(oid, 0), n)
    return out


NO_PROFILE = graph_error(100, "No profile available for this user.", 2018218, type_="GraphMethodException")


@dataclass
class FakePeople:
    """#17: the User Profile API (`GET /{version}/{psid}?fields=…`) and the Personas API
    (`GET|POST /{version}/{page_id}/personas`). `profiles` answers by PSID (only the fields asked for);
    an unknown PSID gets Meta's "No profile available" (100/2018218); `profile_errors` scripts another
    error for a PSID; `persona_failures` makes the next persona calls answer 500."""

    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile_errors: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    profile_delay: float = 0.0
    personas: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # page id → its personas
    persona_failures: int = 0
    calls: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, path, query)
    _n: int = 0

    def profile_reads(self) -> list[str]:
        """The PSIDs whose profile was read, in order."""
        return [path.rsplit("/", 1)[-1] for method, path, _ in self.calls if method == "GET"
                and not path.endswith("/personas")]

    def persona_creations(self, page_id: str | None = None) -> list[str]:
        """The names of the personas created (on one page, or on all)."""
        return [p["name"] for page, ps in self.personas.items() if page_id in (None, page) for p in ps]

    async def profile(self, request: web.Request) -> web.Response:
        psid = request.match_info["node"]
        self.calls.append(("GET", request.path, dict(request.query)))
        if self.profile_delay:
            await asyncio.sleep(self.profile_delay)
        if psid in self.profile_errors:
            status, body = self.profile_errors[psid]
            return web.json_response(body, status=status)
        known = self.profiles.get(psid)
        if known is None:
            return web.json_response(NO_PROFILE, status=400)
        fields = [f for f in request.query.get("fields", "").split(",") if f]
        return web.json_response({"id": psid, **{k: v for k, v in known.items() if k in fields}})

    async def persona_list(self, request: web.Request) -> web.Response:
        page_id = request.match_info["page_id"]
        self.calls.append(("GET", request.path, dict(request.query)))
        if self.persona_failures > 0:
            self.persona_failures -= 1
            return web.json_response(TEMPORARY, status=500)
        return web.json_response({"data": [{"id": p["id"], "name": p["name"]} for p in self.personas.get(page_id, [])]})

    async def persona_create(self, request: web.Request) -> web.Response:
        page_id = request.match_info["page_id"]
        self.calls.append(("POST", request.path, dict(request.query)))
        body = orjson.loads(await request.read() or b"{}")
        if self.persona_failures > 0:
            self.persona_failures -= 1
            return web.json_response(TEMPORARY, status=500)
        if not body.get("name") or not body.get("profile_picture_url"):
            return web.json_response(graph_error(100, "(#100) name and profile_picture_url are required"),
                                     status=400)
        self._n += 1
        persona = {"id": f"9{self._n:015d}", "name": body["name"], "profile_picture_url": body["profile_picture_url"]}
        self.personas.setdefault(page_id, []).append(persona)
        return web.json_response({"id": persona["id"]})

    def add_routes(self, app: web.Application) -> None:
        """The Personas API; profiles share `GET /{version}/{node}` with page names (FakeGraph.node)."""
        app.router.add_get("/{version}/{page_id}/personas", self.persona_list)
        app.router.add_post("/{version}/{page_id}/personas", self.persona_create)


@dataclass
class FakePage:
    page_id: str
    name: str
    token: str
    tasks: list[str] = field(default_factory=lambda: ["MANAGE", "MESSAGING"])


def _oauth_error(message: str, code: int = 190, subcode: int | None = None, status: int = 400) -> web.Response:
    return web.json_response(graph_error(code, message, subcode), status=status)


class OnboardingFake:
    """The onboarding endpoints (#14) of FakeGraph: Facebook Login dialog, code and token exchange,
    /me/accounts, debug_token, subscribed_apps, page names, and a 190 mode (`rejected_tokens`)."""

    def add_page(self: Any, page_id: str, name: str) -> str:
        """A page the fake Facebook user administers; returns its page token."""
        token = f"EAAPage{page_id}x{len(self.pages)}{secrets.token_hex(6)}"
        self.pages[page_id] = FakePage(page_id, name, token)
        return token

    def new_page_token(self: Any, page_id: str) -> str:
        """A fresh token for a page (what logging in again gives after the old one was revoked)."""
        page = self.pages[page_id]
        page.token = f"EAAPage{page_id}r{secrets.token_hex(8)}"
        return page.token

    def proof_ok(self: Any, query: Any) -> bool:
        token = query.get("access_token")
        if token is None:
            return True
        expected = hmac.new(self.app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(query.get("appsecret_proof", ""), expected)

    @web.middleware
    async def _oauth_checks(self: Any, request: web.Request, handler: Any) -> web.StreamResponse:
        token = request.query.get("access_token")
        if token is not None and token in self.rejected_tokens:
            if request.path.rsplit("/", 1)[-1] in SEND_EDGES and "/me/" in request.path:  # record it like any send
                self.requests.append(GraphRequest(request.path, dict(request.query),
                                                  orjson.loads(await request.read() or b"{}"), time.monotonic(), 400))
            return _oauth_error("Error validating access token: The session has been invalidated because the user "
                                "changed their password.", 190, 460)
        if self.require_proof and not self.proof_ok(request.query):
            return _oauth_error("Invalid appsecret_proof provided in the API argument", 100)
        return await handler(request)

    async def dialog(self: Any, request: web.Request) -> web.Response:
        q = request.query
        if q.get("client_id") != self.app_id:
            return web.Response(text="Invalid App ID", status=400)
        redirect, state = q.get("redirect_uri", ""), q.get("state", "")
        code = secrets.token_hex(8)
        user_token = f"EAAUser{secrets.token_hex(10)}"
        self.codes[code] = user_token
        ok = f"{redirect}?{urlencode({'code': code, 'state': state})}"
        deny = f"{redirect}?{urlencode({'error': 'access_denied', 'error_reason': 'user_denied', 'state': state})}"
        html = (
            "<!doctype html><title>Log in with Facebook</title><h1>Facebook (fake)</h1>"
            f"<p>messenger-streams is requesting: {q.get('scope', '')}</p>"
            f"<a id='continue' href='{ok}'>Continue as {self.user_name}</a> <a id='cancel' href='{deny}'>Cancel</a>"
        )
        return web.Response(text=html, content_type="text/html")

    async def access_token(self: Any, request: web.Request) -> web.Response:
        q = request.query
        if q.get("client_id") != self.app_id or q.get("client_secret") != self.app_secret:
            return _oauth_error("Error validating client secret.", 1)
        if q.get("grant_type") == "fb_exchange_token":
            short = q.get("fb_exchange_token", "")
            if short not in self.user_tokens:
                return _oauth_error("Invalid OAuth access token.")
            long = "EAALong" + secrets.token_hex(10)
            self.user_tokens.add(long)
            return web.json_response({"access_token": long, "token_type": "bearer", "expires_in": 5183944})
        token = self.codes.pop(q.get("code", ""), None)
        if token is None:
            return _oauth_error("This authorization code has been used.", 100, 36009)
        self.user_tokens.add(token)
        return web.json_response({"access_token": token, "token_type": "bearer", "expires_in": 5183944})

    async def accounts(self: Any, request: web.Request) -> web.Response:
        if request.query.get("access_token") not in self.user_tokens:
            return _oauth_error("Invalid OAuth access token.")
        data = [{"id": p.page_id, "name": p.name, "access_token": p.token, "tasks": p.tasks,
                 "category": "Company"} for p in self.pages.values()]
        return web.json_response({"data": data, "paging": {"cursors": {"before": "b", "after": "a"}}})

    async def debug_token(self: Any, request: web.Request) -> web.Response:
        q = request.query
        if q.get("access_token") != f"{self.app_id}|{self.app_secret}":
            return _oauth_error("Invalid OAuth access token - Cannot parse access token")
        token = q.get("input_token", "")
        app_id = self.token_app_id or self.app_id
        page = next((p for p in self.pages.values() if p.token == token), None)
        if token in self.rejected_tokens or (page is None and token not in self.user_tokens):
            return web.json_response({"data": {"app_id": app_id, "is_valid": False, "scopes": [],
                                               "error": {"code": 190, "message": "The session has been invalidated"}}})
        data: dict[str, Any] = {"app_id": app_id, "application": "messenger-streams", "expires_at": 0,
                                "is_valid": True, "scopes": list(self.scopes), "user_id": "10001"}
        if page is not None:
            data.update(type="PAGE", profile_id=page.page_id)
        else:
            data.update(type="USER")
        return web.json_response({"data": data})

    def page_of_token(self: Any, page_id: str, token: str | None) -> FakePage | None:
        page = self.pages.get(page_id)
        return page if page is not None and token == page.token else None

    async def subscribed_apps(self: Any, request: web.Request) -> web.Response:
        page_id = request.match_info["page_id"]
        if self.page_of_token(page_id, request.query.get("access_token")) is None:
            return _oauth_error("(#210) A page access token is required to request this resource.", 210)
        if "pages_manage_metadata" not in self.scopes:
            return _oauth_error("(#200) Requires pages_manage_metadata permission to manage the object", 200)
        if request.method == "DELETE":
            self.subscriptions.pop(page_id, None)
        else:
            self.subscriptions[page_id] = request.query.get("subscribed_fields", "").split(",")
        return web.json_response({"success": True})

    async def page_info(self: Any, request: web.Request) -> web.Response:
        page = self.page_of_token(request.match_info["node"], request.query.get("access_token"))
        if page is None:
            return _oauth_error("(#100) Unsupported get request.", 100)
        return web.json_response({"id": page.page_id, "name": page.name})

    def _add_onboarding_routes(self: Any, app: web.Application) -> None:
        app.router.add_get("/{version}/dialog/oauth", self.dialog)
        app.router.add_get("/{version}/oauth/access_token", self.access_token)
        app.router.add_get("/{version}/me/accounts", self.accounts)
        app.router.add_get("/{version}/debug_token", self.debug_token)
        app.router.add_post("/{version}/{page_id}/subscribed_apps", self.subscribed_apps)
        app.router.add_delete("/{version}/{page_id}/subscribed_apps", self.subscribed_apps)
        app.router.add_get("/{version}/{node}", self.node)

    async def node(self: Any, request: web.Request) -> web.Response:
        """`GET /{version}/{id}`: a page the fake user administers answers its name (onboarding, #14);
        any other id is a person, answered by the User Profile API (#17)."""
        if request.match_info["node"] in self.pages:
            return await self.page_info(request)
        return await self.people.profile(request)




@dataclass
class FakeGraph(OnboardingFake):
    """`await start()` → base URL. `script(psid, Answer, ...)` queues answers for one recipient; the
    rest get `200 {"recipient_id", "message_id": "m_<n>"}`."""

    requests: list[GraphRequest] = field(default_factory=list)
    scripts: dict[str, list[Answer]] = field(default_factory=dict)
    url: str = ""
    default_delay: float = 0.0  # seconds before every unscripted answer (the Graph API is not instant)
    open_now: Counter[str] = field(default_factory=Counter)  # recipient → requests not answered yet
    max_concurrent: Counter[str] = field(default_factory=Counter)  # recipient → most open at once
    people: FakePeople = field(default_factory=FakePeople)  # #17: profiles and personas
    _runner: web.AppRunner | None = None
    _count: int = 0
    # --- onboarding (#14): Facebook Login, /me/accounts, debug_token, subscribed_apps, 190 mode ---
    app_id: str = "950864918368986"
    app_secret: str = "fake-app-secret-0123456789"
    require_proof: bool = False  # True: every call with an access_token must carry a valid appsecret_proof
    user_name: str = "Pat Admin"
    pages: dict[str, FakePage] = field(default_factory=dict)  # the pages the fake user administers
    user_tokens: set[str] = field(default_factory=set)
    codes: dict[str, str] = field(default_factory=dict)  # Login dialog code → user token
    rejected_tokens: set[str] = field(default_factory=set)  # 190 for any call made with these
    subscriptions: dict[str, list[str]] = field(default_factory=dict)  # page id → subscribed fields
    scopes: list[str] = field(default_factory=lambda: [
        "pages_messaging", "pages_manage_metadata", "pages_show_list", "pages_read_engagement", "business_management",
    ])
    token_app_id: str | None = None  # debug_token answers this app id (None: app_id) — a token of another app

    def script(self, psid: str, *answers: Answer) -> None:
        self.scripts.setdefault(psid, []).extend(answers)

    def sent_to(self, psid: str) -> list[GraphRequest]:
        return [r for r in self.requests if r.psid == psid]

    def deliveries(self) -> Counter[str]:
        """Outbox id → requests answered 200 (see the module docstring)."""
        return deliveries(self.requests)

    def duplicates(self) -> dict[str, int]:
        """Outbox ids whose same part was delivered more than once (goal: empty)."""
        return duplicates(self.requests)

    def in_flight(self) -> list[GraphRequest]:
        """Requests received and not answered yet."""
        return [r for r in self.requests if r.status == 0]

    def stats(self) -> dict[str, Any]:
        return {
            "requests": len(self.requests),
            "delivered": sum(1 for r in self.requests if r.delivered),
            "deliveries": dict(self.deliveries()),
            "duplicates": self.duplicates(),
            "max_concurrent_per_recipient": max(self.max_concurrent.values(), default=0),
        }

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        rec = GraphRequest(request.path, dict(request.query), body, time.monotonic())
        self.requests.append(rec)
        queue = self.scripts.get(rec.psid)
        answer = queue.pop(0) if queue else Answer(delay=self.default_delay)
        self.open_now[rec.psid] += 1
        self.max_concurrent[rec.psid] = max(self.max_concurrent[rec.psid], self.open_now[rec.psid])
        try:
            if answer.delay:
                await asyncio.sleep(answer.delay)
        finally:
            self.open_now[rec.psid] -= 1
        rec.status = answer.status
        if answer.body is None and answer.status == 200 and not request.path.endswith("/messages"):
            return web.json_response({"success": True})  # #15: a thread-control edge
        if answer.body is None and answer.status == 200:
            self._count += 1
            out: dict[str, Any] = {"recipient_id": rec.psid}
            if "message" in body:
                out["message_id"] = rec.mid = f"m_{self._count}"
            return web.json_response(out)
        return web.json_response(answer.body or {}, status=answer.status)

    async def start(self) -> str:
        app = web.Application(middlewares=[self._oauth_checks])
        app.router.add_post("/{version}/me/messages", self._handle)
        for edge in THREAD_EDGES:  # #15: Conversation Routing answers {"success": true}
            app.router.add_post("/{version}/me/" + edge, self._handle)
        app.router.add_get("/_stats", self._stats)
        self.people.add_routes(app)
        self._add_onboarding_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[GraphRequest]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.requests


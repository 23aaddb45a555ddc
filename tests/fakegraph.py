"""A local fake of the Graph API Send endpoint: records every request, answers with scripted
successes and errors (real error bodies from tests/samples).

Counting sends (for the dispatcher's tests and the chaos suite): a request *delivered* a message when
the fake answered it 200, whether or not the dispatcher lived to read the answer. `deliveries()`
counts them per outbox id (the `message.metadata` the conversation stage sets), `duplicates()` lists
the outbox ids whose same part was delivered more than once, `max_concurrent` the most requests one
recipient had open at once. `GET /_stats` serves the same as JSON for a fake in another process."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests.kafkatools import free_port

SAMPLES = Path(__file__).parent / "samples"


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
        psid = request.match_info["psid"]
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
        app.router.add_get("/{version}/{page_id}/personas", self.persona_list)
        app.router.add_post("/{version}/{page_id}/personas", self.persona_create)
        app.router.add_get(r"/{version}/{psid:\d+}", self.profile)


@dataclass
class FakeGraph:
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
        if answer.body is None and answer.status == 200:
            self._count += 1
            out: dict[str, Any] = {"recipient_id": rec.psid}
            if "message" in body:
                out["message_id"] = rec.mid = f"m_{self._count}"
            return web.json_response(out)
        return web.json_response(answer.body or {}, status=answer.status)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/{version}/me/messages", self._handle)
        app.router.add_get("/_stats", self._stats)
        self.people.add_routes(app)
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

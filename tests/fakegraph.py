"""A local fake of the Graph API Send endpoint: records every request, answers with scripted
successes and errors (real error bodies from tests/samples)."""

from __future__ import annotations

import asyncio
import time
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

    @property
    def psid(self) -> str:
        return str(self.body.get("recipient", {}).get("id"))

    @property
    def text(self) -> str | None:
        msg = self.body.get("message")
        return msg.get("text") if isinstance(msg, dict) else None


@dataclass
class FakeGraph:
    """`await start()` → base URL. `script(psid, Answer, ...)` queues answers for one recipient; the
    rest get `200 {"recipient_id", "message_id": "m_<n>"}`."""

    requests: list[GraphRequest] = field(default_factory=list)
    scripts: dict[str, list[Answer]] = field(default_factory=dict)
    url: str = ""
    _runner: web.AppRunner | None = None
    _count: int = 0

    def script(self, psid: str, *answers: Answer) -> None:
        self.scripts.setdefault(psid, []).extend(answers)

    def sent_to(self, psid: str) -> list[GraphRequest]:
        return [r for r in self.requests if r.psid == psid]

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        rec = GraphRequest(request.path, dict(request.query), body, time.monotonic())
        self.requests.append(rec)
        queue = self.scripts.get(rec.psid)
        answer = queue.pop(0) if queue else Answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        rec.status = answer.status
        if answer.body is None and answer.status == 200:
            self._count += 1
            out: dict[str, Any] = {"recipient_id": rec.psid}
            if "message" in body:
                out["message_id"] = f"m_{self._count}"
            return web.json_response(out)
        return web.json_response(answer.body or {}, status=answer.status)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/{version}/me/messages", self._handle)
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

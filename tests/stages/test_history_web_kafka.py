"""End to end: a webhook through the worker, the history sink, then `GET /conversations?q=refund`,
the transcript, 400s that name the parameter, and `POST /admin/forget` behind the admin password."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import BASE_CONFIG
from tests.kafkatools import ROOT, KafkaIO, Worker
from tests.pgtools import all_text

pytestmark = pytest.mark.kafka

PAGE = "1691462197845448"
PASSWORD = "correct horse battery staple"


def now_ms() -> int:
    return int(time.time() * 1000)


def body(psid: str, mid: str, text: str) -> bytes:
    item = {"sender": {"id": psid}, "recipient": {"id": PAGE}, "timestamp": now_ms(),
            "message": {"mid": mid, "text": text}}
    return orjson.dumps({"object": "page", "entry": [{"id": PAGE, "time": now_ms(), "messaging": [item]}]})


BEARER = {"Authorization": f"Bearer {PASSWORD}"}


def http(w: Worker, path: str, *, method: str = "GET", data: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A request; with the admin password unless `headers` says otherwise."""
    req = urllib.request.Request(w.web_url + path, data=data, method=method,  # noqa: S310
                                 headers=BEARER if headers is None else headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - a local worker
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(check)
        if got:
            return got
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def test_search_read_and_forget_through_the_worker(
    make_worker: Callable[..., Worker], kafka: KafkaIO, history_dsn: str, tmp_path: Path
) -> None:
    w = make_worker(BASE_CONFIG + "\n[csat]\nenabled = false\n", MESSENGER_STREAMS_HISTORY_DSN=history_dsn,
                    MESSENGER_STREAMS_ADMIN_PASSWORD=PASSWORD)
    sink_log = open(tmp_path / "sink.log", "ab")  # noqa: SIM115 - handed to the child
    sink = subprocess.Popen([str(ROOT / ".venv" / "bin" / "messenger-streams"), "history", "sink"], env=w.env,
                            stdout=sink_log, stderr=sink_log)
    try:
        await kafka.send(w.topic("messenger.webhook.raw"), body("24680135792468013", "m.r1", "Hi, I want a refund for my shoes"))
        await kafka.send(w.topic("messenger.webhook.raw"), body("24680135792468099", "m.o1", "Where is my parcel?"))

        def found() -> Any:
            status, page = http(w, "/conversations?q=refunds")
            return page["conversations"] if status == 200 and page["conversations"] else None

        hits = await eventually(found, 90, "the conversation in the search")
        assert [c["psid"] for c in hits] == ["24680135792468013"] and "<b>refund</b>" in hits[0]["match"]
        cid = hits[0]["conversation_id"]
        await kafka.send(w.topic("agent.actions"), {"type": "accept", "action_id": "a1", "page_id": PAGE,
                                                   "psid": "24680135792468013", "agent_id": "agent-7"},
                         key=f"{PAGE}:24680135792468013")

        def accepted() -> Any:
            status, doc = http(w, f"/conversations/{cid}")
            return doc if status == 200 and any(i["type"] == "conversation_accepted" for i in doc["transcript"]) \
                else None

        doc = await eventually(accepted, 60, "the transcript with the acceptance")
        texts = [(i["type"], i.get("text")) for i in doc["transcript"]]
        assert texts[0] == ("conversation_opened", None)
        assert ("consumer_message", "Hi, I want a refund for my shoes") in texts
        assert doc["conversation"]["agents"] == ["agent-7"]
        status, everything = http(w, "/conversations?limit=1")
        assert status == 200 and len(everything["conversations"]) == 1 and everything["next_cursor"]
        status, rest = http(w, "/conversations?limit=1&cursor=" + everything["next_cursor"])
        assert status == 200 and {c["psid"] for c in everything["conversations"] + rest["conversations"]} == {
            "24680135792468013", "24680135792468099"}

        for query, param in (("csat_min=9", "csat_min"), ("from=last%20week", "from"), ("colour=red", "colour"),
                             ("limit=0", "limit"), ("cursor=zzz", "cursor")):
            status, err = http(w, "/conversations?" + query)
            assert status == 400 and err["param"] == param and param in err["error"], (query, err)
        assert http(w, "/conversations/c-nope")[0] == 404

        assert http(w, "/conversations?q=refund", headers={})[0] == 401  # transcripts need the password too
        assert http(w, f"/conversations/{cid}", headers={"Authorization": "Bearer nope"})[0] == 401
        forget = orjson.dumps({"page_id": PAGE, "psid": "24680135792468013"})
        assert http(w, "/admin/forget", method="POST", data=forget, headers={})[0] == 401
        wrong = {"Authorization": "Bearer nope"}
        assert http(w, "/admin/forget", method="POST", data=forget, headers=wrong)[0] == 401
        basic = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}
        status, err = http(w, "/admin/forget", method="POST", data=b'{"page_id": "1"}', headers=basic)
        assert status == 400 and err["param"] == "psid"
        status, report = http(w, "/admin/forget", method="POST", data=forget, headers=basic)
        assert status == 200, report
        assert report["erased"]["conversation_ids"] == [cid] and report["erased"]["messages"] >= 1
        actions = await kafka.read_json(w.topic("agent.actions"), min_count=2)
        assert any(a["type"] == "forget" and a["psid"] == "24680135792468013" and a["role"] == "admin" and
                   a["action_id"] == report["forget_action_id"] for a in actions)
        assert http(w, f"/conversations/{cid}")[0] == 404
        assert http(w, "/conversations?q=refund")[1]["conversations"] == []
        text = all_text(history_dsn)
        assert "24680135792468013" not in text and "refund for my shoes" not in text and "24680135792468099" in text
    finally:
        sink.send_signal(signal.SIGTERM)
        try:
            assert sink.wait(30) == 0, (tmp_path / "sink.log").read_text()[-3000:]
        finally:
            sink_log.close()


async def test_history_pages_without_a_store_answer_503(make_worker: Callable[..., Worker]) -> None:
    w = make_worker(BASE_CONFIG)
    status, err = http(w, "/conversations", headers={})
    assert status == 503 and "MESSENGER_STREAMS_HISTORY_DSN" in err["error"]
    status, err = http(w, "/admin/forget", method="POST", data=b"{}", headers={})
    assert status == 403 and "MESSENGER_STREAMS_ADMIN_PASSWORD" in err["error"]

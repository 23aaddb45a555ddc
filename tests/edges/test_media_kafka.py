"""`messenger-streams media` on a real broker against a local fake CDN: attachments of console
events are stored by content hash and announced with `media_stored`; refusals and failures are
counted and never hold up the other attachments."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import REGISTRY

from streams.core.config_rich import Media
from streams.core.process import CliError
from streams.core.topics import ensure_topics
from streams.edges.media import MediaOptions, serve
from tests.conftest import BASE_CONFIG
from tests.kafkatools import KafkaIO, Worker, free_port
from tests.stages.test_conversations_kafka import BILLING_PAGE

pytestmark = pytest.mark.kafka

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.4\n" + b"invoice " * 200


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.delete_topics(names, timeout_ms=10_000)
    finally:
        await admin.close()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Cdn:
    url: str
    hits: dict[str, int]


@pytest.fixture
async def cdn() -> AsyncIterator[Cdn]:
    hits: dict[str, int] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        hits[name] = hits.get(name, 0) + 1
        if name in ("a.png", "same-again.png"):
            return web.Response(body=PNG, content_type="image/png")
        if name == "invoice.pdf":
            return web.Response(body=PDF, content_type="application/pdf")
        if name == "big.jpg":  # streamed without a Content-Length: the limit holds while reading
            resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            await resp.prepare(request)
            for _ in range(20):
                await resp.write(b"x" * 1024)
            await resp.write_eof()
            return resp
        if name == "setup.exe":
            return web.Response(body=b"MZ", content_type="application/x-msdownload")
        if name == "slow.png":
            await asyncio.sleep(5)
            return web.Response(body=PNG, content_type="image/png")
        if name == "moved.png":
            raise web.HTTPFound("http://169.254.169.254/")
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/v/{name}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Cdn(f"http://127.0.0.1:{port}/v", hits)
    finally:
        await runner.cleanup()


def console_event(skill: str, n: int, *urls: tuple[str, str]) -> dict[str, Any]:
    return {"type": "consumer_message", "event_id": f"ev-{skill}-{n}", "conversation_id": f"c{n}",
            "page_id": "p1", "psid": f"u{n}", "skill": skill, "timestamp": 1700000000000 + n, "mid": f"m{n}",
            "text": None, "attachments": [{"type": t, "url": u} for t, u in urls], "truncated": False}


async def wait_for(kafka: KafkaIO, topic: str, want: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    stored: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = await kafka.read_json(topic, settle=0.3, timeout=10)
        stored = [e for e in events if e["type"] == "media_stored"]
        if len(stored) >= want:
            return stored
        await asyncio.sleep(0.3)
    raise AssertionError(f"{len(stored)} media_stored events on {topic}, wanted {want}")


async def test_attachments_are_kept_by_hash_and_failures_counted(
    kafka: KafkaIO, kafka_bootstrap: str, cdn: Cdn, tmp_path: Path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}.skill."
    store = tmp_path / "media"
    media = Media(store=str(store), max_bytes=10_000, timeout_seconds=2.0,
                  allowed_hosts=["127.0.0.1", "fbcdn.net"])
    opts = MediaOptions(bootstrap_servers=kafka_bootstrap, skill_topic_prefix=prefix,
                        group_id=f"media-{uuid.uuid4().hex[:8]}", media=media)
    billing, support = prefix + "billing", prefix + "support"
    before = {r: metric("messenger_media_failures_total", reason=r)
              for r in ("too_large", "type_not_allowed", "http_error", "timeout", "host_not_allowed")}
    stored_before = metric("messenger_media_stored_total")

    # the topics exist before the keeper subscribes by pattern (as the worker creates skill topics at start)
    await ensure_topics(kafka_bootstrap, {billing: False, support: False}, 1, 1)
    await kafka.send(billing, console_event("billing", 0), key="p1:u0")
    await kafka.send(support, {"type": "conversation_opened", "event_id": "x", "page_id": "p1", "psid": "u9",
                               "skill": "support", "timestamp": 1, "conversation_id": "c9"}, key="p1:u9")
    stop, ready = asyncio.Event(), asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    task = asyncio.create_task(serve(opts, stop, on_ready=on_ready))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        await kafka.send(billing, console_event(
            "billing", 1,
            ("image", f"{cdn.url}/a.png"),
            ("location", "https://l.facebook.com/l.php?u=x"),  # a link, not media: not fetched
            ("image", f"{cdn.url}/big.jpg"),
            ("file", f"{cdn.url}/setup.exe"),
            ("image", f"{cdn.url}/gone.png"),
            ("image", f"{cdn.url}/slow.png"),
            ("image", f"{cdn.url}/moved.png"),
            ("image", "https://evil.example.com/a.png"),
            ("file", f"{cdn.url}/invoice.pdf"),
        ), key="p1:u1")
        await kafka.send(support, console_event("support", 2, ("image", f"{cdn.url}/same-again.png")), key="p1:u2")
        on_billing = await wait_for(kafka, billing, 2)
        on_support = await wait_for(kafka, support, 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await delete_topics(kafka_bootstrap, [billing, support])

    png_sha, pdf_sha = hashlib.sha256(PNG).hexdigest(), hashlib.sha256(PDF).hexdigest()
    by_index = {e["attachment_index"]: e for e in on_billing}
    assert sorted(by_index) == [0, 8]
    img, pdf = by_index[0], by_index[8]
    assert (img["event_id"], img["mid"], img["conversation_id"], img["skill"]) == ("ev-billing-1:media:0", "m1", "c1",
                                                                                   "billing")
    assert (img["sha256"], img["bytes"], img["content_type"]) == (png_sha, len(PNG), "image/png")
    assert img["key"] == f"{png_sha[:2]}/{png_sha}.png" and img["location"] == f"{store}/{img['key']}"
    assert (store / img["key"]).read_bytes() == PNG
    assert (pdf["sha256"], pdf["content_type"]) == (pdf_sha, "application/pdf")
    assert (store / pdf["key"]).read_bytes() == PDF
    # the same picture from another conversation: its own event, one file
    [again] = on_support
    assert again["sha256"] == png_sha and again["key"] == img["key"] and again["psid"] == "u2"
    assert sorted(p.name for p in store.rglob("*") if p.is_file()) == sorted([f"{png_sha}.png", f"{pdf_sha}.pdf"])
    assert not list((store / ".tmp").iterdir())  # no temporary file left behind, even for the cut one
    assert "location" not in cdn.hits and cdn.hits.get("moved.png") == 1

    assert metric("messenger_media_stored_total") - stored_before == 3
    for reason in ("too_large", "type_not_allowed", "timeout", "host_not_allowed"):
        assert metric("messenger_media_failures_total", reason=reason) - before[reason] == 1, reason
    assert metric("messenger_media_failures_total", reason="http_error") - before["http_error"] == 2  # 404, 302
    # the event of the first record (no attachments) gave nothing, and nothing was written twice
    assert all(e["event_id"] != "ev-billing-0:media:0" for e in on_billing)


async def test_off_without_a_store(tmp_path: Path) -> None:
    opts = MediaOptions(bootstrap_servers="127.0.0.1:1", skill_topic_prefix="skill.", group_id="g",
                        media=Media())
    with pytest.raises(CliError, match=r"media keeping is off"):
        _ = opts.store
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    opts = MediaOptions(bootstrap_servers="127.0.0.1:1", skill_topic_prefix="skill.", group_id="g",
                        media=Media(store=str(blocked)))
    with pytest.raises(CliError, match="is not a writable directory"):
        await serve(opts, asyncio.Event())


async def test_a_photo_from_messenger_is_kept_end_to_end(
    make_worker: Callable[..., Worker], kafka: KafkaIO, cdn: Cdn, tmp_path: Path
) -> None:
    """webhook → worker → consumer_message on the skill topic → media keeper → media_stored."""
    w = make_worker(BASE_CONFIG + "\n[csat]\nenabled = false\n")
    store = tmp_path / "kept"
    opts = MediaOptions(bootstrap_servers=kafka.bootstrap, skill_topic_prefix=w.topic("skill."),
                        group_id=f"media-{uuid.uuid4().hex[:8]}",
                        media=Media(store=str(store), allowed_hosts=["127.0.0.1"]))
    stop, ready = asyncio.Event(), asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    task = asyncio.create_task(serve(opts, stop, on_ready=on_ready))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        item = {"sender": {"id": "u1"}, "recipient": {"id": BILLING_PAGE}, "timestamp": int(time.time() * 1000),
                "message": {"mid": "m-photo", "attachments": [{"type": "image", "payload": {"url": f"{cdn.url}/a.png"}}]}}
        await kafka.send(w.topic("messenger.webhook.raw"),
                         orjson.dumps({"object": "page", "entry": [{"id": BILLING_PAGE, "messaging": [item]}]}))
        [kept] = await wait_for(kafka, w.topic("skill.billing"), 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    events = await kafka.read_json(w.topic("skill.billing"))
    [message] = [e for e in events if e["type"] == "consumer_message"]
    assert (kept["mid"], kept["conversation_id"], kept["event_id"]) == (
        "m-photo", message["conversation_id"], message["event_id"] + ":media:0")
    assert (store / kept["key"]).read_bytes() == PNG

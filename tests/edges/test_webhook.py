"""The webhook endpoint: signature checks (unit), HTTP behaviour with a stand-in producer, and the
real command end to end: signed POST → raw topic → worker → the page's skill topic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from streams.edges.webhook import WebhookOptions, create_app, sign, verify_signature
from tests.conftest import SAMPLES
from tests.kafkatools import ROOT, KafkaIO, Worker, free_port

SECRET = b"0f1e2d3c4b5a69788796a5b4c3d2e1f0"
VERIFY_TOKEN = "verify-me-please"
PAGE = "1691462197845448"


def body(mid: str, text: str = "hi there", psid: str = "1254938275682919") -> bytes:
    return orjson.dumps({"object": "page", "entry": [{"id": PAGE, "time": 1700000000000, "messaging": [
        {"sender": {"id": psid}, "recipient": {"id": PAGE}, "timestamp": 1700000000000,
         "message": {"mid": mid, "text": text}}]}]})


def metric(result: str) -> float:
    return REGISTRY.get_sample_value("messenger_webhook_requests_total", {"result": result}) or 0.0


# --- signature ------------------------------------------------------------------------------------


def test_signature_verification() -> None:
    raw = (SAMPLES / "01_text_message.json").read_bytes()
    good = sign(raw, SECRET)
    assert good.startswith("sha256=") and len(good) == 7 + 64
    assert verify_signature(raw, good, SECRET)
    assert verify_signature(raw, good.upper().replace("SHA256=", "sha256="), SECRET)  # hex case
    assert not verify_signature(raw, good, b"another secret")
    assert not verify_signature(raw + b" ", good, SECRET)  # exact bytes: re-serialized JSON fails
    assert not verify_signature(orjson.dumps(orjson.loads(raw)), good, SECRET)
    assert not verify_signature(raw, None, SECRET)
    assert not verify_signature(raw, "", SECRET)
    assert not verify_signature(raw, good.removeprefix("sha256="), SECRET)
    assert not verify_signature(raw, "sha1=" + good[7:], SECRET)
    assert not verify_signature(raw, "sha256=", SECRET)
    assert not verify_signature(raw, "sha256=ü" + good[8:], SECRET)
    assert not verify_signature(raw, good, b"")


# --- HTTP with a stand-in producer ----------------------------------------------------------------


class FakeProducer:
    def __init__(self, fail: BaseException | None = None, delay: float = 0.0) -> None:
        self.sent: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []
        self.keys: list[bytes | None] = []
        self.fail = fail
        self.delay = delay

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> Any:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.sent.append((topic, value, list(headers or [])))
        self.keys.append(key)
        return None


def opts(**kw: Any) -> WebhookOptions:
    base: dict[str, Any] = {"bootstrap_servers": "unused", "raw_topic": "raw", "app_secret": SECRET,
                            "verify_token": VERIFY_TOKEN, "max_body_bytes": 10_000, "kafka_timeout": 0.3}
    base.update(kw)
    return WebhookOptions(**base)


async def client_for(producer: FakeProducer, **kw: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(opts(**kw), producer)))
    await client.start_server()
    return client


async def test_post_written_only_when_signed_and_acknowledged() -> None:
    prod = FakeProducer()
    client = await client_for(prod)
    try:
        raw = body("m1")
        before = metric("accepted"), metric("bad_signature"), metric("missing_signature")
        t0 = int(time.time() * 1000)
        r = await client.post("/webhook", data=raw, headers={"X-Hub-Signature-256": sign(raw, SECRET),
                                                            "Content-Type": "application/json"})
        assert r.status == 200
        assert len(prod.sent) == 1
        topic, value, headers = prod.sent[0]
        assert topic == "raw" and value == raw
        h = dict(headers)
        assert h["x-hub-signature-256"] == sign(raw, SECRET).encode()
        assert t0 <= int(h["received-at"]) <= int(time.time() * 1000)

        r = await client.post("/webhook", data=raw, headers={"X-Hub-Signature-256": sign(raw, b"wrong")})
        assert r.status == 403
        r = await client.post("/webhook", data=raw)
        assert r.status == 403
        assert len(prod.sent) == 1
        after = metric("accepted"), metric("bad_signature"), metric("missing_signature")
        assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    finally:
        await client.close()


async def test_a_body_of_one_conversation_is_keyed_by_it() -> None:
    """One hop: the raw record lands on its conversation's partition (decided there in place);
    a body of several conversations, or one the rules cannot read, goes unkeyed (split, repartitioned)."""
    prod = FakeProducer()
    client = await client_for(prod)
    two = orjson.loads(body("m2"))
    two["entry"].append(orjson.loads(body("m3", psid="42"))["entry"][0])
    bodies = [body("m1"), orjson.dumps(two), b'{"object": "page", "entry": [', body("m4", psid="7")]
    try:
        for raw in bodies:
            r = await client.post("/webhook", data=raw, headers={"X-Hub-Signature-256": sign(raw, SECRET)})
            assert r.status == 200
    finally:
        await client.close()
    assert prod.keys == [f"{PAGE}:1254938275682919".encode(), None, None, f"{PAGE}:7".encode()]


@pytest.mark.parametrize("producer", [FakeProducer(fail=ConnectionError("down")), FakeProducer(delay=2.0)])
async def test_kafka_failure_or_timeout_answers_503(producer: FakeProducer) -> None:
    client = await client_for(producer)
    try:
        before = metric("kafka_error")
        raw = body("m2")
        r = await client.post("/webhook", data=raw, headers={"X-Hub-Signature-256": sign(raw, SECRET)})
        assert r.status == 503
        assert metric("kafka_error") - before == 1
        assert producer.sent == []
    finally:
        await client.close()


async def test_too_large_413_by_length_and_by_chunked_read() -> None:
    prod = FakeProducer()
    client = await client_for(prod, max_body_bytes=1000)
    try:
        big = b'{"object":"page","entry":[],"pad":"' + b"x" * 2000 + b'"}'
        r = await client.post("/webhook", data=big, headers={"X-Hub-Signature-256": sign(big, SECRET)})
        assert r.status == 413

        async def chunks() -> Any:
            for _ in range(10):
                yield b"y" * 200

        r = await client.post("/webhook", data=chunks(), headers={"X-Hub-Signature-256": "sha256=00"})
        assert r.status == 413
        ok = body("m3")
        assert len(ok) < 1000
        r = await client.post("/webhook", data=ok, headers={"X-Hub-Signature-256": sign(ok, SECRET)})
        assert r.status == 200
        assert [v for _, v, _ in prod.sent] == [ok]
    finally:
        await client.close()


async def test_handshake() -> None:
    client = await client_for(FakeProducer())
    try:
        q = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
        r = await client.get("/webhook", params=q)
        assert r.status == 200 and await r.text() == "1158201444"
        assert r.content_type == "text/plain"
        r = await client.get("/webhook", params=q | {"hub.verify_token": "nope"})
        assert r.status == 403
        r = await client.get("/webhook", params=q | {"hub.mode": "unsubscribe"})
        assert r.status == 403
        r = await client.get("/healthz")
        assert r.status == 200
    finally:
        await client.close()
    client = await client_for(FakeProducer(), verify_token=None)  # no token configured: always refused
    try:
        r = await client.get("/webhook", params={"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"})
        assert r.status == 403
    finally:
        await client.close()


# --- the command, end to end over Kafka -------------------------------------------------------------


def _start_webhook(worker: Worker, tmp: Path, **extra_env: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    env = dict(worker.env)
    env.update({"MESSENGER_STREAMS_APP_SECRET": SECRET.decode(), "MESSENGER_STREAMS_VERIFY_TOKEN": VERIFY_TOKEN,
                "MESSENGER_STREAMS_WEBHOOK_PORT": str(port), "MESSENGER_STREAMS_WEBHOOK_HOST": "127.0.0.1",
                "MESSENGER_STREAMS_LOG_LEVEL": "info"})
    env.update(extra_env)
    log_path = tmp / "webhook.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(ROOT / ".venv/bin/messenger-streams"), "webhook"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"webhook exited {proc.returncode}: {log_path.read_text()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:  # noqa: S310 - local
                if r.status == 200:
                    return proc, url, log_path
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("webhook not ready")


@pytest.fixture
def webhook(make_worker: Callable[..., Worker], tmp_path: Path) -> Iterator[tuple[Worker, str, Path]]:
    w = make_worker(MESSENGER_STREAMS_MAX_BODY_BYTES="5000")
    proc, url, log_path = _start_webhook(w, tmp_path)
    yield w, url, log_path
    proc.terminate()
    proc.wait(30)
    assert proc.returncode == 0


@pytest.mark.kafka
async def test_signed_post_reaches_the_processor(webhook: tuple[Worker, str, Path], kafka: KafkaIO) -> None:
    w, url, log_path = webhook
    good = body("m.e2e-1", text="help with my bill")
    forged = body("m.e2e-forged", text="forged")
    async with aiohttp.ClientSession() as s:
        r = await s.post(url + "/webhook", data=good, headers={"X-Hub-Signature-256": sign(good, SECRET)})
        assert r.status == 200 and await r.text() == "EVENT_RECEIVED"
        r = await s.post(url + "/webhook", data=forged, headers={"X-Hub-Signature-256": sign(forged, b"not the secret")})
        assert r.status == 403
        r = await s.post(url + "/webhook", data=forged)
        assert r.status == 403
        big = b'{"object":"page","pad":"' + b"z" * 6000 + b'"}'
        r = await s.post(url + "/webhook", data=big, headers={"X-Hub-Signature-256": sign(big, SECRET)})
        assert r.status == 413
        q = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "CHALLENGE_ACCEPTED"}
        r = await s.get(url + "/webhook", params=q)
        assert r.status == 200 and await r.text() == "CHALLENGE_ACCEPTED"
        r = await s.get(url + "/webhook", params=q | {"hub.verify_token": "guess"})
        assert r.status == 403
        metrics_text = await (await s.get(url + "/metrics")).text()
    assert 'messenger_webhook_requests_total{result="accepted"} 1.0' in metrics_text
    assert 'messenger_webhook_requests_total{result="bad_signature"} 1.0' in metrics_text

    console = await kafka.read_json(w.topic("skill.billing"), min_count=1, timeout=60)
    assert [(e["mid"], e["text"]) for e in console if e["type"] == "consumer_message"] == [
        ("m.e2e-1", "help with my bill")]
    raw = await kafka.read_all(w.topic("messenger.webhook.raw"), min_count=1, settle=0.5)
    assert [r.value for r in raw] == [good]  # exact bytes; nothing from the refused requests
    headers = dict(raw[0].headers)
    assert headers["x-hub-signature-256"] == sign(good, SECRET).encode()
    assert int(headers["received-at"]) > 1_700_000_000_000
    logs = log_path.read_text()
    assert SECRET.decode() not in logs and VERIFY_TOKEN not in logs


def test_missing_app_secret_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_")}
    proc = subprocess.run([str(ROOT / ".venv/bin/messenger-streams"), "webhook"], env=env, capture_output=True,
                          timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "app secret" in err and "Traceback" not in err

"""The Send API dispatcher on a real Kafka broker against a local fake Graph API."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from prometheus_client import REGISTRY

from streams.core.topics import ensure_topics
from streams.edges import dispatch as dispatch_module
from streams.edges.dispatch import Dispatcher, DispatchOptions, serve
from streams.edges.sentlog import SentLedger, ensure_sent_log_topic
from streams.rules.sendapi import (
    IN_DOUBT_AGAIN,
    IN_FLIGHT,
    SEND,
    SUPERSEDED,
    Backoff,
    Limits,
    after_marker,
    entry_key,
    entry_value,
)
from tests.conftest import BASE_CONFIG
from tests.dispatchtools import DispatcherProcess, audit_sends
from tests.dispatchtools import outbound as stage_outbound
from tests.fakegraph import (
    BAD_TOKEN,
    OUTSIDE_WINDOW,
    PERSON_UNAVAILABLE,
    RATE_LIMIT,
    TEMPORARY,
    Answer,
    FakeGraph,
)
from tests.kafkatools import ROOT, KafkaIO, Worker, free_port, worker_env

pytestmark = pytest.mark.kafka

PAGE = "1691462197845448"
PAGE2 = "298733926841562"
TOKENS = {PAGE: "EAAtokenForBillingPage0001", PAGE2: "EAAtokenForSupportPage0002"}


def outbound(psid: str, outbox_id: str, request: dict[str, Any] | None = None, page: str = PAGE,
             text: str = "hello") -> dict[str, Any]:
    req = request or {"recipient": {"id": psid}, "messaging_type": "RESPONSE", "message": {"text": text}}
    return {"page_id": page, "psid": psid, "outbox_id": outbox_id, "conversation_id": f"c-{psid}",
            "origin": "agent", "request": req, "agent_id": "a1", "skill": "billing"}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Running:
    opts: DispatchOptions
    stop: asyncio.Event
    task: asyncio.Task[None]
    dispatcher: Dispatcher

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 60)


@dataclass
class Harness:
    graph: FakeGraph
    kafka: KafkaIO
    opts: DispatchOptions
    running: list[Running]

    async def start(self, **changes: Any) -> Running:
        opts = dataclasses.replace(self.opts, **changes)
        stop, ready = asyncio.Event(), asyncio.Event()

        async def on_ready() -> None:
            ready.set()

        d = Dispatcher(opts)
        task = asyncio.create_task(serve(opts, stop, on_ready=on_ready, dispatcher=d))
        done, _ = await asyncio.wait([task, asyncio.create_task(ready.wait())], timeout=60,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        r = Running(opts, stop, task, d)
        self.running.append(r)
        return r

    async def send(self, value: dict[str, Any]) -> None:
        await self.kafka.send(self.opts.outbound_topic, value, key=f"{value['page_id']}:{value['psid']}")

    async def results(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        return await self.kafka.read_json(self.opts.results_topic, min_count=count, timeout=timeout, settle=0.3)


@pytest.fixture
async def harness(kafka_bootstrap: str, kafka: KafkaIO) -> AsyncIterator[Harness]:
    graph = FakeGraph()
    await graph.start()
    tag = uuid.uuid4().hex[:10]
    opts = DispatchOptions(
        bootstrap_servers=kafka_bootstrap,
        outbound_topic=f"t{tag}.messenger.outbound",
        results_topic=f"t{tag}.messenger.send.results",
        sent_topic=f"t{tag}.messenger.dispatch.sent",
        dlq_topic=f"t{tag}.messenger.dlq",
        group_id=f"ms-test-{tag}-dispatch",
        tokens=dict(TOKENS),
        graph_url=graph.url,
        backoff=Backoff(base=0.05, cap=0.2, max_attempts=4, jitter=0.0),
        request_timeout=1.0,
        partitions=2,
        shutdown_timeout=5.0,
    )
    h = Harness(graph, kafka, opts, [])
    try:
        yield h
    finally:
        for r in h.running:
            if not r.task.done():
                await r.close()
        await graph.stop()


async def test_outbound_request_reaches_graph_and_result_is_written(harness: Harness) -> None:
    await harness.start()
    text_req = outbound("u1", "o-1", text="Hi, how can I help?")
    typing = outbound("u2", "o-2", {"recipient": {"id": "u2"}, "sender_action": "typing_on"}, page=PAGE2)
    await harness.send(text_req)
    await harness.send(typing)
    results = await harness.results(2)
    reqs = await harness.graph.wait_for(2)

    by_psid = {r.psid: r for r in reqs}
    assert by_psid["u1"].path == "/v21.0/me/messages"
    assert by_psid["u1"].query == {"access_token": TOKENS[PAGE]}
    assert by_psid["u1"].body == text_req["request"]
    assert by_psid["u2"].query == {"access_token": TOKENS[PAGE2]}
    assert by_psid["u2"].body == {"recipient": {"id": "u2"}, "sender_action": "typing_on"}

    res = {r["outbox_id"]: r for r in results}
    assert res["o-1"]["status"] == "sent" and res["o-1"]["mid"].startswith("m_")
    assert res["o-1"]["mids"] == [res["o-1"]["mid"]] and res["o-1"]["attempts"] == 1
    assert res["o-1"]["conversation_id"] == "c-u1" and res["o-1"]["origin"] == "agent"
    assert res["o-2"]["status"] == "sent" and res["o-2"]["mid"] is None
    recs = await harness.kafka.read_all(harness.opts.results_topic, min_count=2, settle=0.2)
    assert sorted(r.key for r in recs) == [f"{PAGE}:u1".encode(), f"{PAGE2}:u2".encode()]


async def test_613_is_retried_then_succeeds_and_blocks_only_its_conversation(harness: Harness) -> None:
    await harness.start()
    retried_before = metric("messenger_send_results_total", result="retried")
    harness.graph.script("u1", Answer(400, RATE_LIMIT), Answer(500, TEMPORARY))
    await harness.send(outbound("u1", "o-1", text="first"))
    await harness.send(outbound("u1", "o-2", text="second"))
    await harness.send(outbound("u9", "o-9", text="other conversation"))
    results = await harness.results(3)
    res = {r["outbox_id"]: r for r in results}
    assert res["o-1"]["status"] == "sent" and res["o-1"]["attempts"] == 3
    assert res["o-2"]["status"] == "sent" and res["o-2"]["attempts"] == 1
    assert res["o-9"]["status"] == "sent"
    u1 = harness.graph.sent_to("u1")
    assert [r.text for r in u1] == ["first", "first", "first", "second"]  # order kept through retries
    assert [r.status for r in u1] == [400, 500, 200, 200]
    assert u1[1].at - u1[0].at >= 0.045 and u1[2].at - u1[1].at >= 0.09  # backoff 0.05, 0.1
    other = harness.graph.sent_to("u9")[0]
    assert other.at < u1[2].at  # the other conversation did not wait for u1's retries
    assert metric("messenger_send_results_total", result="retried") - retried_before == 2


async def test_551_fails_without_retry(harness: Harness) -> None:
    await harness.start()
    harness.graph.script("u5", Answer(400, PERSON_UNAVAILABLE))
    harness.graph.script("u6", Answer(400, OUTSIDE_WINDOW))
    await harness.send(outbound("u5", "o-5"))
    await harness.send(outbound("u6", "o-6"))
    results = await harness.results(2)
    res = {r["outbox_id"]: r for r in results}
    assert res["o-5"] | {"timestamp": 0} == res["o-5"] | {
        "status": "failed", "code": 551, "subcode": 1545041, "retryable": False, "attempts": 1, "mid": None,
        "message": "(#551) This person isn't available right now.", "timestamp": 0}
    assert res["o-6"]["code"] == 10 and res["o-6"]["subcode"] == 2018065 and res["o-6"]["reason"] == "window_closed"
    assert res["o-6"]["retryable"] is False
    await asyncio.sleep(0.5)
    assert len(harness.graph.sent_to("u5")) == 1 and len(harness.graph.sent_to("u6")) == 1


async def test_retryable_errors_give_up_after_max_attempts_and_timeouts_are_in_doubt(harness: Harness) -> None:
    await harness.start()
    harness.graph.script("u7", *[Answer(500, TEMPORARY)] * 4)
    harness.graph.script("u8", Answer(200, delay=1.5))  # over request_timeout=1.0: it did reach Graph
    await harness.send(outbound("u7", "o-7"))
    await harness.send(outbound("u8", "o-8"))
    res = {r["outbox_id"]: r for r in await harness.results(2)}
    assert res["o-7"]["status"] == "failed" and res["o-7"]["retryable"] is True and res["o-7"]["attempts"] == 4
    assert res["o-7"]["code"] == 1200
    # a timeout after the request was written may have delivered it: reported in doubt, never resent
    assert res["o-8"]["status"] == "failed" and res["o-8"]["reason"] == "in_doubt" and res["o-8"]["attempts"] == 1
    assert res["o-8"]["retryable"] is True and "echo" in res["o-8"]["message"]
    assert len(harness.graph.sent_to("u7")) == 4
    await asyncio.sleep(1.0)  # the fake answers u8 late; nothing else may arrive
    assert len(harness.graph.sent_to("u8")) == 1


async def test_connection_refused_is_retried(harness: Harness) -> None:
    """No connection: the request cannot have reached Graph, so it is retried (then fails retryable)."""
    await harness.start(graph_url=f"http://127.0.0.1:{free_port()}")
    await harness.send(outbound("u9", "o-9"))
    res = (await harness.results(1))[0]
    assert res["status"] == "failed" and res["reason"] == "connection_error"
    assert res["retryable"] is True and res["attempts"] == 4


async def test_long_text_is_split_in_order(harness: Harness) -> None:
    await harness.start()
    words = [f"w{i:05d}" for i in range(700)]
    text = " ".join(words)  # 4899 characters
    qrs = [{"content_type": "text", "title": "Yes, that solved everything", "payload": "YES"}]
    req = {"recipient": {"id": "u3"}, "messaging_type": "RESPONSE", "message": {"text": text, "quick_replies": qrs}}
    await harness.send(outbound("u3", "o-3", req))
    results = await harness.results(1)
    parts = harness.graph.sent_to("u3")
    assert len(parts) == 3
    assert " ".join(p.text or "" for p in parts) == text
    assert all(len(p.text or "") <= 2000 for p in parts)
    assert [("quick_replies" in p.body["message"]) for p in parts] == [False, False, True]
    assert parts[2].body["message"]["quick_replies"][0]["title"] == "Yes, that solved eve"
    r = results[0]
    assert r["status"] == "sent" and len(r["mids"]) == 3 and r["mid"] == r["mids"][-1]


async def test_unknown_page_fails_and_offsets_are_committed(harness: Harness) -> None:
    first = await harness.start(max_in_flight=2)  # backpressure: never more than 2 records taken
    await harness.send(outbound("u1", "o-1", page="999"))
    for i in range(5):
        await harness.send(outbound(f"v{i}", f"o-v{i}"))
    res = {r["outbox_id"]: r for r in await harness.results(6)}
    assert res["o-1"]["status"] == "failed" and "no access token" in res["o-1"]["message"]
    assert res["o-1"]["retryable"] is False and res["o-1"]["attempts"] == 0
    await first.close()
    # committed offsets cover every record: a restarted dispatcher of the same group sends nothing again
    consumer = AIOKafkaConsumer(bootstrap_servers=harness.opts.bootstrap_servers, group_id=harness.opts.group_id,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(harness.opts.outbound_topic, p) for p in range(2)]
        ends = await consumer.end_offsets(tps)
        committed = {tp: await consumer.committed(tp) for tp in tps}
        assert all((committed[tp] or 0) == ends[tp] for tp in tps), (committed, ends)
    finally:
        await consumer.stop()
    sent_before = len(harness.graph.requests)
    await harness.start()
    await harness.send(outbound("w1", "o-w1"))
    await harness.results(7)
    await asyncio.sleep(0.5)
    assert [r.psid for r in harness.graph.requests[sent_before:]] == ["w1"]


async def test_per_page_rate_limit(harness: Harness) -> None:
    await harness.start(rate_per_page=40.0, burst=1.0)
    n = 21
    for i in range(n):
        await harness.send(outbound(f"r{i}", f"o-r{i}", {"recipient": {"id": f"r{i}"}, "sender_action": "mark_seen"}))
    await harness.results(n)
    reqs = harness.graph.requests
    span = max(r.at for r in reqs) - min(r.at for r in reqs)
    # 21 sends at 40/s with burst 1: at least 20 gaps of 25 ms
    assert span >= 0.45, span
    assert span < 3.0, span


async def test_190_marks_page_for_reauth_via_the_command(harness: Harness, tmp_path: Path) -> None:
    """The real `messenger-streams dispatch` command: 190 → failed result, reauth gauge on /metrics,
    no token in its logs; later sends of that page fail fast without calling Graph."""
    env = worker_env(harness.opts.bootstrap_servers, tmp_path, BASE_CONFIG, partitions=2)
    prefix = env["MESSENGER_STREAMS_TOPIC_PREFIX"]
    opts = dataclasses.replace(harness.opts, outbound_topic=f"{prefix}messenger.outbound",
                               results_topic=f"{prefix}messenger.send.results",
                               sent_topic=f"{prefix}messenger.dispatch.sent", dlq_topic=f"{prefix}messenger.dlq")
    harness.opts = opts
    web_port = free_port()
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_bytes(orjson.dumps({PAGE2: TOKENS[PAGE2]}))
    env.update({
        "MESSENGER_STREAMS_PAGE_TOKENS": orjson.dumps({PAGE: TOKENS[PAGE]}).decode(),
        "MESSENGER_STREAMS_GRAPH_URL": harness.graph.url,
        "MESSENGER_STREAMS_GRAPH_API_VERSION": "v22.0",
        "MESSENGER_STREAMS_LOG_LEVEL": "debug",
    })
    log_path = tmp_path / "dispatch.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/messenger-streams"), "dispatch", "--tokens-file", str(tokens_file),
             "--backoff-base", "0.05", "--web-port", str(web_port)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        harness.graph.script("u1", Answer(400, BAD_TOKEN))
        await harness.send(outbound("u1", "o-1"))
        await harness.send(outbound("u1", "o-2"))
        await harness.send(outbound("u2", "o-3", page=PAGE2))
        res = {r["outbox_id"]: r for r in await harness.results(3, timeout=60)}
        assert res["o-1"]["status"] == "failed" and res["o-1"]["code"] == 190 and res["o-1"]["retryable"] is False
        assert res["o-2"]["status"] == "failed" and res["o-2"]["code"] == 190 and res["o-2"]["attempts"] == 0
        assert res["o-3"]["status"] == "sent"
        assert [r.path for r in harness.graph.requests] == ["/v22.0/me/messages"] * 2
        assert {r.query["access_token"] for r in harness.graph.requests} == {TOKENS[PAGE], TOKENS[PAGE2]}
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{web_port}/metrics")
        assert f'messenger_pages_need_reauth{{page_id="{PAGE}"}} 1.0' in text
        assert f'page_id="{PAGE2}"' not in text
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0
    logs = log_path.read_text()
    assert "190" in logs and "re-author" in logs
    for token in TOKENS.values():
        assert token not in logs


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - local test server
        return str(resp.read().decode())


def test_dispatch_without_tokens_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_")}
    proc = subprocess.run([str(ROOT / ".venv/bin/messenger-streams"), "dispatch"], env=env,
                          capture_output=True, timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "MESSENGER_STREAMS_PAGE_TOKENS" in err
    bad = tmp_path / "tokens.json"
    bad.write_text('{"1": 5}')
    proc = subprocess.run([str(ROOT / ".venv/bin/messenger-streams"), "dispatch", "--tokens-file", str(bad)],
                          env=env, capture_output=True, timeout=60)
    assert proc.returncode == 2 and "non-empty strings" in proc.stderr.decode()



async def test_agent_reply_through_the_conversation_stage(
    harness: Harness, make_worker: Callable[..., Worker], kafka: KafkaIO
) -> None:
    """agent.actions `message` → worker → messenger.outbound → dispatcher → fake Graph → send result →
    worker → `agent_message` with the mid on the skill topic (and `send_failed` for a 551)."""
    w = make_worker()
    harness.opts = dataclasses.replace(harness.opts, outbound_topic=w.topic("messenger.outbound"),
                                       results_topic=w.topic("messenger.send.results"),
                                       sent_topic=w.topic("messenger.dispatch.sent"), dlq_topic=w.topic("messenger.dlq"))
    await harness.start()
    # welcome, "connected to" (lifecycle #13: the accept below) and the agent's reply all fail for this person
    harness.graph.script("psid-blocked", *(Answer(400, PERSON_UNAVAILABLE) for _ in range(3)))
    now = int(time.time() * 1000)
    psids = ("psid-ok", "psid-blocked")
    for psid in psids:
        raw = orjson.dumps({"object": "page", "entry": [{"id": PAGE, "time": now, "messaging": [
            {"sender": {"id": psid}, "recipient": {"id": PAGE}, "timestamp": now,
             "message": {"mid": f"m.in-{psid}", "text": "my bill is wrong"}}]}]})
        await kafka.send(w.topic("messenger.webhook.raw"), raw)
    opened = await kafka.read_json(w.topic("skill.billing"), min_count=2, timeout=60, settle=0.3)
    assert {e["psid"] for e in opened if e["type"] == "conversation_opened"} == set(psids)
    for psid in psids:
        # lifecycle (#13): only the assigned agent may write; billing has no auto-accept, so accept first
        await kafka.send(w.topic("agent.actions"), {
            "type": "accept", "action_id": f"acc-{psid}", "page_id": PAGE, "psid": psid, "agent_id": "agent7",
            "timestamp": int(time.time() * 1000)}, key=f"{PAGE}:{psid}")
        await kafka.send(w.topic("agent.actions"), {
            "type": "message", "action_id": f"act-{psid}", "page_id": PAGE, "psid": psid, "agent_id": "agent7",
            "text": "Let me check that for you.", "timestamp": int(time.time() * 1000)}, key=f"{PAGE}:{psid}")

    deadline = time.monotonic() + 60
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = await kafka.read_json(w.topic("skill.billing"), settle=0.3, timeout=5)
        with_mid = [e for e in events if e["type"] == "agent_message" and e.get("mid")]
        failed = [e for e in events if e["type"] == "send_failed" and e.get("origin") == "agent"]
        if with_mid and failed:
            break
        await asyncio.sleep(0.5)
    sent = [r for r in harness.graph.sent_to("psid-ok") if r.text == "Let me check that for you."]
    assert len(sent) == 1 and sent[0].query["access_token"] == TOKENS[PAGE]
    results = [r for r in await harness.results(2) if r["origin"] == "agent"]
    by_psid = {r["psid"]: r for r in results}
    ok = next(e for e in events if e["type"] == "agent_message" and e.get("mid"))
    assert ok["psid"] == "psid-ok" and ok["mid"] == by_psid["psid-ok"]["mid"] and ok["agent_id"] == "agent7"
    assert ok["outbox_id"] == by_psid["psid-ok"]["outbox_id"] and ok["mid"].startswith("m_")
    bad = next(e for e in events if e["type"] == "send_failed" and e.get("origin") == "agent")
    assert bad["psid"] == "psid-blocked" and bad["code"] == 551 and bad["retryable"] is False
    assert bad["outbox_id"] == by_psid["psid-blocked"]["outbox_id"]


# --- at most once per outbox id (issue #12) -----------------------------------------------------------


async def test_redelivered_outbound_records_reach_graph_once(harness: Harness, kafka: KafkaIO) -> None:
    """The same outbox ids again (the conversation stage re-sending after its crash), then the group's
    offsets reset to the beginning (everything redelivered): one Graph call per outbox id, and every
    copy answered with the SendResult of the first."""
    first = await harness.start()
    records = [stage_outbound(f"r{i % 4}", f"ob-{i}", text=f"message {i}") for i in range(12)]
    for value in records:
        await harness.send(value)
    await harness.results(12)
    for value in records:
        await harness.send(value)
    results = await harness.results(24)
    assert len(harness.graph.requests) == 12 and not harness.graph.duplicates()
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_id.setdefault(r["outbox_id"], []).append(r)
    assert all(len(rs) == 2 and rs[0] == rs[1] and rs[0]["status"] == "sent" for rs in by_id.values())
    await first.close()

    consumer = AIOKafkaConsumer(bootstrap_servers=harness.opts.bootstrap_servers, group_id=harness.opts.group_id,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(harness.opts.outbound_topic, p) for p in range(2)]
        consumer.assign(tps)
        await consumer.commit(dict.fromkeys(tps, 0))
    finally:
        await consumer.stop()
    replayed = metric("messenger_send_results_total", result="deduplicated")
    await harness.start()
    await harness.send(stage_outbound("r9", "ob-new"))
    results = await harness.results(24 + 24 + 1)
    assert metric("messenger_send_results_total", result="deduplicated") - replayed == 24
    assert len(harness.graph.requests) == 13 and not harness.graph.duplicates()
    audit = audit_sends(harness.graph, results, [v["outbox_id"] for v in records] + ["ob-new"])
    assert audit.ok and not audit.in_doubt, audit.summary()


async def test_invalid_records_and_failures_go_to_the_dead_letter_topic(
    harness: Harness, kafka: KafkaIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not JSON, not an OutboundRequest, a tombstone, and a record whose handling raises: each one is
    dead-lettered with its original bytes and source, and the dispatcher goes on."""
    real_prepare = dispatch_module.prepare_requests

    def exploding(request: dict[str, Any], limits: Any) -> Any:
        if request.get("message", {}).get("metadata") == "ob-boom":
            raise RuntimeError("boom while preparing")
        return real_prepare(request, limits)

    monkeypatch.setattr(dispatch_module, "prepare_requests", exploding)
    await harness.start()
    key = f"{PAGE}:u1"
    bad = [b"{not json", orjson.dumps({"page_id": PAGE, "psid": "u1"}), None,
           orjson.dumps(stage_outbound("u1", "ob-boom"))]
    for value in bad:
        p = await kafka.producer()
        await p.send_and_wait(harness.opts.outbound_topic, value, key=key.encode())
    await harness.send(stage_outbound("u1", "ob-ok"))
    results = await harness.results(1)
    assert [r["outbox_id"] for r in results] == ["ob-ok"] and results[0]["status"] == "sent"
    letters = await kafka.read_all(harness.opts.dlq_topic, min_count=4, settle=0.3)
    parsed = [orjson.loads(r.value) for r in letters]
    parsed.sort(key=lambda d: d["source"]["offset"])
    assert [d["reason"] for d in parsed] == ["invalid_outbound"] * 3 + ["processing_error"]
    assert [d["payload"].encode() for d in parsed] == [v or b"" for v in bad]
    assert all(d["source"]["topic"] == harness.opts.outbound_topic for d in parsed)
    assert "page_id" not in parsed[0]["error"] and "outbox_id" in parsed[1]["error"]
    assert "boom while preparing" in parsed[3]["error"]
    assert {r.key for r in letters} == {key.encode()}
    assert [r.outbox_id for r in harness.graph.requests] == ["ob-ok"]


async def test_two_dispatchers_hand_conversations_over_without_sending_twice(harness: Harness) -> None:
    """A second dispatcher joins mid-stream, then the first stops: every outbox id reaches Graph
    exactly once, in order per conversation, never two requests of one conversation at once."""
    # so that the stream lasts long enough (≥ 10 s) for two rebalances, also on a loaded machine
    harness.graph.default_delay = 0.25
    harness.opts = dataclasses.replace(harness.opts, partitions=4)
    first = await harness.start()
    convs, per_conv = 16, 40
    records = [stage_outbound(f"h{c}", f"ob-{c}-{i}", text=f"{c}/{i}") for i in range(per_conv) for c in range(convs)]
    for value in records:
        await harness.send(value)
    total = convs * per_conv
    await _until(lambda: len(harness.graph.requests) >= total // 5, 60)
    second = await harness.start()  # same group: a rebalance while sends are in flight
    await _until(lambda: first.dispatcher.owned and second.dispatcher.owned, 60)
    assert len(harness.graph.requests) < total
    await _until(lambda: len(harness.graph.requests) >= total // 2, 60)
    await first.close()  # the second takes every partition
    assert len(harness.graph.requests) < total  # the second dispatcher sends the rest
    results = await harness.results(total, timeout=90)
    audit = audit_sends(harness.graph, results, [v["outbox_id"] for v in records])
    assert audit.ok and not audit.in_doubt, audit.summary()
    assert all(audit.delivered.get(v["outbox_id"]) == 1 for v in records)
    for c in range(convs):
        texts = [r.text for r in harness.graph.sent_to(f"h{c}")]
        assert texts == [f"{c}/{i}" for i in range(per_conv)], texts
    assert max(harness.graph.max_concurrent.values()) == 1
    # sends were recorded under three generations of owners: first alone, both, second alone
    claims = await _claims(harness)
    assert len(claims) >= 12
    log_values = [orjson.loads(r.value) for r in await harness.kafka.read_all(harness.opts.sent_topic, settle=0.2)
                  if r.value is not None]
    owners = {v["by"] for v in log_values if v.get("state") == "in_flight"}
    assert len(owners) >= 3 and owners <= set(claims)


async def _claims(harness: Harness) -> list[str]:
    """The owner tokens of the claim records in the sent log, in log order per partition."""
    recs = await harness.kafka.read_all(harness.opts.sent_topic, settle=0.1, timeout=5)
    return [orjson.loads(r.value)["claim"] for r in recs if r.key == b"~claim" and r.value is not None]


async def test_a_send_waiting_for_a_retry_is_released_on_revoke(harness: Harness) -> None:
    """A conversation in backoff after a 613 when its partition is revoked: the wait stops, nothing
    reached Graph, so the marker is released and the partition's next owner sends it, once."""
    harness.graph.script("slow", Answer(400, RATE_LIMIT))
    first = await harness.start(backoff=Backoff(base=20.0, cap=20.0, max_attempts=3, jitter=0.0))
    await harness.send(stage_outbound("slow", "ob-slow"))
    await _until(lambda: len(harness.graph.sent_to("slow")) == 1, 30)
    started = time.monotonic()
    await first.close()  # stop = revoke everything; must not sit out the 20 s backoff
    assert time.monotonic() - started < 15
    await harness.start()
    results = await harness.results(1, timeout=60)
    assert results[0]["status"] == "sent" and results[0]["attempts"] == 1  # a fresh send by the next owner
    assert [r.status for r in harness.graph.sent_to("slow")] == [400, 200]


async def test_a_split_text_released_between_its_parts_is_reported_not_resent(harness: Harness) -> None:
    """Part 1 delivered, part 2 waiting out a 613 when the dispatcher stops: it reports `cancelled`
    with the mid of part 1; the next dispatcher replays that result and sends nothing again."""
    harness.graph.script("split", Answer(200), Answer(400, RATE_LIMIT))
    opts = {"backoff": Backoff(base=20.0, cap=20.0, max_attempts=3, jitter=0.0), "limits": Limits(text=12)}
    first = await harness.start(**opts)
    await harness.send(stage_outbound("split", "ob-split", text="first part. second part"))
    await _until(lambda: len(harness.graph.sent_to("split")) == 2, 30)
    await first.close()
    res = (await harness.results(1))[0]
    assert res["status"] == "failed" and res["reason"] == "cancelled" and res["retryable"] is True
    assert res["parts"] == 2 and res["mids"] == [harness.graph.sent_to("split")[0].mid]
    await harness.start(**opts)
    await harness.send(stage_outbound("split", "ob-split", text="first part. second part"))  # the stage again
    results = await harness.results(2)
    assert results[1] == res
    assert [r.text for r in harness.graph.sent_to("split")] == ["first part.", "second part"]


async def test_sigkill_mid_batch_then_restart_sends_nothing_twice(harness: Harness, tmp_path: Path) -> None:
    """The real command SIGKILLed while Graph calls are in flight, then restarted: no outbox id
    reaches Graph twice; the ones whose call was in flight at the kill are reported in doubt; every
    other one is sent."""
    harness.graph.default_delay = 0.15
    env = worker_env(harness.opts.bootstrap_servers, tmp_path, BASE_CONFIG, partitions=2)
    prefix = env["MESSENGER_STREAMS_TOPIC_PREFIX"]
    harness.opts = dataclasses.replace(
        harness.opts, outbound_topic=f"{prefix}messenger.outbound", results_topic=f"{prefix}messenger.send.results",
        sent_topic=f"{prefix}messenger.dispatch.sent", dlq_topic=f"{prefix}messenger.dlq")
    env.update({"MESSENGER_STREAMS_PAGE_TOKENS": orjson.dumps(TOKENS).decode(),
                "MESSENGER_STREAMS_GRAPH_URL": harness.graph.url})
    proc = DispatcherProcess(env, tmp_path / "dispatch.log", ["--web-port", "0"])
    convs, per_conv = 10, 12
    records = [stage_outbound(f"k{c}", f"ob-{c}-{i}", text=f"{c}/{i}") for i in range(per_conv) for c in range(convs)]
    # written before the dispatcher (which creates its topics) starts: the broker creates no topic itself
    await ensure_topics(harness.opts.bootstrap_servers, {harness.opts.outbound_topic: False}, 2, 1)
    for value in records:
        await harness.send(value)
    total = convs * per_conv
    await asyncio.to_thread(proc.start)
    try:
        await _until(lambda: len(harness.graph.requests) >= total // 3 and harness.graph.in_flight(), 60)
        proc.kill()
        in_flight_at_kill = {r.outbox_id for r in harness.graph.in_flight()}
        before = len(harness.graph.requests)
        assert in_flight_at_kill and before < total  # killed mid-batch, with Graph calls open
        await asyncio.to_thread(proc.start)
        results = await harness.results(total, timeout=90)
        audit = audit_sends(harness.graph, results, [v["outbox_id"] for v in records])
        print("sigkill mid-batch:", audit.summary(), "open at the kill:", len(in_flight_at_kill))
        assert not audit.sent_twice and not audit.lost and not audit.unreported, audit.summary()
        assert not audit.inconsistent, audit.summary()
        # the calls open at the kill had a marker and no outcome: in doubt, never resent
        assert in_flight_at_kill <= audit.in_doubt
        assert len(audit.in_doubt) <= convs  # at most one open send per conversation
        for oid in audit.in_doubt:
            assert all(r["status"] == "failed" and r["retryable"] for r in audit.results[oid])
        for c in range(convs):
            texts = [r.text for r in harness.graph.sent_to(f"k{c}")]
            assert texts == sorted(texts, key=lambda t: int(t.split("/")[1])), texts
    finally:
        assert proc.stop() == 0


async def test_a_zombie_owner_is_fenced_through_the_log(harness: Harness, kafka: KafkaIO) -> None:
    """Two owners of one partition of the sent log (the first lost it without noticing): the first's
    marker after the second's claim is refused; the second does not send what the first marked."""
    o = harness.opts
    await ensure_topics(o.bootstrap_servers, {o.outbound_topic: False}, 1, 1)
    await ensure_sent_log_topic(o.bootstrap_servers, o.sent_topic, o.outbound_topic, o.sent_log, 1)
    producer = await kafka.producer()
    a = SentLedger(o.bootstrap_servers, o.sent_topic, producer, o.sent_log)
    b = SentLedger(o.bootstrap_servers, o.sent_topic, producer, o.sent_log)
    await a.start()
    await b.start()
    try:
        ta = (await a.acquire({0}))[0]
        tb = (await b.acquire({0}))[0]

        async def mark(ledger: SentLedger, token: str, outbox: str) -> str:
            off = await ledger.write(0, entry_key("c", outbox), entry_value("c", outbox, IN_FLIGHT, 1, token))
            await ledger.wait_applied(0, off)
            lg = ledger.log(0)
            return after_marker(lg, lg.get("c", outbox), token)

        assert await mark(a, ta, "x") == SUPERSEDED
        assert await mark(b, tb, "x") == IN_DOUBT_AGAIN
        assert await mark(b, tb, "y") == SEND
        # a third owner reading from the beginning sees the same: x in doubt, y in flight by b
        c = SentLedger(o.bootstrap_servers, o.sent_topic, producer, o.sent_log)
        await c.start()
        try:
            await c.acquire({0})
            x, y = c.log(0).get("c", "x"), c.log(0).get("c", "y")
            assert x is not None and x.granted is None and y is not None and y.granted == tb
        finally:
            await c.stop()
    finally:
        await a.stop()
        await b.stop()


async def _until(cond: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)

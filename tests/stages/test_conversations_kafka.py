"""Whole conversations on real Kafka: two pages and skills, agents, echoes, receipts, restart."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.kafkatools import KafkaIO, Worker

pytestmark = pytest.mark.kafka

BILLING_PAGE, SUPPORT_PAGE = "1691462197845448", "298733926841562"
APP_ID = 950864918368986
NO_CSAT = "\n[csat]\nenabled = false\n"


def now_ms() -> int:
    return int(time.time() * 1000)


def body(page: str, *items: dict[str, Any]) -> bytes:
    return orjson.dumps({"object": "page", "entry": [{"id": page, "time": now_ms(), "messaging": list(items)}]})


def consumer_msg(page: str, psid: str, mid: str, text: str) -> dict[str, Any]:
    return {"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": now_ms(), "message": {"mid": mid, "text": text}}


def echo(page: str, psid: str, mid: str, text: str, app_id: int | None, metadata: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"is_echo": True, "mid": mid, "text": text}
    if app_id is not None:
        message["app_id"] = app_id
    if metadata is not None:
        message["metadata"] = metadata
    return {"sender": {"id": page}, "recipient": {"id": psid}, "timestamp": now_ms(), "message": message}


def receipt(page: str, psid: str, kind: str, watermark: int) -> dict[str, Any]:
    return {"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": now_ms(), kind: {"watermark": watermark}}


class Console:
    """Reads console events of one worker's skill topics."""

    def __init__(self, kafka: KafkaIO, worker: Worker) -> None:
        self.kafka = kafka
        self.w = worker

    async def events(self, skill: str, min_count: int = 0, settle: float = 1.5) -> list[dict[str, Any]]:
        return await self.kafka.read_json(self.w.topic(f"skill.{skill}"), min_count=min_count, settle=settle, timeout=60)

    async def wait_for(self, skill: str, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 45) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        evs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            evs = await self.kafka.read_json(self.w.topic(f"skill.{skill}"), settle=0.3, timeout=10)
            if pred(evs):
                return evs
        raise AssertionError(f"condition not met on skill.{skill}; got {[e['type'] for e in evs]}")


async def action(kafka: KafkaIO, w: Worker, page: str, psid: str, type_: str, action_id: str, **fields: Any) -> None:
    value = {"type": type_, "action_id": action_id, "page_id": page, "psid": psid, "agent_id": "agent-7", **fields}
    await kafka.send(w.topic("agent.actions"), value, key=f"{page}:{psid}")


def of_type(evs: list[dict[str, Any]], t: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["type"] == t]


async def test_whole_conversations_across_two_pages(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    from tests.conftest import BASE_CONFIG

    w = make_worker(BASE_CONFIG + NO_CSAT)
    con = Console(kafka, w)
    raw = w.topic("messenger.webhook.raw")

    # two people, two pages → two skills
    first_body = body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "m-a1", "my bill is wrong"))
    await kafka.send(raw, first_body)
    await kafka.send(raw, body(SUPPORT_PAGE, consumer_msg(SUPPORT_PAGE, "bob", "m-b1", "hola")))
    # Meta redelivers alice's body: no duplicate console events
    await kafka.send(raw, first_body)
    # the page admin answers from the Page Inbox: an external message
    await kafka.send(raw, body(BILLING_PAGE, echo(BILLING_PAGE, "alice", "m-inbox", "Hi from the page", 263902037430900)))

    billing = await con.wait_for("billing", lambda e: len(of_type(e, "external_message")) == 1)
    support = await con.wait_for("support", lambda e: len(of_type(e, "consumer_message")) == 1)
    assert [e["type"] for e in billing] == ["conversation_opened", "system_message", "consumer_message", "external_message"]
    assert of_type(billing, "external_message")[0]["author"]["nickname"] == "FB External User"
    assert of_type(support, "conversation_opened")[0]["locale"] == "es_ES"
    conv_id = billing[0]["conversation_id"]
    assert all(e["conversation_id"] == conv_id for e in billing)

    # agent accepts and replies; the outbound request carries the outbox id as metadata
    await action(kafka, w, BILLING_PAGE, "alice", "accept", "act-1")
    await action(kafka, w, BILLING_PAGE, "alice", "message", "act-2", text="Let me check that")
    await action(kafka, w, BILLING_PAGE, "alice", "message", "act-2", text="Let me check that")  # redelivered
    await action(kafka, w, BILLING_PAGE, "alice", "message", "act-3", text="z" * 641)  # over the limit
    outbound = await kafka.read_json(w.topic("messenger.outbound"), min_count=4)
    agent_sends = [o for o in outbound if o["origin"] == "agent"]
    assert len(agent_sends) == 1
    send = agent_sends[0]
    assert send["request"]["messaging_type"] == "RESPONSE"
    assert send["request"]["message"] == {"text": "Let me check that", "metadata": send["outbox_id"]}

    # its echo comes back from our app: it gives the agent message its mid, never an external message
    await kafka.send(raw, body(BILLING_PAGE, echo(BILLING_PAGE, "alice", "m-agent", "Let me check that", APP_ID,
                                                  send["outbox_id"])))
    # receipts, out of order: the older read watermark after the newer one is ignored
    t = now_ms()
    await kafka.send(raw, body(BILLING_PAGE, receipt(BILLING_PAGE, "alice", "read", t)))
    await kafka.send(raw, body(BILLING_PAGE, receipt(BILLING_PAGE, "alice", "read", t - 5000)))
    await kafka.send(raw, body(BILLING_PAGE, receipt(BILLING_PAGE, "alice", "delivery", t - 1000)))

    billing = await con.wait_for("billing", lambda e: len(of_type(e, "status")) == 2)
    agent_msgs = of_type(billing, "agent_message")
    assert [(m["outbox_id"], m["mid"]) for m in agent_msgs] == [(send["outbox_id"], None), (send["outbox_id"], "m-agent")]
    assert len(of_type(billing, "external_message")) == 1
    assert sorted((s["status"], s["watermark"]) for s in of_type(billing, "status")) == [("delivered", t - 1000), ("read", t)]
    rejected = of_type(billing, "action_rejected")
    assert [(r["action_id"], r["reason"]) for r in rejected] == [("act-3", "text_too_long")]
    assert len(of_type(billing, "conversation_accepted")) == 1

    # restart in the middle: state is recovered, nothing lost or doubled
    before = Counter(e["event_id"] for e in billing)
    w.restart()
    await action(kafka, w, BILLING_PAGE, "alice", "transfer", "act-4", to_skill="support")
    support = await con.wait_for("support", lambda e: len(of_type(e, "conversation_transferred")) == 1)
    billing = await con.wait_for("billing", lambda e: len(of_type(e, "conversation_transferred")) == 1)
    assert of_type(support, "conversation_transferred")[0]["conversation_id"] == conv_id
    after = Counter(e["event_id"] for e in billing)
    assert all(n == 1 for n in after.values()), "an event was emitted twice"
    assert set(before) <= set(after)

    # close and reopen: history gets the summary; the next message opens a new conversation,
    # routed by its page again (billing), while the transferred one was closed in support
    # lifecycle (#13): after a transfer to a skill the conversation waits in that skill's queue; only
    # its new owner may close it, so the agent accepts it there first
    await action(kafka, w, BILLING_PAGE, "alice", "accept", "act-4b")
    await action(kafka, w, BILLING_PAGE, "alice", "close", "act-5")
    await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "m-a2", "one more thing")))
    support = await con.wait_for("support", lambda e: len(of_type(e, "conversation_closed")) == 1)
    closed = of_type(support, "conversation_closed")[0]
    assert closed["conversation_id"] == conv_id and closed["closed_by"] == "agent"
    history = await kafka.read_json(w.topic("conversations.history"), min_count=1)
    assert [h["conversation_id"] for h in history] == [conv_id]
    assert history[0]["skills"] == ["billing", "support"] and history[0]["agents"] == ["agent-7"]
    assert history[0]["consumer_messages"] == 1 and history[0]["agent_messages"] == 1
    billing = await con.wait_for("billing", lambda e: len(of_type(e, "conversation_opened")) == 2)
    new_conv = of_type(billing, "conversation_opened")[-1]
    assert new_conv["conversation_id"] != conv_id and new_conv["returning"] is True

    # no console event was emitted twice anywhere
    for skill in ("billing", "support", "general"):
        ids = [e["event_id"] for e in await con.events(skill)]
        assert len(ids) == len(set(ids))


async def test_unknown_conversation_and_malformed_actions(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    w = make_worker()
    con = Console(kafka, w)
    await action(kafka, w, BILLING_PAGE, "nobody", "message", "x-1", text="hello?")
    await kafka.send(w.topic("agent.actions"), {"type": "accept", "page_id": BILLING_PAGE, "psid": "zed"},
                     key=f"{BILLING_PAGE}:zed")  # no action_id, no agent_id
    await kafka.send(w.topic("agent.actions"), b"not json", key=f"{BILLING_PAGE}:zed")
    await kafka.send(w.topic("agent.actions"), {"type": "accept"}, key=None)
    evs = await con.wait_for("billing", lambda e: len(of_type(e, "action_rejected")) == 2)
    assert sorted(e["reason"] for e in evs) == ["invalid_action", "unknown_conversation"]
    dlq = await kafka.read_json(w.topic("messenger.dlq"), min_count=2)
    assert sorted(d["reason"] for d in dlq) == ["invalid_action", "invalid_action"]
    assert {d["payload"] for d in dlq} == {"not json", '{"type":"accept"}'}


async def test_hard_kill_mid_stream_loses_nothing_and_applies_nothing_twice(
    make_worker: Callable[..., Worker], kafka: KafkaIO
) -> None:
    """SIGKILL while a backlog is being processed: after the restart every consumer message is on its
    skill topic, each person has one conversation, and repeats (at-least-once) carry the same event id."""
    import signal

    from tests.conftest import BASE_CONFIG

    w = make_worker(BASE_CONFIG + NO_CSAT)
    raw = w.topic("messenger.webhook.raw")
    people = [f"k{i}" for i in range(40)]
    sent: set[str] = set()
    for round_ in range(5):
        for psid in people:
            mid = f"{psid}-{round_}"
            sent.add(mid)
            await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, psid, mid, "hello")))
    await asyncio.sleep(1.0)  # part of the backlog is processed, part is not
    w.stop(signal.SIGKILL)
    w.start()
    con = Console(kafka, w)
    evs = await con.wait_for("billing", lambda e: {m["mid"] for m in of_type(e, "consumer_message")} >= sent, timeout=120)
    by_id: dict[str, dict[str, Any]] = {}
    for e in evs:
        if e["event_id"] in by_id:
            assert by_id[e["event_id"]] == e, "a repeated event id must carry the same event"
        by_id[e["event_id"]] = e
    unique = list(by_id.values())
    assert sorted(m["mid"] for m in of_type(unique, "consumer_message")) == sorted(sent)
    opened = Counter(e["psid"] for e in of_type(unique, "conversation_opened"))
    assert opened == dict.fromkeys(people, 1)

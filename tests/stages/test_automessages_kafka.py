"""Automatic messages, sender actions, auto-accept, auto-close and proactive open on real Kafka.

Timers are at least 15 s (LivePerson's minimum); where a test only needs a timer to be overdue it
backdates the input instead of waiting (the rules run on the inputs' own time)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.conftest import BASE_CONFIG
from tests.kafkatools import KafkaIO, Worker
from tests.stages.test_conversations_kafka import (
    BILLING_PAGE,
    SUPPORT_PAGE,
    Console,
    action,
    body,
    consumer_msg,
    now_ms,
    of_type,
)

pytestmark = pytest.mark.kafka

CONFIG = BASE_CONFIG + """
[skills.billing]
auto_accept = true
auto_close_after_seconds = 15
waiting_for_agent_after_seconds = 15

[skills.support]
auto_close_after_seconds = 15

[csat]
enabled = false

[auto_messages.accepted.by_skill]
billing = "Billing agent {agent_nickname} is with you"
"""


def triggers(evs: list[dict[str, Any]], psid: str) -> list[str]:
    return [e["trigger"] for e in of_type(evs, "system_message") if e["psid"] == psid]


def mine(evs: list[dict[str, Any]], psid: str, type_: str) -> list[dict[str, Any]]:
    return [e for e in of_type(evs, type_) if e["psid"] == psid]


async def send_raw(kafka: KafkaIO, w: Worker, page: str, item: dict[str, Any], received_at: int | None = None) -> None:
    headers = [("received-at", str(received_at).encode())] if received_at is not None else None
    await kafka.send(w.topic("messenger.webhook.raw"), body(page, item), headers=headers)


async def test_triggers_sender_actions_and_auto_accept(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    w = make_worker(CONFIG)
    con = Console(kafka, w)
    # alice wrote 20 s ago (the record says when it was received): the 15 s queue timer is overdue
    await send_raw(kafka, w, BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "a1", "hello"), now_ms() - 20_000)
    evs = await con.wait_for("billing", lambda e: "waiting_for_agent" in triggers(e, "alice"))
    assert triggers(evs, "alice") == ["welcome_first", "waiting_for_agent"]

    # the first agent action (typing) takes the conversation in an auto-accept skill
    await action(kafka, w, BILLING_PAGE, "alice", "typing", "t-1", on=True, agent_nickname="Ana")
    await action(kafka, w, BILLING_PAGE, "alice", "typing", "t-2", on=False)
    await action(kafka, w, BILLING_PAGE, "alice", "read", "t-3")
    await action(kafka, w, BILLING_PAGE, "alice", "typing", "t-3b", on=True, agent_id="intruder")  # not hers
    evs = await con.wait_for("billing", lambda e: "accepted" in triggers(e, "alice")
                             and len(mine(e, "alice", "action_rejected")) == 1)
    (accepted,) = mine(evs, "alice", "conversation_accepted")
    assert accepted["agent_id"] == "agent-7"
    assert [e["text"] for e in mine(evs, "alice", "system_message") if e["trigger"] == "accepted"] == [
        "Billing agent Ana is with you"]
    assert [e["reason"] for e in mine(evs, "alice", "action_rejected")] == ["not_owner"]
    out = await kafka.read_json(w.topic("messenger.outbound"), min_count=5)
    actions = [o["request"].get("sender_action") for o in out if o["psid"] == "alice" and o["origin"] == "agent"]
    assert actions == ["typing_on", "typing_off", "mark_seen"]
    for o in out:
        if "sender_action" in o["request"]:
            assert set(o["request"]) == {"recipient", "sender_action"}  # each its own request

    await action(kafka, w, BILLING_PAGE, "alice", "transfer", "t-4", to_skill="support")
    await action(kafka, w, BILLING_PAGE, "alice", "accept", "t-5")
    await action(kafka, w, BILLING_PAGE, "alice", "close", "t-6")
    await action(kafka, w, BILLING_PAGE, "alice", "typing", "t-7", on=True)  # closed: dropped
    await send_raw(kafka, w, BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "a2", "me again"))
    evs = await con.wait_for("billing", lambda e: "welcome_returning" in triggers(e, "alice"))
    support = await con.events("support")
    assert triggers(support, "alice") == ["transferred", "accepted", "closed_by_agent"]
    assert [e["text"] for e in mine(support, "alice", "system_message") if e["trigger"] == "closed_by_agent"] == [
        "This conversation has been closed by an agent. Thank you for contacting us!"]  # no nickname: whole words
    out = await kafka.read_json(w.topic("messenger.outbound"))
    assert [o["request"].get("sender_action") for o in out if o["psid"] == "alice" and o["origin"] == "agent"] == [
        "typing_on", "typing_off", "mark_seen"]
    # every system message shown to the agents also went to the consumer, and nothing else did
    shown = {e["outbox_id"]: e["text"] for e in of_type(evs + support, "system_message") if e["psid"] == "alice"}
    sent = {o["outbox_id"]: o["request"]["message"]["text"] for o in out if o["origin"] == "system" and o["psid"] == "alice"}
    assert shown.items() <= sent.items()
    everything = await con.events("billing") + await con.events("support")
    assert sent.items() <= {e["outbox_id"]: e["text"] for e in of_type(everything, "system_message")}.items()


async def test_auto_close_on_the_consumers_turn_once_and_across_a_restart(
    make_worker: Callable[..., Worker], kafka: KafkaIO
) -> None:
    w = make_worker(CONFIG)
    con = Console(kafka, w)
    # bob is answered, then keeps the conversation alive by answering back within 15 s
    await send_raw(kafka, w, BILLING_PAGE, consumer_msg(BILLING_PAGE, "bob", "b0", "hi"))
    await con.wait_for("billing", lambda e: len(mine(e, "bob", "conversation_opened")) == 1)
    await action(kafka, w, BILLING_PAGE, "bob", "message", "b-act-1", text="How can I help?")
    await con.wait_for("billing", lambda e: len(mine(e, "bob", "agent_message")) == 1)
    await asyncio.sleep(8)
    await send_raw(kafka, w, BILLING_PAGE, consumer_msg(BILLING_PAGE, "bob", "b1", "my invoice"))  # the agent's turn
    await asyncio.sleep(12)  # 20 s since the agent's message: no idle close while the consumer waits
    assert mine(await con.events("billing"), "bob", "conversation_closed") == []
    await action(kafka, w, BILLING_PAGE, "bob", "message", "b-act-2", text="Fixed, anything else?")
    answered_at = time.monotonic()
    evs = await con.wait_for("billing", lambda e: len(mine(e, "bob", "conversation_closed")) == 1, timeout=60)
    assert time.monotonic() - answered_at >= 13  # 15 s after the agent's last message (tick resolution aside)
    closed = mine(evs, "bob", "conversation_closed")[0]
    assert (closed["closed_by"], closed["reason"]) == ("system", "idle")
    assert "closed_idle" in triggers(evs, "bob")

    # carol's idle timer is armed, then the worker restarts before it fires
    await send_raw(kafka, w, SUPPORT_PAGE, consumer_msg(SUPPORT_PAGE, "carol", "c1", "hola"))
    await con.wait_for("support", lambda e: len(mine(e, "carol", "conversation_opened")) == 1)
    await action(kafka, w, SUPPORT_PAGE, "carol", "accept", "c-act-1")
    await action(kafka, w, SUPPORT_PAGE, "carol", "message", "c-act-2", text="¿En qué puedo ayudar?")
    await con.wait_for("support", lambda e: len(mine(e, "carol", "agent_message")) == 1)
    w.restart()
    evs = await con.wait_for("support", lambda e: len(mine(e, "carol", "conversation_closed")) == 1, timeout=60)
    await asyncio.sleep(4)  # a few more ticks: it must not fire again
    evs = await con.events("support")
    billing = await con.events("billing")
    assert len(mine(evs, "carol", "conversation_closed")) == 1
    assert len(mine(billing, "bob", "conversation_closed")) == 1
    assert triggers(evs, "carol").count("closed_idle") == 1


async def test_proactive_open_inside_and_outside_the_window(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    w = make_worker(CONFIG)
    con = Console(kafka, w)
    day = 86_400_000
    # frank wrote 2 hours ago, erin 3 days ago, dave 9 days ago; zoe never; a manager closed them since
    for psid, age in (("frank", 2 * 3_600_000), ("erin", 3 * day), ("dave", 9 * day)):
        await send_raw(kafka, w, SUPPORT_PAGE, consumer_msg(SUPPORT_PAGE, psid, f"{psid}-1", "hi"), now_ms() - age)
    await con.wait_for("support", lambda e: len(of_type(e, "conversation_opened")) == 3)
    for psid in ("frank", "erin", "dave"):
        await action(kafka, w, SUPPORT_PAGE, psid, "close", f"{psid}-close", agent_id="sup", role="manager")
    await con.wait_for("support", lambda e: len(of_type(e, "conversation_closed")) == 3)
    for psid in ("frank", "erin", "dave", "zoe"):
        await action(kafka, w, SUPPORT_PAGE, psid, "open", f"{psid}-open", text="We have an update on your case")
    evs = await con.wait_for("support", lambda e: len(of_type(e, "action_rejected")) == 2
                             and len(of_type(e, "conversation_opened")) == 5)
    rejected = {e["psid"]: e["reason"] for e in of_type(evs, "action_rejected")}
    assert rejected == {"dave": "window_closed", "zoe": "window_closed"}
    out = await kafka.read_json(w.topic("messenger.outbound"))
    sends = {o["psid"]: o["request"] for o in out if o["origin"] == "agent"}
    assert sends["frank"]["messaging_type"] == "UPDATE" and "tag" not in sends["frank"]
    assert (sends["erin"]["messaging_type"], sends["erin"]["tag"]) == ("MESSAGE_TAG", "HUMAN_AGENT")
    assert set(sends) == {"frank", "erin"}
    for psid in ("frank", "erin"):
        opened = mine(evs, psid, "conversation_opened")[-1]
        assert opened["opened_by"] == "agent"
        assert mine(evs, psid, "conversation_accepted")[-1]["agent_id"] == "agent-7"
        assert "accepted" not in triggers([e for e in evs if e["timestamp"] >= opened["timestamp"]], psid)
    # the proactive open starts on the consumer's turn from now: not closed a second later
    await asyncio.sleep(3)
    evs = await con.events("support")
    assert [len(mine(evs, p, "conversation_closed")) for p in ("frank", "erin")] == [1, 1]
    assert orjson.dumps(sends)  # the requests are JSON as sent

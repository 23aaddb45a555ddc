"""The turn-aware timers and the off-hours rules end to end on real Kafka, with a real worker.

billing is always open; support is closed all week (its waiting timer is suspended, its messages
are the off-hours ones). People run in parallel so the 15 s minimum timers cost one wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

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
auto_close_after_seconds = 40
auto_close_warning_after_seconds = 15
agent_not_responding_after_seconds = 15
waiting_for_agent_after_seconds = 15
expected_response_seconds = 7200

[skills.support]
waiting_for_agent_after_seconds = 15
[skills.support.hours]
timezone = "UTC"

[csat]
enabled = false

[agents.nicknames]
agent-7 = "Ana"
"""


def mine(evs: list[dict[str, Any]], psid: str, type_: str) -> list[dict[str, Any]]:
    return [e for e in of_type(evs, type_) if e["psid"] == psid]


def said(evs: list[dict[str, Any]], psid: str) -> list[str]:
    return [e["trigger"] for e in mine(evs, psid, "system_message")]


async def write(kafka: KafkaIO, w: Worker, page: str, psid: str, mid: str, text: str, age_ms: int = 0) -> None:
    headers = [("received-at", str(now_ms() - age_ms).encode())] if age_ms else None
    await kafka.send(w.topic("messenger.webhook.raw"), body(page, consumer_msg(page, psid, mid, text)), headers=headers)


async def test_timers_by_turn_and_off_hours(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    w = make_worker(CONFIG)
    con = Console(kafka, w)
    start = time.monotonic()
    # queue: q1 has waited 20 s already (backdated); o2 too, but support is closed: no waiting message
    await write(kafka, w, BILLING_PAGE, "q1", "q1-1", "hello?", age_ms=20_000)
    await write(kafka, w, SUPPORT_PAGE, "o2", "o2-1", "hola?", age_ms=60_000)
    # agent not responding: n1 is accepted now and nobody writes to them
    await write(kafka, w, BILLING_PAGE, "n1", "n1-1", "I need a refund")
    await action(kafka, w, BILLING_PAGE, "n1", "accept", "n1-acc")
    # consumer not responding, then idle close: w1 is answered and goes silent
    await write(kafka, w, BILLING_PAGE, "w1", "w1-1", "quick question")
    await action(kafka, w, BILLING_PAGE, "w1", "message", "w1-msg", text="Sure, what is it?")
    # off hours: o1 writes to support twice (one off-hours welcome, nothing more in the same period)
    await write(kafka, w, SUPPORT_PAGE, "o1", "o1-1", "hola")
    await write(kafka, w, SUPPORT_PAGE, "o1", "o1-2", "¿hay alguien?")
    # o3 starts in billing (open) and is transferred to support (closed): the mid-conversation message
    await write(kafka, w, BILLING_PAGE, "o3", "o3-1", "hi")
    await action(kafka, w, BILLING_PAGE, "o3", "message", "o3-msg", text="Let me pass you to support")
    await action(kafka, w, BILLING_PAGE, "o3", "transfer", "o3-tr", to_skill="support")

    support = await con.wait_for("support", lambda e: len(mine(e, "o3", "conversation_transferred")) == 1
                                 and len(mine(e, "o1", "consumer_message")) == 2)
    await write(kafka, w, BILLING_PAGE, "o3", "o3-2", "still there?")
    await write(kafka, w, BILLING_PAGE, "o3", "o3-3", "hello??")

    billing = await con.wait_for(
        "billing",
        lambda e: "waiting_for_agent" in said(e, "q1") and len(mine(e, "n1", "agent_not_responding")) == 1
        and "consumer_not_responding" in said(e, "w1"),
        timeout=60,
    )
    assert said(billing, "q1") == ["welcome_first", "waiting_for_agent"]
    (nr,) = mine(billing, "n1", "agent_not_responding")
    assert nr["agent_id"] == "agent-7"
    assert said(billing, "n1") == ["welcome_first", "accepted", "agent_not_responding"]
    assert [e["text"] for e in mine(billing, "n1", "system_message") if e["trigger"] == "accepted"] == [
        "You are now connected to Ana."]
    assert said(billing, "w1") == ["welcome_first", "accepted", "consumer_not_responding"]
    assert mine(billing, "w1", "conversation_closed") == []  # warned first, closed 40 s after the agent wrote

    billing = await con.wait_for("billing", lambda e: len(mine(e, "w1", "conversation_closed")) == 1, timeout=60)
    closed = mine(billing, "w1", "conversation_closed")[0]
    assert (closed["closed_by"], closed["reason"]) == ("system", "idle")
    assert time.monotonic() - start >= 30

    support = await con.wait_for("support", lambda e: "off_hours_mid_conversation" in said(e, "o3"))
    await asyncio.sleep(3)  # more ticks, later lines: nothing repeats
    billing, support = await con.events("billing"), await con.events("support")
    assert said(support, "o1") == ["welcome_first_off_hours"]
    assert said(support, "o2") == ["welcome_first_off_hours"]  # waited 60 s, but the queue timer is suspended
    assert said(support, "o3") == ["transferred", "off_hours_mid_conversation"]
    (mid,) = [e for e in mine(support, "o3", "system_message") if e["trigger"] == "off_hours_mid_conversation"]
    assert mid["text"] == "Sorry, our contact center is currently closed. An agent should reply shortly."
    assert said(billing, "q1").count("waiting_for_agent") == 1  # once per queue stay
    assert len(mine(billing, "n1", "agent_not_responding")) == 1  # once per turn

    # a returning person out of hours
    await action(kafka, w, SUPPORT_PAGE, "o1", "close", "o1-close", agent_id="sup", role="manager")
    await write(kafka, w, SUPPORT_PAGE, "o1", "o1-3", "otra vez yo")
    support = await con.wait_for("support", lambda e: "welcome_returning_off_hours" in said(e, "o1"))
    assert said(support, "o1") == ["welcome_first_off_hours", "closed_by_agent", "welcome_returning_off_hours"]
    metrics = w.metrics()
    assert metrics['messenger_conversation_timers_fired_total{timer="idle"}'] == 1.0
    assert metrics['messenger_conversation_timers_fired_total{timer="waiting"}'] == 1.0
    assert metrics[f'messenger_page_messages_total{{direction="inbound",page="{BILLING_PAGE}"}}'] >= 6

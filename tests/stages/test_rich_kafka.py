"""#17 end to end with a real worker on real Kafka: a rich message out (checked, one request per
bubble, the console sees its structure), taps back in as consumer messages, a location, a sticker and
an ad referral in whole, a broken rich message rejected before anything is sent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import BASE_CONFIG, SAMPLES
from tests.dispatchtools import DispatcherProcess
from tests.fakegraph import FakeGraph
from tests.kafkatools import KafkaIO, Worker
from tests.rules.test_rich_conversation import AUTO, PROFILE
from tests.stages.test_conversations_kafka import BILLING_PAGE, Console, action, body, consumer_msg, now_ms, of_type

pytestmark = pytest.mark.kafka

CONFIG = BASE_CONFIG + """
[skills.billing]
auto_accept = true
[csat]
enabled = false
"""
QUICK = [{"title": "Billing", "payload": "TOPIC_BILLING"}, {"title": "Delivery", "payload": "TOPIC_DELIVERY"}]
BUTTONS = {"template_type": "button", "text": "Would you like to track your order?", "buttons": [
    {"type": "web_url", "title": "Track order", "url": "https://example.com/orders/1234"},
    {"type": "postback", "title": "Talk to an agent", "payload": "AGENT"}]}


def sample_item(name: str, page: str, psid: str, mid: str) -> dict[str, Any]:
    """The one messaging item of a sample, re-addressed to this test's page and person."""
    path = SAMPLES / name if (SAMPLES / name).exists() else SAMPLES / "rich" / name
    item: dict[str, Any] = json.loads(path.read_text())["entry"][0]["messaging"][0]
    item.update(sender={"id": psid}, recipient={"id": page}, timestamp=now_ms())
    item["message"]["mid"] = mid
    return item


async def test_rich_out_taps_and_attachments_in(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    w = make_worker(CONFIG)
    con = Console(kafka, w)
    raw = w.topic("messenger.webhook.raw")
    psid = "6543210987654321"
    await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, psid, "m-1", "my parcel is late")))
    await action(kafka, w, BILLING_PAGE, psid, "message", "rich-1", text="What is it about?", quick_replies=QUICK)
    await action(kafka, w, BILLING_PAGE, psid, "message", "rich-2", template=BUTTONS)
    await action(kafka, w, BILLING_PAGE, psid, "message", "rich-3", text="Your label",
                 attachment={"type": "file", "url": "https://example.com/label.pdf"})
    bad = [*QUICK, *QUICK, {"title": "A title much too long", "payload": "X"}]
    await action(kafka, w, BILLING_PAGE, psid, "message", "rich-4", text="Pick", quick_replies=bad)
    # the consumer taps a quick reply and a postback button, shares a location and a sticker, and
    # writes from an ad (its first message there would carry the referral; any message may)
    tap = consumer_msg(BILLING_PAGE, psid, "m-2", "Delivery")
    tap["message"]["quick_reply"] = {"payload": "TOPIC_DELIVERY"}
    postback = {"sender": {"id": psid}, "recipient": {"id": BILLING_PAGE}, "timestamp": now_ms(),
                "postback": {"mid": "m-3", "title": "Talk to an agent", "payload": "AGENT"}}
    await kafka.send(raw, body(BILLING_PAGE, tap, postback))
    await kafka.send(raw, body(BILLING_PAGE, sample_item("12_attachment_location.json", BILLING_PAGE, psid, "m-4")))
    await kafka.send(raw, body(BILLING_PAGE, sample_item("30_sticker_transition.json", BILLING_PAGE, psid, "m-5")))
    await kafka.send(raw, body(BILLING_PAGE, sample_item("33_message_with_ad_referral.json", BILLING_PAGE, psid,
                                                         "m-6")))

    evs = await con.wait_for("billing", lambda e: len(of_type(e, "consumer_message")) >= 6
                             and len(of_type(e, "action_rejected")) == 1 and len(of_type(e, "agent_message")) == 4)
    out = [o for o in await kafka.read_json(w.topic("messenger.outbound"), min_count=5) if o["origin"] == "agent"]
    messages = [o["request"]["message"] for o in out]
    assert [m.get("text") for m in messages] == ["What is it about?", None, "Your label", None]
    assert messages[0]["quick_replies"] == [{"content_type": "text", **q} for q in QUICK]
    assert messages[1]["attachment"] == {"type": "template", "payload": BUTTONS}
    assert messages[3]["attachment"] == {"type": "file", "payload": {"url": "https://example.com/label.pdf"}}
    assert all(m["metadata"] == o["outbox_id"] for m, o in zip(messages, out, strict=True))

    shown = of_type(evs, "agent_message")
    assert [s["outbox_id"] for s in shown] == [o["outbox_id"] for o in out]
    assert shown[0]["quick_replies"] == messages[0]["quick_replies"]
    assert shown[1]["template"] == BUTTONS
    assert (shown[2]["part"], shown[3]["part"], shown[3]["attachment"]["url"]) == (1, 2, "https://example.com/label.pdf")
    [rejected] = of_type(evs, "action_rejected")
    assert (rejected["action_id"], rejected["reason"], rejected["detail"]) == (
        "rich-4", "invalid_message", "quick_replies[4].title: 21 characters, at most 20")

    lines = {m["mid"]: m for m in of_type(evs, "consumer_message")}
    assert sorted(lines) == ["m-1", "m-2", "m-3", "m-4", "m-5", "m-6"] and len(of_type(evs, "consumer_message")) == 6
    assert (lines["m-2"]["payload"], lines["m-2"]["tap"], lines["m-2"]["text"]) == ("TOPIC_DELIVERY", "quick_reply",
                                                                                    "Delivery")
    assert (lines["m-3"]["payload"], lines["m-3"]["tap"], lines["m-3"]["text"]) == ("AGENT", "postback",
                                                                                    "Talk to an agent")
    [loc] = lines["m-4"]["attachments"]
    assert loc["coordinates"] == {"lat": 45.531449166167, "long": -93.555047062628} and loc["title"] == "My Place"
    assert lines["m-5"]["sticker_id"] == "369239263222822"
    assert [a["type"] for a in lines["m-5"]["attachments"]] == ["sticker", "image"]
    assert lines["m-6"]["referral"]["ad_id"] == "6045246247433"
    assert lines["m-6"]["referral"]["ads_context_data"]["ad_title"] == "Spring sale: shirts"


# --- the profile and personas: a real worker, the real dispatcher, the fake Graph API -----------------

SUPPORT = "298733926841562"
PEOPLE_CONFIG = BASE_CONFIG + AUTO + PROFILE + """
[skills.support]
auto_accept = true
[personas]
enabled = true
system_name = "Acme Assistant"
system_picture_url = "https://example.com/assistant.png"
agents = true
agent_picture_url = "https://example.com/agent.png"
retry_after_seconds = 2
"""
TOKENS = {BILLING_PAGE: "EAAtokenForBillingPage0001", SUPPORT: "EAAtokenForSupportPage0002"}


async def until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def test_profile_locale_placeholder_and_personas(make_worker: Callable[..., Worker], kafka: KafkaIO,
                                                       tmp_path: Path) -> None:
    graph = FakeGraph()
    await graph.start()
    ana, nobody = "7100000000000001", "7100000000000002"
    graph.people.profiles[ana] = {"first_name": "Ana", "last_name": "López", "locale": "es_MX", "timezone": -6,
                                  "profile_pic": "https://platform-lookaside.fbsbx.com/p/ana", "gender": "female"}
    w = make_worker(PEOPLE_CONFIG)
    env = {**w.env, "MESSENGER_STREAMS_PAGE_TOKENS": orjson.dumps(TOKENS).decode(),
           "MESSENGER_STREAMS_GRAPH_URL": graph.url}
    dispatcher = DispatcherProcess(env, tmp_path / "dispatch.log", ["--web-port", "0"])
    await asyncio.to_thread(dispatcher.start)
    con = Console(kafka, w)
    raw = w.topic("messenger.webhook.raw")
    try:
        # Ana writes: the conversation opens at once (the page's locale), her profile is read, the
        # welcome goes out as the system persona
        await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, ana, "a-1", "hello")))
        evs = await con.wait_for("billing", lambda e: len(of_type(e, "profile")) == 1)
        [profile] = of_type(evs, "profile")
        assert (profile["first_name"], profile["locale"], profile["source"]) == ("Ana", "es_MX", "graph")
        assert "gender" not in profile and of_type(evs, "conversation_opened")[0]["locale"] == "en_US"
        assert graph.people.profile_reads() == [ana]
        # the agent accepts, then sends quick replies as their own persona; Ana taps one
        await action(kafka, w, BILLING_PAGE, ana, "accept", "p-1", agent_nickname="Maria")
        await action(kafka, w, BILLING_PAGE, ana, "message", "p-2", agent_nickname="Maria", text="What is it about?",
                     quick_replies=QUICK)
        await until(lambda: any(r.text == "What is it about?" for r in graph.requests))
        tap = consumer_msg(BILLING_PAGE, ana, "a-2", "Billing")
        tap["message"]["quick_reply"] = {"payload": "TOPIC_BILLING"}
        await kafka.send(raw, body(BILLING_PAGE, tap))
        await action(kafka, w, BILLING_PAGE, ana, "close", "p-3", agent_nickname="Maria")
        evs = await con.wait_for("billing", lambda e: len(of_type(e, "csat_requested")) == 1
                                 and any(m.get("tap") == "quick_reply" for m in of_type(e, "consumer_message")))
        texts = [e["text"] for e in of_type(evs, "system_message")]
        assert "Hi Ana, you are now connected to Maria." in texts  # the placeholder, from the profile
        assert of_type(evs, "csat_requested")[0]["question"] == "How did we do?"  # locale fixed at the start
        await until(lambda: len([r for r in graph.requests if r.text]) >= 4)
        personas = {p["name"]: p["id"] for p in graph.people.personas[BILLING_PAGE]}
        assert sorted(personas) == ["Acme Assistant", "Maria"]
        by_text = {r.text: r.body.get("persona_id") for r in graph.requests if r.text}
        assert by_text["What is it about?"] == personas["Maria"]
        assert by_text["Hi Ana, you are now connected to Maria."] == personas["Acme Assistant"]
        assert all(r.body.get("persona_id") == personas["Acme Assistant"] for r in graph.requests
                   if r.text and r.text.startswith("Welcome"))

        # a new dispatcher process remembers the personas (no second creation); Ana answers the survey
        # and writes again: the new conversation opens in her locale, with her name
        dispatcher.stop()
        await asyncio.to_thread(dispatcher.start)
        await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, ana, "a-3", "5")))
        await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, ana, "a-4", "hola otra vez")))
        evs = await con.wait_for("billing", lambda e: len(of_type(e, "conversation_opened")) == 2)
        assert of_type(evs, "conversation_opened")[1]["locale"] == "es_MX"
        assert "¡Hola de nuevo, Ana!" in [e["text"] for e in of_type(evs, "system_message")]
        assert [p["source"] for p in of_type(evs, "profile")] == ["graph", "cache"]
        await until(lambda: any(r.text == "¡Hola de nuevo, Ana!" for r in graph.requests))
        assert [r.body.get("persona_id") for r in graph.requests if r.text == "¡Hola de nuevo, Ana!"] == [
            personas["Acme Assistant"]]
        assert graph.people.persona_creations(BILLING_PAGE) == ["Acme Assistant", "Maria"]
        assert graph.people.profile_reads() == [ana]  # kept: not read again within its TTL

        # someone without a profile, on a page whose personas cannot be had for now: nothing waits,
        # the placeholder falls back, the welcome goes without a persona
        graph.people.persona_failures = 1
        await kafka.send(raw, body(SUPPORT, consumer_msg(SUPPORT, nobody, "n-1", "hola")))
        await action(kafka, w, SUPPORT, nobody, "accept", "n-2", agent_nickname="Luis")
        evs = await con.wait_for("support", lambda e: len(of_type(e, "conversation_accepted")) == 1
                                 and len(of_type(e, "system_message")) == 2)
        assert of_type(evs, "profile") == [] and of_type(evs, "send_failed") == []
        assert "Hi there, you are now connected to Luis." in [e["text"] for e in of_type(evs, "system_message")]
        await until(lambda: len([r for r in graph.sent_to(nobody) if r.text]) == 2)
        first = [r for r in graph.sent_to(nobody) if r.text][0]
        assert "persona_id" not in first.body  # the persona lookup failed: sent without one
        assert graph.people.profile_reads() == [ana, nobody]
        assert all(r.status == 200 for r in graph.sent_to(nobody))
    finally:
        dispatcher.stop()
        await graph.stop()

"""#17 end to end with a real worker on real Kafka: a rich message out (checked, one request per
bubble, the console sees its structure), taps back in as consumer messages, a location, a sticker and
an ad referral in whole, a broken rich message rejected before anything is sent."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import BASE_CONFIG, SAMPLES
from tests.kafkatools import KafkaIO, Worker
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

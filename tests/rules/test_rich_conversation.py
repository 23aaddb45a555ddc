"""#17 in the conversation rules: rich agent messages out (validated, one bubble per request, the
console sees the structure), taps back in, the profile asked for and kept, the conversation's locale
and `{consumer_first_name}`, inbound attachments whole on the console."""

from __future__ import annotations

from typing import Any

from tests.rules.convo import DAY, HOUR, SECOND, T0, Convo, cfg, console, outbound, rejections, texts, types

AUTO = """
[skills.billing]
auto_accept = true
[csat]
enabled = true
question = "How did we do?"
[csat.question_by_locale]
es = "¿Qué tal lo hicimos?"
[auto_messages.accepted]
text = "Hi {consumer_first_name}, you are now connected to {agent_nickname}."
[auto_messages.welcome_returning]
text = "Welcome back, {consumer_first_name}!"
[auto_messages.welcome_returning.by_locale]
es = "¡Hola de nuevo, {consumer_first_name}!"
"""
PROFILE = """
[profile]
enabled = true
ttl_seconds = 86400
retry_after_seconds = 600
first_name_fallback = "there"
"""
QR = [{"title": "Billing", "payload": "TOPIC_BILLING"}, {"title": "Delivery", "payload": "TOPIC_DELIVERY"}]


def opened(extra: str = "") -> Convo:
    c = Convo(cfg(AUTO + extra))
    c.msg("hi", at=T0)
    return c


def agent_out(d: Any) -> list[dict[str, Any]]:
    return [r for r in outbound(d) if r["origin"] == "agent"]


def agent_messages(d: Any) -> list[dict[str, Any]]:
    return [v for v in console(d) if v["type"] == "agent_message"]


# --- rich messages out ------------------------------------------------------------------------------

def test_quick_replies_go_with_the_text_and_the_console_sees_them() -> None:
    c = opened()
    out = c.act("message", text="What is it about?", quick_replies=QR)
    [req] = agent_out(out)
    assert req["request"]["message"]["text"] == "What is it about?"
    assert req["request"]["message"]["quick_replies"] == [
        {"content_type": "text", "title": "Billing", "payload": "TOPIC_BILLING"},
        {"content_type": "text", "title": "Delivery", "payload": "TOPIC_DELIVERY"}]
    assert req["request"]["message"]["metadata"] == req["outbox_id"]
    [shown] = agent_messages(out)
    assert shown["text"] == "What is it about?" and shown["quick_replies"] == req["request"]["message"]["quick_replies"]
    assert shown["outbox_id"] == req["outbox_id"]


def test_text_and_attachment_are_two_bubbles_in_order() -> None:
    c = opened()
    out = c.act("message", text="Your invoice", attachment={"type": "file", "url": "https://x.io/i.pdf"})
    reqs = agent_out(out)
    assert [r["request"]["message"].get("text") for r in reqs] == ["Your invoice", None]
    assert reqs[1]["request"]["message"]["attachment"] == {"type": "file", "payload": {"url": "https://x.io/i.pdf"}}
    shown = agent_messages(out)
    assert [(s["part"], s["parts"], s["outbox_id"]) for s in shown] == [
        (1, 2, reqs[0]["outbox_id"]), (2, 2, reqs[1]["outbox_id"])]
    assert shown[1]["attachment"] == {"type": "file", "url": "https://x.io/i.pdf"} and shown[1]["text"] is None
    assert c.conv["counts"]["agent"] == 1  # one agent message, whatever its bubbles


def test_templates_go_out_as_template_attachments() -> None:
    c = opened()
    template = {"template_type": "generic", "elements": [{"title": "Blue shirt", "subtitle": "29.90 EUR"}]}
    out = c.act("message", template=template)
    [req] = agent_out(out)
    assert req["request"]["message"]["attachment"] == {"type": "template", "payload": template}
    assert agent_messages(out)[0]["template"] == template


def test_a_violation_is_rejected_before_anything_is_sent() -> None:
    c = opened()
    replies = [*QR, *QR, {"title": "x" * 24, "payload": "X"}]
    out = c.act("message", text="Pick", quick_replies=replies)
    assert outbound(out) == [] and agent_messages(out) == []
    [rej] = [v for v in console(out) if v["type"] == "action_rejected"]
    assert (rej["reason"], rej["detail"]) == ("invalid_message", "quick_replies[4].title: 24 characters, at most 20")


def test_text_too_long_keeps_its_reason_and_empty_text_stays_invalid_action() -> None:
    c = opened()
    assert rejections(c.act("message", text="a" * 641)) == ["text_too_long"]
    assert rejections(c.act("message", text="  ")) == ["invalid_action"]
    assert rejections(c.act("message", text="a" * 641, attachment={"type": "image"})) == ["invalid_message"]


def test_agent_nickname_rides_on_the_outbound_record_for_personas() -> None:
    c = opened()
    [req] = agent_out(c.act("message", text="Hi", agent_nickname="Maria G."))
    assert req["agent_nickname"] == "Maria G." and req["origin"] == "agent"


def test_proactive_open_may_be_rich() -> None:
    c = Convo(cfg(AUTO))
    c.msg("hi", at=T0)
    c.act("close", at=T0 + SECOND)
    out = c.act("open", at=T0 + 2 * SECOND, attachment={"type": "image", "url": "https://x.io/a.png"})
    assert "conversation_opened" in types(out)
    assert outbound(out)[-1]["request"]["message"]["attachment"]["type"] == "image"


# --- taps back in -----------------------------------------------------------------------------------

def test_quick_reply_tap_and_postback_reach_the_console_as_consumer_messages() -> None:
    c = opened()
    c.act("message", text="What is it about?", quick_replies=QR)
    tap = [v for v in console(c.msg("Billing", at=T0 + 5 * SECOND, quick_reply_payload="TOPIC_BILLING"))
           if v["type"] == "consumer_message"]
    assert [(t["text"], t["payload"], t["quick_reply_payload"], t["tap"]) for t in tap] == [
        ("Billing", "TOPIC_BILLING", "TOPIC_BILLING", "quick_reply")]
    pb = [v for v in console(c.postback("TRACK_ORDER", at=T0 + 6 * SECOND, title="Track order"))
          if v["type"] == "consumer_message"]
    assert [(p["text"], p["payload"], p["quick_reply_payload"], p["tap"]) for p in pb] == [
        ("Track order", "TRACK_ORDER", None, "postback")]


# --- inbound attachments whole ------------------------------------------------------------------------

def test_location_sticker_and_ad_referral_reach_the_console_whole() -> None:
    c = Convo(cfg(AUTO))
    out = c.msg(None, at=T0, attachments=[
        {"type": "location", "url": "https://l.facebook.com/l.php?u=x", "title": "My Place",
         "coordinates": {"lat": 45.5, "long": -93.5}, "sticker_id": None},
        {"type": "image", "url": "https://scontent.xx.fbcdn.net/s.png", "sticker_id": "369239263222822"}],
        sticker_id="369239263222822",
        referral={"ad_id": "6045246247433", "ref": "spring", "source": "ADS", "type": "OPEN_THREAD"})
    [msg] = [v for v in console(out) if v["type"] == "consumer_message"]
    assert msg["attachments"] == [
        {"type": "location", "url": "https://l.facebook.com/l.php?u=x", "title": "My Place",
         "coordinates": {"lat": 45.5, "long": -93.5}},
        {"type": "image", "url": "https://scontent.xx.fbcdn.net/s.png", "sticker_id": "369239263222822"}]
    assert msg["sticker_id"] == "369239263222822"
    assert msg["referral"]["ad_id"] == "6045246247433" and msg["referral"]["source"] == "ADS"


# --- profile, locale, placeholder -----------------------------------------------------------------------

def test_profile_off_by_default_asks_nothing() -> None:
    c = Convo(cfg(AUTO))
    assert all(r.get("endpoint") is None for r in outbound(c.msg("hi")))


def test_profile_is_asked_at_open_and_kept_and_used() -> None:
    c = Convo(cfg(AUTO + PROFILE))
    out = c.msg("hi", at=T0)
    asks = [r for r in outbound(out) if r.get("endpoint") == "user_profile"]
    assert len(asks) == 1 and asks[0]["request"] == {
        "psid": c.psid, "fields": ["first_name", "last_name", "profile_pic", "locale", "timezone"]}
    assert c.conv["locale"] == "en_US"  # nothing waits for the profile: the page's locale for now
    res = c.result(at=T0 + SECOND, outbox_id=asks[0]["outbox_id"], status="sent", endpoint="user_profile",
                   profile={"first_name": "Ana", "last_name": "López", "locale": "es_MX", "timezone": -6,
                            "profile_pic": "https://platform-lookaside.fbsbx.com/p/1"})
    [shown] = [v for v in console(res) if v["type"] == "profile"]
    assert (shown["first_name"], shown["locale"], shown["source"]) == ("Ana", "es_MX", "graph")
    assert c.conv["locale"] == "en_US"  # fixed at the conversation's start
    accepted = c.act("accept", at=T0 + 2 * SECOND, agent_nickname="Maria")
    assert texts(accepted) == ["Hi Ana, you are now connected to Maria."]
    closed = c.act("close", at=T0 + 3 * SECOND)
    assert [v["question"] for v in console(closed) if v["type"] == "csat_requested"] == ["How did we do?"]
    # the next conversation opens in the person's locale, with the kept profile shown at once
    again = c.msg("hola otra vez", at=T0 + HOUR)
    assert c.conv["locale"] == "es_MX"
    assert texts(again) == ["¡Hola de nuevo, Ana!"]
    assert [v["source"] for v in console(again) if v["type"] == "profile"] == ["cache"]
    assert not [r for r in outbound(again) if r.get("endpoint") == "user_profile"]  # fresh: not asked again
    closed = c.act("close", at=T0 + HOUR + SECOND)
    assert [v["question"] for v in console(closed) if v["type"] == "csat_requested"] == ["¿Qué tal lo hicimos?"]
    # after the TTL it is asked again
    c.msg("5", at=T0 + HOUR + 2 * SECOND)
    later = c.msg("hi again", at=T0 + 2 * DAY)
    assert [r for r in outbound(later) if r.get("endpoint") == "user_profile"]


def test_a_failed_profile_changes_nothing_but_waits_before_asking_again() -> None:
    c = Convo(cfg(AUTO + PROFILE))
    ask = [r for r in outbound(c.msg("hi", at=T0)) if r.get("endpoint") == "user_profile"][0]
    res = c.result(at=T0 + SECOND, outbox_id=ask["outbox_id"], status="failed", endpoint="user_profile", code=551)
    assert console(res) == [] and outbound(res) == []  # no send_failed for a profile: the agent need not know
    assert texts(c.act("accept", at=T0 + 2 * SECOND, agent_nickname="Maria")) == [
        "Hi there, you are now connected to Maria."]
    c.act("close", at=T0 + 3 * SECOND)
    c.msg("5", at=T0 + 4 * SECOND)
    soon = c.msg("again", at=T0 + 5 * 60 * SECOND)
    assert not [r for r in outbound(soon) if r.get("endpoint") == "user_profile"]  # within retry_after
    c.act("close", at=T0 + 6 * 60 * SECOND)
    c.msg("4", at=T0 + 7 * 60 * SECOND)
    later = c.msg("and again", at=T0 + 20 * 60 * SECOND)
    assert [r for r in outbound(later) if r.get("endpoint") == "user_profile"]


def test_the_profile_outlives_the_conversation_with_the_person() -> None:
    c = Convo(cfg(AUTO + PROFILE))
    ask = [r for r in outbound(c.msg("hi", at=T0)) if r.get("endpoint") == "user_profile"][0]
    c.result(at=T0 + SECOND, outbox_id=ask["outbox_id"], status="sent", endpoint="user_profile",
             profile={"first_name": "Ana", "locale": "pt_BR"})
    c.act("close", at=T0 + 2 * SECOND)
    c.tick(T0 + 3 * DAY)  # compacted: the person (and their profile) stay
    assert c.state is not None and c.state["profile"]["data"]["first_name"] == "Ana"
    c.msg("oi", at=T0 + 3 * DAY + SECOND)
    assert c.conv["locale"] == "pt_BR"

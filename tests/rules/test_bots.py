"""#15 hand-over rules: the bot transcript, hand-over in, the thread's owner as state, agent messages
while another app owns the thread, the hand-back after the survey, `to_bot`."""

from __future__ import annotations

from typing import Any

import orjson

from streams.core.config_bots import PAGE_INBOX_APP_ID
from streams.rules.conversation.api import Decision, Env, Input
from streams.rules.conversation.bots import parse_metadata
from tests.rules.convo import HOUR, MINUTE, SECOND, T0, Convo, cfg, console, outbound, rejections, types

OURS = "950864918368986"
BOT = "1111"
SUPPORT_BOT = "2222"
BOTS = f"""
[bots]
default_app_id = "{BOT}"
transcript_minutes = 30
transcript_messages = 5
[bots.pages."298733926841562"]
app_id = "{SUPPORT_BOT}"
[bots.skills]
refunds = "billing"
"talk to support" = "support"
[skills.support]
[csat]
enabled = true
expire_after_seconds = 600
"""


def bots_convo(extra: str = "", key: str | None = None) -> Convo:
    return Convo(cfg(BOTS + extra), **({"key": key} if key else {}))


def handover(c: Convo, kind: str, at: int, **data: Any) -> Decision:
    return c.event("handover", at=at, data={"type": kind, **data})


def bot_says(c: Convo, text: str, at: int, app_id: str = BOT) -> Decision:
    return c.event("echo", at=at, standby=True, mid=f"bot{at}", app_id=app_id, text=text)


def control(d: Decision) -> list[tuple[str, dict[str, Any]]]:
    return [(o["endpoint"], o["request"]) for o in outbound(d) if o.get("endpoint")]


def of_type(d: Decision, type_: str) -> list[dict[str, Any]]:
    return [v for v in console(d) if v["type"] == type_]


def bot_to_agent(c: Convo, metadata: str | None = "refunds", at: int = T0 + 5 * MINUTE) -> Decision:
    c.msg("I want my money back", at=T0, standby=True)
    bot_says(c, "I can help with refunds. Order number?", at=T0 + SECOND)
    c.msg("A-123", at=T0 + MINUTE, standby=True)
    bot_says(c, "Let me get a human for you", at=T0 + 2 * MINUTE)
    return handover(c, "pass_thread_control", at, new_owner_app_id=OURS, previous_owner_app_id=BOT, metadata=metadata)


def test_metadata_names_a_skill_as_text_or_json() -> None:
    assert parse_metadata("refunds") == ("refunds", None)
    assert parse_metadata(' {"skill": "support", "reason": "angry"} ') == (
        "support", {"skill": "support", "reason": "angry"})
    assert parse_metadata("{not json") == (None, None)
    assert parse_metadata("[1, 2]") == ("[1, 2]", None)  # plain text: no such skill, so the page's
    assert parse_metadata("x" * 65) == (None, None)
    assert parse_metadata(None) == (None, None)


def test_hand_over_in_opens_a_conversation_with_the_transcript() -> None:
    c = bots_convo()
    out = bot_to_agent(c)
    assert types(out)[:2] == ["conversation_opened", "system_message"]
    opened = of_type(out, "conversation_opened")[0]
    assert opened["opened_by"] == "bot" and opened["skill"] == "billing" and opened["from_app_id"] == BOT
    (ctx,) = of_type(out, "handover_context")
    assert ctx["metadata"] == "refunds" and ctx["metadata_skill"] == "refunds" and ctx["from_app_id"] == BOT
    assert [(line["by"], line["text"]) for line in ctx["transcript"]] == [
        ("customer", "I want my money back"), ("bot", "I can help with refunds. Order number?"),
        ("customer", "A-123"), ("bot", "Let me get a human for you")]
    assert ctx["page_inbox"] is False
    # the welcome went out: the standby messages opened Meta's window; the agent answers at once
    assert [o["request"]["message"]["text"] for o in outbound(out)] and c.state and c.state["thread"]["owner"] == OURS
    c.act("accept", at=T0 + 6 * MINUTE, agent="ana")
    reply = c.act("message", at=T0 + 7 * MINUTE, agent="ana", text="Hi, I'm Ana")
    (sent,) = outbound(reply)
    assert sent["request"]["messaging_type"] == "RESPONSE" and "endpoint" not in sent
    assert ("first_response_seconds", "billing", 120.0) in reply.figures  # the customer waited since the hand-over
    assert c.state["thread"]["lines"] == []  # delivered, forgotten


def test_the_skill_comes_from_json_metadata_or_the_page() -> None:
    c = bots_convo()
    out = bot_to_agent(c, metadata=orjson.dumps({"skill": "talk to support", "order": "A-123"}).decode())
    assert of_type(out, "conversation_opened")[0]["skill"] == "support"
    assert of_type(out, "handover_context")[0]["metadata_fields"] == {"skill": "talk to support", "order": "A-123"}
    named = bots_convo()
    assert of_type(bot_to_agent(named, metadata="support"), "conversation_opened")[0]["skill"] == "support"
    unknown = bots_convo()
    assert of_type(bot_to_agent(unknown, metadata="weather"), "conversation_opened")[0]["skill"] == "billing"
    none = bots_convo()
    assert of_type(bot_to_agent(none, metadata=None), "conversation_opened")[0]["skill"] == "billing"


class LiveBotsConvo(Convo):
    """A #15 conversation decided with the Env the stage builds from the live page directory (#14)."""

    def __init__(self, skills: frozenset[str]) -> None:
        super().__init__(cfg(BOTS))
        config = self.d.config
        self.env = Env(config.page(self.page), config.routing, config.external_user, skills)

    def feed(self, inp: Input) -> Decision:
        out = self.d.decide(self.state, inp, self.key, self.env)
        if not out.duplicate:
            self.state = out.state
        return out


def test_metadata_may_name_a_skill_connected_live() -> None:
    live = LiveBotsConvo(frozenset({*cfg(BOTS).all_skills(), "returns"}))  # a page was connected live to `returns`
    assert of_type(bot_to_agent(live, metadata="returns"), "conversation_opened")[0]["skill"] == "returns"
    static = bots_convo()  # no live directory: `returns` has no topic, so the page's skill
    assert of_type(bot_to_agent(static, metadata="returns"), "conversation_opened")[0]["skill"] == "billing"
    narrow = LiveBotsConvo(frozenset({"billing", "general"}))  # the live set is the whole list
    assert of_type(bot_to_agent(narrow, metadata="support"), "conversation_opened")[0]["skill"] == "billing"


def test_the_transcript_is_bounded_by_minutes_messages_and_bytes() -> None:
    c = bots_convo()
    c.msg("an hour ago", at=T0, standby=True)
    for i in range(8):
        bot_says(c, f"line {i}", at=T0 + HOUR + i * SECOND)
    lines = c.state["thread"]["lines"] if c.state else []
    assert [line[2] for line in lines] == [f"line {i}" for i in range(3, 8)]  # 5 messages, the last 30 minutes
    out = handover(c, "pass_thread_control", T0 + HOUR + MINUTE, new_owner_app_id=OURS)
    assert "an hour ago" not in str(of_type(out, "handover_context")[0]["transcript"])
    wide = Convo(cfg(BOTS.replace("transcript_messages = 5", "transcript_messages = 20")))
    for i in range(12):
        bot_says(wide, f"{i:02d}" + "x" * 400, at=T0 + i * SECOND)
    lines = wide.state["thread"]["lines"] if wide.state else []
    assert all(len(line[2]) == 200 for line in lines) and len(lines) == 5  # 1,000 bytes of text
    assert lines[-1][2].startswith("11")


def test_a_pass_while_a_conversation_is_open_adds_the_context_only() -> None:
    c = bots_convo()
    c.msg("hello", at=T0)
    out = handover(c, "pass_thread_control", T0 + MINUTE, new_owner_app_id=OURS, previous_owner_app_id=BOT)
    assert types(out) == ["handover_context"]


def test_hand_over_events_are_deduplicated() -> None:
    ev = {"kind": "handover", "page_id": "1691462197845448", "psid": "u1", "timestamp": T0, "standby": False,
          "conversation_key": "1691462197845448:u1", "idempotency_key": "handover:same", "received_at": T0,
          "data": {"type": "pass_thread_control", "new_owner_app_id": OURS}}
    c = bots_convo()
    first = c.feed(Input("event", "handover:same", T0, ev))
    second = c.feed(Input("event", "handover:same", T0 + SECOND, ev))
    assert "conversation_opened" in types(first) and second.duplicate


def test_survey_answered_then_the_thread_goes_back_to_the_bot() -> None:
    c = bots_convo()
    bot_to_agent(c)
    c.act("accept", at=T0 + 6 * MINUTE, agent="ana")
    c.act("message", at=T0 + 7 * MINUTE, agent="ana", text="Refund done")
    closed = c.act("close", at=T0 + 8 * MINUTE, agent="ana")
    assert control(closed) == []  # not before the survey is over: the bot would swallow the answer
    assert "csat_requested" in types(closed)
    cid = of_type(closed, "conversation_closed")[0]["conversation_id"]
    answered = c.msg("5", at=T0 + 9 * MINUTE, quick_reply_payload=f"CSAT:{cid}:5")
    ((endpoint, req),) = control(answered)
    assert endpoint == "pass_thread_control" and req["target_app_id"] == BOT and req["recipient"] == {"id": "u1"}
    assert orjson.loads(req["metadata"]) == {"conversation_id": cid, "closed_by": "agent", "close_reason": "agent"}
    assert c.state and c.state["thread"]["owner"] == BOT and c.state["thread"]["handback"] is None
    texts = [o["request"]["message"]["text"] for o in outbound(answered) if "message" in o["request"]]
    assert texts  # the thank-you went out before the pass
    assert outbound(answered)[-1].get("endpoint") == "pass_thread_control"


def test_an_expired_survey_hands_back_on_the_timer() -> None:
    c = bots_convo()
    bot_to_agent(c)
    closed = c.act("close", at=T0 + 8 * MINUTE, agent="ana", role="manager")
    assert closed.arms and max(closed.arms) >= T0 + 8 * MINUTE
    assert control(c.tick(T0 + 8 * MINUTE + 599 * SECOND)) == []
    out = c.tick(T0 + 8 * MINUTE + 600 * SECOND)
    assert [e for e, _ in control(out)] == ["pass_thread_control"]
    assert c.state and c.state["survey"] is None


def test_the_customer_writing_again_keeps_the_thread() -> None:
    c = bots_convo()
    bot_to_agent(c)
    c.act("close", at=T0 + 8 * MINUTE, agent="ana", role="manager")
    again = c.msg("wait, one more thing", at=T0 + 9 * MINUTE)
    assert "conversation_opened" in types(again)
    assert control(c.tick(T0 + HOUR)) == []  # no hand-back: the new conversation is ours


def test_without_a_survey_the_thread_goes_back_at_once() -> None:
    off = Convo(cfg(BOTS.replace("enabled = true", "enabled = false")))
    bot_to_agent(off)
    closed = off.act("close", at=T0 + 8 * MINUTE, agent="ana", role="manager")
    assert [e for e, _ in control(closed)] == ["pass_thread_control"]
    assert of_type(closed, "thread_control")[0]["to_app_id"] == BOT


def test_no_bot_release_or_leave_by_setting() -> None:
    base = "\n[csat]\nenabled = false\n"
    leave = Convo(cfg(base))
    leave.msg("hi", at=T0)
    assert control(leave.act("close", at=T0 + MINUTE, agent="ana", role="manager")) == []
    release = Convo(cfg(base + "[bots]\nrelease_without_bot = true\n"))
    release.msg("hi", at=T0)
    ((endpoint, req),) = control(release.act("close", at=T0 + MINUTE, agent="ana", role="manager"))
    assert endpoint == "release_thread_control" and req == {"recipient": {"id": "u1"}}


def test_to_bot_passes_at_once_and_closes_without_survey() -> None:
    c = bots_convo()
    c.msg("hello", at=T0)
    c.act("accept", at=T0 + SECOND, agent="ana")
    out = c.act("to_bot", at=T0 + MINUTE, agent="ana", metadata="customer wants the FAQ")
    ((endpoint, req),) = control(out)
    assert endpoint == "pass_thread_control" and req["target_app_id"] == BOT
    assert req["metadata"] == "customer wants the FAQ"
    closed = of_type(out, "conversation_closed")[0]
    assert closed["reason"] == "to_bot" and "csat_requested" not in types(out)
    assert [m["sent"] for m in of_type(out, "system_message")] == [False]  # the bot owns the thread now
    other = bots_convo()
    other.msg("hello", at=T0)
    other.act("accept", at=T0 + SECOND, agent="ana")
    assert rejections(other.act("to_bot", at=T0 + MINUTE, agent="bob")) == ["not_owner"]
    nobot = Convo(cfg(""))
    nobot.msg("hello", at=T0)
    assert rejections(nobot.act("to_bot", at=T0 + MINUTE, agent="ana", role="manager")) == ["invalid_action"]


def test_support_page_uses_its_own_bot() -> None:
    c = bots_convo(key="298733926841562:u9")
    c.msg("hola", at=T0)
    out = c.act("to_bot", at=T0 + MINUTE, agent="ana", role="manager")
    assert control(out)[0][1]["target_app_id"] == SUPPORT_BOT


def test_agent_message_while_the_bot_owns_the_thread_is_rejected_and_control_requested() -> None:
    c = bots_convo()
    c.msg("hello", at=T0)
    c.act("accept", at=T0 + SECOND, agent="ana")
    taken = handover(c, "take_thread_control", T0 + MINUTE, previous_owner_app_id=OURS, metadata="bot is back")
    (tc,) = of_type(taken, "thread_control")
    assert (tc["change"], tc["to_app_id"], tc["page_inbox"]) == ("taken", BOT, False)
    out = c.act("message", at=T0 + 2 * MINUTE, agent="ana", text="still there?")
    assert rejections(out) == ["thread_not_owned"]
    assert [e for e, _ in control(out)] == ["request_thread_control"]
    again = c.act("message", at=T0 + 2 * MINUTE + 10 * SECOND, agent="ana", text="hello?")
    assert rejections(again) == ["thread_not_owned"] and control(again) == []  # one request a minute
    later = c.act("message", at=T0 + 4 * MINUTE, agent="ana", text="hello??")
    assert [e for e, _ in control(later)] == ["request_thread_control"]
    assert outbound(c.act("typing", at=T0 + 5 * MINUTE, agent="ana", on=True)) == []
    # the bot passes it back: messages go again
    handover(c, "pass_thread_control", T0 + 6 * MINUTE, new_owner_app_id=OURS, previous_owner_app_id=BOT)
    (msg,) = outbound(c.act("message", at=T0 + 7 * MINUTE, agent="ana", text="back"))
    assert msg["request"]["message"]["text"] == "back"


def test_take_thread_on_agent_message_takes_it_first() -> None:
    c = Convo(cfg(BOTS.replace("transcript_minutes = 30", "transcript_minutes = 30\ntake_thread_on_agent_message = true")))
    c.msg("hello", at=T0)
    c.act("accept", at=T0 + SECOND, agent="ana")
    c.msg("to the bot", at=T0 + MINUTE, standby=True)  # the standby channel: another app owns it
    out = c.act("message", at=T0 + 2 * MINUTE, agent="ana", text="I am here")
    take, msg = outbound(out)
    assert take["endpoint"] == "take_thread_control" and msg["request"]["message"]["text"] == "I am here"
    assert c.state and c.state["thread"]["owner"] == OURS
    # the take failed at Meta: the thread is someone else's again
    c.result(at=T0 + 3 * MINUTE, outbox_id=take["outbox_id"], status="failed", endpoint="take_thread_control",
             code=10, message="(#10) not primary")
    assert c.state["thread"]["owner"] != OURS


def test_automatic_messages_are_not_sent_into_another_apps_thread() -> None:
    c = Convo(cfg(BOTS + "\n[skills.billing]\nwaiting_for_agent_after_seconds = 60\n"))
    c.msg("hello", at=T0)
    c.msg("bot?", at=T0 + SECOND, standby=True)
    out = c.tick(T0 + 61 * SECOND)
    assert [(m["trigger"], m["sent"]) for m in of_type(out, "system_message")] == [("waiting_for_agent", False)]


def test_page_inbox_hand_over_is_shown() -> None:
    c = bots_convo()
    c.msg("hello", at=T0)
    out = handover(c, "take_thread_control", T0 + MINUTE, previous_owner_app_id=OURS,
                   new_owner_app_id=PAGE_INBOX_APP_ID)
    (tc,) = of_type(out, "thread_control")
    assert tc["page_inbox"] is True and tc["to_app_id"] == PAGE_INBOX_APP_ID
    back = handover(c, "pass_thread_control", T0 + 2 * MINUTE, new_owner_app_id=OURS,
                    previous_owner_app_id=PAGE_INBOX_APP_ID)
    assert of_type(back, "handover_context")[0]["page_inbox"] is True
    page_echo = c.event("echo", at=T0 + 3 * MINUTE, standby=True, mid="pi1", app_id=PAGE_INBOX_APP_ID, text="hi")
    assert c.state and c.state["thread"]["lines"][-1][:1] == ["page"] and types(page_echo) == ["standby_event"]


def test_a_request_from_the_bot_is_shown_to_the_agent() -> None:
    c = bots_convo()
    c.msg("hello", at=T0)
    out = handover(c, "request_thread_control", T0 + MINUTE, requested_owner_app_id=BOT, metadata=None)
    (tc,) = of_type(out, "thread_control")
    assert (tc["change"], tc["to_app_id"]) == ("requested", BOT)
    assert outbound(out) == []  # the agent decides (`to_bot`)


def test_the_transcript_is_in_metas_time_order() -> None:
    c = bots_convo()
    bot_says(c, "second", at=T0 + 2 * SECOND)
    c.msg("first", at=T0 + SECOND, standby=True)  # its body was split after the bot's
    out = handover(c, "pass_thread_control", T0 + MINUTE, new_owner_app_id=OURS)
    assert [line["text"] for line in of_type(out, "handover_context")[0]["transcript"]] == ["first", "second"]

"""Unit tests of the conversation stage's pure decisions: (state, input) → (state, outputs)."""

from __future__ import annotations

from typing import Any

import pytest

from streams.rules.conversation.api import Input
from streams.rules.conversation.decider import Decider
from tests.rules.convo import HOUR, KEY, PAGE, PSID, T0, Convo, cfg, console, outbound, types

__all__ = ["HOUR", "KEY", "T0", "Convo", "cfg", "console", "outbound", "types"]


def test_first_message_opens_a_conversation_in_the_pages_skill() -> None:
    c = Convo()
    out = c.msg("hi")
    assert types(out) == ["conversation_opened", "system_message", "consumer_message"]
    opened, welcome, message = console(out)
    assert {v["skill"] for v in console(out)} == {"billing"}
    assert opened["locale"] == "en_US" and opened["returning"] is False
    assert welcome["trigger"] == "welcome_first"
    assert message["text"] == "hi" and message["truncated"] is False and message["mid"] == "m1"
    assert message["conversation_id"] == opened["conversation_id"] is not None
    # the welcome also goes to the consumer, as a system send
    assert [o["origin"] for o in outbound(out)] == ["system"]
    second = c.msg("again", at=T0 + 5)
    assert types(second) == ["consumer_message"]


def test_manual_mode_and_unknown_pages_go_to_the_default_skill() -> None:
    manual = Convo(cfg().model_copy(update={"routing": cfg().routing.model_copy(update={"mode": "manual"})}))
    assert {v["skill"] for v in console(manual.msg())} == {"general"}
    unknown = Convo(key="999:u1")
    out = unknown.msg()
    assert {v["skill"] for v in console(out)} == {"general"}
    assert ("unknown_page", "999") in out.notes


def test_event_ids_are_stable_for_the_same_input() -> None:
    a, b = Convo(), Convo()
    assert [v["event_id"] for v in console(a.msg())] == [v["event_id"] for v in console(b.msg())]
    ids = [v["event_id"] for v in console(a.msg("x"))]
    assert len(set(ids)) == len(ids)


def test_duplicate_event_is_ignored() -> None:
    c = Convo()
    c.msg("hi", mid="same")
    before = c.state
    again = c.msg("hi", mid="same", at=T0 + HOUR)
    assert again.outputs == [] and again.duplicate and again.notes == [("duplicate", "message")]
    assert again.state == before


def test_dedupe_horizon_and_key_cap_come_from_the_decider() -> None:
    c = Convo(decider=Decider(cfg(), dedupe_horizon_ms=HOUR, dedupe_max_keys=3))
    c.msg("hi", mid="same")
    assert c.msg("hi", mid="same", at=T0 + HOUR - 1).duplicate
    redelivered_late = c.msg("hi", mid="same", at=T0 + 2 * HOUR)  # past the horizon: counts as new
    assert not redelivered_late.duplicate and types(redelivered_late) == ["consumer_message"]
    for i in range(3):
        c.msg(f"m{i}", mid=f"x{i}", at=T0 + 2 * HOUR + i)
    assert c.state is not None and len(c.state["seen"]) == 3


def test_consumer_text_over_the_limit_is_truncated() -> None:
    c = Convo(cfg("\n[limits]\nconsumer_text = 10\n"))
    msg = console(c.msg("x" * 25))[-1]
    assert msg["text"] == "x" * 10 and msg["truncated"] is True


def test_agent_reply_within_24h_is_a_response_with_outbox_metadata() -> None:
    c = Convo()
    c.msg()
    c.act("accept")
    out = c.act("message", text="On it!")
    ev = console(out)[-1]
    assert ev["type"] == "agent_message" and ev["mid"] is None and ev["agent_id"] == "a1"
    (req,) = outbound(out)
    assert req["origin"] == "agent" and req["outbox_id"] == ev["outbox_id"]
    assert req["request"] == {"recipient": {"id": PSID}, "messaging_type": "RESPONSE",
                              "message": {"text": "On it!", "metadata": ev["outbox_id"]}}


def test_agent_reply_after_24h_uses_human_agent_then_window_closes() -> None:
    c = Convo()
    c.msg(at=T0)
    c.act("accept")
    late = outbound(c.act("message", at=T0 + 30 * HOUR, text="sorry for the wait"))[0]["request"]
    assert late["messaging_type"] == "MESSAGE_TAG" and late["tag"] == "HUMAN_AGENT"
    out = c.act("message", at=T0 + 8 * 24 * HOUR, text="hello?")
    assert outbound(out) == [] and console(out)[0]["reason"] == "window_closed"
    no_tag = Convo(cfg().model_copy(update={"account": cfg().account.model_copy(update={"human_agent_tag": False})}))
    no_tag.msg(at=T0)
    no_tag.act("accept")
    assert console(no_tag.act("message", at=T0 + 30 * HOUR, text="x"))[0]["reason"] == "window_closed"


def test_our_echo_gives_the_mid_once_and_others_are_external() -> None:
    c = Convo()
    c.msg()
    c.act("accept")
    outbox_id = outbound(c.act("message", text="hello"))[0]["outbox_id"]
    echo = c.event("echo", mid="mid.agent1", app_id="950864918368986", metadata=outbox_id, text="hello")
    (ev,) = console(echo)
    assert ev["type"] == "agent_message" and ev["mid"] == "mid.agent1" and ev["outbox_id"] == outbox_id
    # the send result arriving later adds nothing
    assert c.feed(Input("result", "r1", T0, {"outbox_id": outbox_id, "status": "sent", "mid": "mid.agent1"})).outputs == []
    # our app without metadata: our own send, never shown
    assert c.event("echo", mid="mid.sys", app_id="950864918368986", text="welcome").outputs == []
    for app_id in ("263902037430900", "1517776481860111", None):
        (ext,) = console(c.event("echo", mid=f"mid.{app_id}", app_id=app_id, text="from the page"))
        assert ext["type"] == "external_message"
        assert ext["author"] == {"agent_id": "connector", "nickname": "FB External User"}


def test_send_result_before_echo_still_shows_once() -> None:
    c = Convo()
    c.msg()
    c.act("accept")
    outbox_id = outbound(c.act("message", text="hello"))[0]["outbox_id"]
    out = c.feed(Input("result", "r1", T0, {"outbox_id": outbox_id, "status": "sent", "mid": "mid.x"}))
    assert [(v["type"], v["mid"]) for v in console(out)] == [("agent_message", "mid.x")]
    assert c.event("echo", mid="mid.x", app_id="950864918368986", metadata=outbox_id).outputs == []


def test_failed_send_becomes_send_failed_on_the_skill() -> None:
    c = Convo()
    c.msg()
    c.act("accept")
    outbox_id = outbound(c.act("message", text="hello"))[0]["outbox_id"]
    out = c.feed(Input("result", "r1", T0, {"outbox_id": outbox_id, "status": "failed", "code": 551,
                                             "subcode": 1545041, "message": "unavailable", "retryable": False}))
    (ev,) = console(out)
    assert ev["type"] == "send_failed" and ev["skill"] == "billing" and ev["code"] == 551 and ev["retryable"] is False
    redelivered = c.feed(Input("result", "r1", T0, {"outbox_id": outbox_id, "status": "failed", "code": 551}))
    assert console(redelivered) == []  # shown once


def test_receipts_are_monotonic() -> None:
    c = Convo()
    c.msg()
    assert console(c.event("delivery", watermark=200, mids=["m"]))[0]["watermark"] == 200
    assert c.event("delivery", watermark=150).outputs == []
    assert console(c.event("read", watermark=150))[0]["status"] == "read"
    assert c.event("read", watermark=100).outputs == []


def test_transfer_tells_both_skills_and_moves_the_conversation() -> None:
    c = Convo()
    c.msg()
    c.act("accept")
    out = c.act("transfer", to_skill="support")
    moved = [v for v in console(out) if v["type"] == "conversation_transferred"]
    assert sorted(v["skill"] for v in moved) == ["billing", "support"]
    assert all(v["from_skill"] == "billing" and v["to_skill"] == "support" for v in moved)
    assert console(c.msg("still there?"))[-1]["skill"] == "support"
    assert console(c.act("transfer", to_skill="nowhere"))[0]["reason"] == "invalid_action"


def test_close_sends_history_and_reopen_is_a_new_conversation() -> None:
    c = Convo(cfg("\n[csat]\nenabled = false\n"))
    first = console(c.msg())[0]["conversation_id"]
    c.act("accept")
    c.act("message", text="done")
    out = c.act("close")
    closed = [v for v in console(out) if v["type"] == "conversation_closed"][0]
    assert closed["closed_by"] == "agent"
    (hist,) = [o for o in out.outputs if o.dest == "history"]
    assert hist.key == first
    assert hist.value["agents"] == ["a1"] and hist.value["consumer_messages"] == 1 and hist.value["agent_messages"] == 1
    reopened = console(c.msg("one more thing"))
    assert reopened[0]["type"] == "conversation_opened" and reopened[0]["returning"] is True
    assert reopened[0]["conversation_id"] != first
    assert reopened[1]["trigger"] == "welcome_returning"


@pytest.mark.parametrize(
    ("action", "fields", "reason"),
    [
        ("message", {"text": "x"}, "unknown_conversation"),
        ("accept", {}, "unknown_conversation"),
        ("close", {}, "unknown_conversation"),
        ("transfer", {"to_skill": "support"}, "unknown_conversation"),
    ],
)
def test_actions_without_a_conversation_are_rejected(action: str, fields: dict[str, Any], reason: str) -> None:
    """Held first (its conversation's opening may still be replaying), rejected when the hold ends."""
    c = Convo()
    held = c.act(action, at=T0, **fields)
    assert console(held) == [] and held.arms == [T0 + 10_000]
    assert c.tick(T0 + 9_999).outputs == []
    out = c.tick(T0 + 10_000)
    assert [(v["type"], v["reason"]) for v in console(out)] == [("action_rejected", reason)]
    assert c.state is not None and c.state["held"] == []


def test_malformed_and_overlong_actions_are_rejected() -> None:
    c = Convo()
    c.msg()
    c.act("accept")
    out = c.feed(Input("action", "bad", T0, {"type": "dance", "page_id": PAGE, "psid": PSID}))
    assert console(out)[0]["reason"] == "invalid_action"
    long = c.act("message", text="y" * 641)
    assert console(long)[0]["reason"] == "text_too_long" and outbound(long) == []
    ok = c.act("message", text="y" * 640)
    assert outbound(ok)[0]["request"]["message"]["text"] == "y" * 640
    wrong_key = c.feed(Input("action", "k", T0, {"type": "accept", "action_id": "k", "page_id": "other",
                                                 "psid": PSID, "agent_id": "a"}))
    assert console(wrong_key)[0]["reason"] == "invalid_action"


def test_repeated_action_id_is_applied_once() -> None:
    c = Convo()
    c.msg()
    c.act("accept", agent="a")
    action = {"type": "message", "action_id": "same", "page_id": PAGE, "psid": PSID, "agent_id": "a", "text": "x"}
    assert len(outbound(c.feed(Input("action", "action:same", T0, action)))) == 1
    assert c.feed(Input("action", "action:same", T0, action)).outputs == []


def test_other_kinds_reach_the_console() -> None:
    c = Convo()
    c.msg()
    assert types(c.event("reaction", data={"mid": "m1", "reaction": "love", "action": "react"})) == ["reaction"]
    assert types(c.event("message_edit", mid="m1", text="fixed", data={"num_edit": 1})) == ["message_edit"]
    assert types(c.event("referral", data={"referral": {"ref": "r", "source": "SHORTLINK"}})) == ["referral"]
    # #15: a pass to another app is shown as `thread_control` (tests/rules/test_bots.py has the rest)
    assert types(c.event("handover", data={"type": "pass_thread_control"})) == ["thread_control"]
    pb = Convo()
    out = pb.event("postback", data={"title": "Get Started", "payload": "GET_STARTED"})
    assert types(out) == ["conversation_opened", "system_message", "consumer_message"]  # #17: a postback tap is a consumer message


def test_standby_is_context_and_never_answered() -> None:
    c = Convo()
    out = c.msg("hello", standby=True)
    assert types(out) == ["standby_event"]
    assert outbound(out) == [] and c.state and c.state["conv"] is None

"""The turn-aware lifecycle: timers by turn, off-hours messages, response times, ownership actions,
held actions, figures and notes — through `Decider.decide`."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streams.core.config import ConfigError
from tests.rules.convo import (
    HOUR,
    MINUTE,
    SECOND,
    SUPPORT_PAGE,
    T0,
    Convo,
    cfg,
    console,
    of,
    rejections,
    texts,
    triggers,
    types,
)

TIMERS = """
[skills.billing]
auto_accept = true
auto_close_after_seconds = 120
auto_close_warning_after_seconds = 60
agent_not_responding_after_seconds = 30
waiting_for_agent_after_seconds = 30
[skills.support]
waiting_for_agent_after_seconds = 20
[csat]
enabled = false
"""


def test_warning_then_close_on_the_consumers_turn_once_per_turn() -> None:
    c = Convo(cfg(TIMERS))
    c.msg("hi", at=T0)
    c.act("message", at=T0 + 10 * SECOND, text="Hello, how can I help?")
    assert triggers(c.tick(T0 + 70 * SECOND)) == ["consumer_not_responding"]
    assert c.tick(T0 + 100 * SECOND).outputs == []  # once per turn
    c.msg("sorry, here", at=T0 + 110 * SECOND)
    c.act("message", at=T0 + 120 * SECOND, text="No problem")
    assert triggers(c.tick(T0 + 179 * SECOND)) == []
    assert triggers(c.tick(T0 + 180 * SECOND)) == ["consumer_not_responding"]  # a new turn: once more
    closed = c.tick(T0 + 240 * SECOND)
    assert triggers(closed) == ["closed_idle"] and "conversation_closed" in types(closed)


def test_agent_not_responding_from_assignment_or_the_turns_first_line() -> None:
    c = Convo(cfg(TIMERS.replace("auto_accept = true", "auto_accept = false")))
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + 10 * SECOND, agent="ana")
    assert c.tick(T0 + 39 * SECOND).outputs == []  # 30 s from the assignment, not from the message
    out = c.tick(T0 + 40 * SECOND)
    assert types(out) == ["agent_not_responding", "system_message"]
    assert console(out)[0]["agent_id"] == "ana" and triggers(out) == ["agent_not_responding"]
    assert c.tick(T0 + 80 * SECOND).outputs == []  # once per turn
    c.act("message", at=T0 + 90 * SECOND, text="Here!", agent="ana")
    c.msg("thanks, another thing", at=T0 + 100 * SECOND)
    c.msg("and another", at=T0 + 120 * SECOND)  # does not restart the turn
    assert "agent_not_responding" in triggers(c.tick(T0 + 130 * SECOND))


def test_waiting_once_per_queue_stay_and_again_after_return_to_queue() -> None:
    c = Convo(cfg(TIMERS.replace("auto_accept = true", "auto_accept = false")))
    c.msg("hi", at=T0)
    assert triggers(c.tick(T0 + 30 * SECOND)) == ["waiting_for_agent"]
    assert c.tick(T0 + 90 * SECOND).outputs == []
    c.act("accept", at=T0 + 100 * SECOND, agent="ana")
    back = c.act("return_to_queue", at=T0 + 110 * SECOND, agent="ana")
    assert types(back) == ["conversation_returned", "system_message"] and triggers(back) == ["returned_to_queue"]
    assert texts(back) == ["Sorry, your agent can't respond right now. Another agent will be with you shortly."]
    assert triggers(c.tick(T0 + 140 * SECOND)) == ["waiting_for_agent"]
    c.act("accept", at=T0 + 150 * SECOND, agent="bob")
    c.act("transfer", at=T0 + 160 * SECOND, agent="bob", to_skill="support")
    assert triggers(c.tick(T0 + 180 * SECOND)) == ["waiting_for_agent"]  # support's 20 s, a new stay


def test_timers_fire_on_the_inputs_time_only() -> None:
    """Stream time is the timer input's `now`: a wake-up before the due time fires nothing."""
    c = Convo(cfg(TIMERS))
    c.msg("hi", at=T0)
    assert c.tick(T0 + 29_999).outputs == []
    assert triggers(c.tick(T0 + 30_000)) == ["waiting_for_agent"]


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("auto_close_after_seconds = 10\n", "skills.billing.auto_close_after_seconds"),
        ("waiting_for_agent_after_seconds = 14\n", "greater than or equal to 15"),
        ("agent_not_responding_after_seconds = 0\n", "skills.billing.agent_not_responding_after_seconds"),
        ("auto_close_after_seconds = 60\nauto_close_warning_after_seconds = 60\n", "must be less than"),
    ],
)
def test_timer_settings_are_checked(toml: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg("\n[skills.billing]\n" + toml)
    assert needle in str(err.value)


# working hours ------------------------------------------------------------------------------------
MON_10_UTC = int(datetime(2026, 6, 1, 10, 0, tzinfo=UTC).timestamp() * 1000)  # a Monday
HOURS = """
[skills.billing]
waiting_for_agent_after_seconds = 30
agent_not_responding_after_seconds = 30
expected_response_seconds = 7200
[skills.billing.hours]
timezone = "UTC"
mon = ["09:00-17:00"]
tue = ["09:00-17:00"]
[skills.support.hours]
timezone = "UTC"
[csat]
enabled = false
"""


def test_off_hours_welcomes_first_and_returning() -> None:
    c = Convo(cfg(HOURS), key=f"{SUPPORT_PAGE}:u2")  # support: closed all week
    first = c.msg("hola", at=MON_10_UTC)
    assert triggers(first) == ["welcome_first_off_hours"]
    assert triggers(c.msg("¿hay alguien?", at=MON_10_UTC + MINUTE)) == []  # the welcome told this period
    c.act("close", at=MON_10_UTC + 2 * MINUTE, role="manager")
    assert triggers(c.msg("otra vez", at=MON_10_UTC + 3 * MINUTE)) == ["welcome_returning_off_hours"]


def test_off_hours_message_mid_conversation_once_per_period() -> None:
    c = Convo(cfg(HOURS))
    assert triggers(c.msg("hi", at=MON_10_UTC)) == ["welcome_first"]
    c.act("accept", at=MON_10_UTC + MINUTE)
    c.act("message", at=MON_10_UTC + 2 * MINUTE, text="Hello!")
    assert triggers(c.msg("before closing", at=MON_10_UTC + 6 * HOUR)) == []
    evening = c.msg("are you there?", at=MON_10_UTC + 8 * HOUR)  # 18:00
    assert triggers(evening) == ["off_hours_mid_conversation"]
    assert texts(evening) == ["Sorry, our contact center is currently closed. An agent should reply within 2 hours."]
    assert triggers(c.msg("hello??", at=MON_10_UTC + 9 * HOUR)) == []  # same period
    c.act("message", at=MON_10_UTC + 24 * HOUR, text="Good morning")  # Tuesday 10:00
    assert triggers(c.msg("tuesday night", at=MON_10_UTC + 32 * HOUR)) == ["off_hours_mid_conversation"]


def test_off_hours_suspend_the_waiting_and_agent_timers() -> None:
    c = Convo(cfg(HOURS))
    queued_at = MON_10_UTC + 7 * HOUR - 10 * SECOND  # 16:59:50
    c.msg("hi", at=queued_at)
    assert c.tick(queued_at + 30 * SECOND).outputs == []  # 10 s of open time so far
    tuesday_9 = MON_10_UTC + 23 * HOUR
    assert c.tick(tuesday_9 + 19 * SECOND).outputs == []
    assert triggers(c.tick(tuesday_9 + 20 * SECOND)) == ["waiting_for_agent"]


def test_expected_response_time_in_words_of_the_locale() -> None:
    c = Convo(cfg(HOURS))
    assert texts(c.msg("hi", at=MON_10_UTC))[0].endswith("An agent should reply within 2 hours.")
    es = cfg(HOURS.replace("[skills.support.hours]\ntimezone = \"UTC\"\n", "")
             + '\n[words.es]\nshortly = "en breve"\nwithin = "en {n} {unit}"\nhour = "hora"\nhours = "horas"\n'
             + 'minute = "minuto"\nminutes = "minutos"\n'
             + '[skills.support]\nexpected_response_seconds = 1800\n'
             + '[auto_messages.welcome_first.by_locale]\nes = "¡Hola! Un agente responderá {expected_response_time}."\n')
    spanish = Convo(es, key=f"{SUPPORT_PAGE}:u3")  # the support page is es_ES
    assert texts(spanish.msg("hola", at=MON_10_UTC)) == ["¡Hola! Un agente responderá en 30 minutos."]
    plain = Convo()
    assert texts(plain.msg("hi", at=T0))[0].endswith("An agent should reply shortly.")


def test_a_promised_response_time_is_not_repeated_once_overdue() -> None:
    c = Convo(cfg(HOURS.replace("expected_response_seconds = 7200", "expected_response_seconds = 60")))
    c.msg("hi", at=MON_10_UTC + 6 * HOUR)  # 16:00, nobody answers
    late = c.msg("hello?", at=MON_10_UTC + 8 * HOUR)  # 18:00: off hours, but "within 1 minute" is long overdue
    assert triggers(late) == [] and ("auto_message_suppressed", "off_hours_mid_conversation") in late.notes


def test_urgency_payloads_and_response_time_set_by_the_agent() -> None:
    c = Convo(cfg("\n[messaging]\nurgent_payloads = [\"URGENT\"]\nnot_urgent_payloads = [\"NOT_URGENT\"]\n"
                  "[skills.billing]\nexpected_response_seconds = 7200\nurgent_response_seconds = 600\n"))
    c.msg("hi", at=T0)
    urgent = c.msg("Urgent!", at=T0 + SECOND, quick_reply_payload="URGENT")
    assert types(urgent) == ["consumer_message", "urgency_changed", "system_message"]
    assert texts(urgent) == ["You have marked this conversation as urgent. An agent should respond within 10 minutes."]
    assert triggers(c.postback("URGENT", at=T0 + 2 * SECOND)) == []  # already urgent
    calm = c.postback("NOT_URGENT", at=T0 + 3 * SECOND)
    assert texts(calm) == ["You have marked this conversation as not urgent. An agent should respond within 2 hours."]
    c.act("accept", at=T0 + 4 * SECOND)
    assert rejections(c.act("set_response_time", at=T0 + 5 * SECOND)) == ["invalid_action"]
    set_ = c.act("set_response_time", at=T0 + 6 * SECOND, seconds=1800)
    assert types(set_) == ["response_time_set", "system_message"]
    assert texts(set_) == ["An agent should respond within 30 minutes."]
    with pytest.raises(ConfigError, match="both close_payloads and urgent_payloads"):
        cfg('\n[messaging]\nurgent_payloads = ["CLOSE_CONVERSATION"]\n')


# ownership actions --------------------------------------------------------------------------------
def test_managers_join_and_leave_with_their_messages() -> None:
    c = Convo(cfg("\n[agents.nicknames]\nsup1 = \"Sam\"\n"))
    c.msg("hi", at=T0)
    assert rejections(c.act("join", at=T0 + SECOND, agent="bob")) == ["invalid_action"]  # managers only
    joined = c.act("join", at=T0 + 2 * SECOND, agent="sup1", role="manager")
    assert types(joined) == ["manager_joined", "system_message"] and texts(joined) == ["Sam joined the conversation."]
    assert c.act("join", at=T0 + 3 * SECOND, agent="sup1", role="manager").outputs == []  # already there
    anon = c.act("join", at=T0 + 4 * SECOND, agent="sup2", role="manager")
    assert texts(anon) == ["An agent joined the conversation."]  # whole words, capitalised
    left = c.act("leave", at=T0 + 5 * SECOND, agent="sup1", role="manager", agent_nickname="Samantha")
    assert texts(left) == ["Samantha left the conversation."]
    assert [m["id"] for m in c.conv["managers"]] == ["sup2"]


def test_manager_accept_takes_over_and_agents_cannot() -> None:
    c = Convo()
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + SECOND, agent="ana", agent_nickname="Ana")
    assert rejections(c.act("accept", at=T0 + 2 * SECOND, agent="bob")) == ["not_owner"]
    assert c.act("accept", at=T0 + 3 * SECOND, agent="ana").outputs == []  # already hers
    over = c.act("accept", at=T0 + 4 * SECOND, agent="sup", role="manager", agent_nickname="Sam")
    assert texts(over) == ["You are now connected to Sam."] and c.conv["owner"]["id"] == "sup"


def test_transfer_to_an_agent_and_to_a_skill() -> None:
    c = Convo(cfg("\n[auto_messages.transferred.by_skill]\nsupport = \"Support is taking over\"\n"))
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + SECOND, agent="ana")
    to_bob = c.act("transfer", at=T0 + 2 * SECOND, agent="ana", to_agent_id="bob", to_agent_nickname="Bob")
    (moved,) = [v for v in console(to_bob) if v["type"] == "conversation_transferred"]  # same skill: one event
    assert (moved["from_skill"], moved["to_skill"], moved["to_agent_id"]) == ("billing", "billing", "bob")
    assert c.conv["owner"] == {"id": "bob", "nickname": "Bob"}
    assert rejections(c.act("transfer", at=T0 + 3 * SECOND, agent="bob", to_agent_id="bob")) == ["invalid_action"]
    assert rejections(c.act("transfer", at=T0 + 4 * SECOND, agent="bob")) == ["invalid_action"]
    to_support = c.act("transfer", at=T0 + 5 * SECOND, agent="bob", to_skill="support", to_agent_id="sue")
    assert sorted(v["skill"] for v in console(to_support) if v["type"] == "conversation_transferred") == [
        "billing", "support"]
    assert texts(to_support) == ["Support is taking over"]  # the target skill's text
    assert c.conv["skill"] == "support" and c.conv["owner"]["id"] == "sue"
    assert ("open-", "billing") in to_support.notes and ("open+", "support") in to_support.notes


def test_auto_accept_takes_on_typing_read_close_and_response_time() -> None:
    auto = "\n[skills.billing]\nauto_accept = true\n[csat]\nenabled = false\n"
    for action, fields in (("typing", {"on": True}), ("read", {}), ("set_response_time", {"seconds": 60})):
        c = Convo(cfg(auto))
        c.msg("hi", at=T0)
        out = c.act(action, at=T0 + SECOND, agent="ana", **fields)
        assert types(out)[0] == "conversation_accepted", action
    c = Convo(cfg(auto))
    c.msg("hi", at=T0)
    closed = c.act("close", at=T0 + SECOND, agent="ana", agent_nickname="Ana")
    assert texts(closed) == ["This conversation has been closed by Ana. Thank you for contacting us!"]


def test_held_action_applies_when_its_conversation_opens_after_a_replay() -> None:
    """After a restart the agent's accept (taken after the opening) is consumed before the message."""
    c = Convo()
    held = c.act("accept", at=T0 + 2 * SECOND, agent="ana")
    assert console(held) == [] and held.notes == [("held", "accept")]
    opened = c.msg("hi", at=T0)  # the replayed opening message
    assert types(opened) == ["conversation_opened", "system_message", "consumer_message", "conversation_accepted",
                             "system_message"]
    assert c.conv["owner"]["id"] == "ana" and c.state is not None and c.state["held"] == []
    assert c.tick(T0 + 20 * SECOND).outputs == []  # nothing left to reject


def test_held_actions_after_a_held_close_are_rejected_when_released() -> None:
    """accept, close and a message all arrive before the replayed opening: the close ends the
    conversation, so the message released after it is rejected (it used to crash the rules)."""
    c = Convo(cfg("\n[csat]\nenabled = false\n"))
    c.act("accept", at=T0 + SECOND, agent="ana")
    c.act("close", at=T0 + 2 * SECOND, agent="ana")
    c.act("message", at=T0 + 3 * SECOND, agent="ana", text="still there?")
    opened = c.msg("hi", at=T0)
    assert "conversation_closed" in types(opened)
    assert rejections(opened) == ["unknown_conversation"]
    assert c.state is not None and c.state["held"] == [] and c.state["conv"] is None


def test_held_action_taken_before_the_opening_is_rejected() -> None:
    c = Convo()
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + SECOND)
    c.act("close", at=T0 + 2 * SECOND)
    assert console(c.act("close", at=T0 + 3 * SECOND)) == []  # a double click: held
    reopened = c.msg("one more thing", at=T0 + 5 * SECOND)
    assert rejections(reopened) == ["unknown_conversation"]
    assert c.conv["owner"] is None  # the old close did not close the new conversation


def test_actions_naming_the_closed_conversation_are_rejected_at_once_and_holds_are_bounded() -> None:
    c = Convo()
    cid = console(c.msg("hi", at=T0))[0]["conversation_id"]
    c.act("accept", at=T0 + SECOND)
    c.act("close", at=T0 + 2 * SECOND)
    assert rejections(c.act("message", at=T0 + 3 * SECOND, text="x", conversation_id=cid)) == ["unknown_conversation"]
    for i in range(4):
        assert console(c.act("message", at=T0 + 4 * SECOND + i, text="x")) == []
    assert rejections(c.act("message", at=T0 + 9 * SECOND, text="x")) == ["unknown_conversation"]  # the 5th
    expired = c.tick(T0 + 4 * SECOND + 10 * SECOND)
    assert rejections(expired) == ["unknown_conversation"]  # the first held, at the end of its hold
    assert len({v["event_id"] for v in console(expired)}) == 1


# figures and notes ----------------------------------------------------------------------------------
def test_summary_figures_and_notes() -> None:
    c = Convo(cfg("\n[csat]\nenabled = false\n"))
    opened = c.msg("hi", at=T0)
    assert ("open+", "billing") in opened.notes and ("queue+", "billing") in opened.notes
    assert ("page_in", c.page) in opened.notes and ("page_out", c.page) in opened.notes  # the welcome
    took = c.act("accept", at=T0 + 30 * SECOND, agent="ana")
    assert ("queue-", "billing") in took.notes and ("queue_wait_seconds", "billing", 30.0) in took.figures
    wrote = c.act("message", at=T0 + 40 * SECOND, agent="ana", text="Hello")
    assert ("first_response_seconds", "billing", 40.0) in wrote.figures and ("agent_message", "ana") in wrote.notes
    c.act("return_to_queue", at=T0 + 50 * SECOND, agent="ana")
    c.act("accept", at=T0 + 70 * SECOND, agent="bob")
    c.act("message", at=T0 + 80 * SECOND, agent="bob", text="Me again")
    out = c.act("close", at=T0 + 100 * SECOND, agent="bob")
    (s,) = of(out, "history")
    assert s["first_agent_response_ms"] == 40_000 and s["queue_ms"] == 50_000 and s["handle_ms"] == 100_000
    assert s["abandoned"] is False and s["agents"] == ["ana", "bob"] and s["closed_by"] == "agent"
    assert ("handle_seconds", "billing", 100.0) in out.figures and ("open-", "billing") in out.notes
    abandoned = Convo(cfg("\n[csat]\nenabled = false\n"))
    abandoned.msg("hi", at=T0)
    gone = abandoned.act("close", at=T0 + MINUTE, role="manager")
    (a,) = of(gone, "history")
    assert a["abandoned"] is True and a["first_agent_response_ms"] is None and a["queue_ms"] == MINUTE
    assert ("abandoned", "billing") in gone.notes and ("queue-", "billing") in gone.notes


def test_unknown_pages_are_labelled_other() -> None:
    c = Convo(key="999:u1")
    out = c.msg("hi", at=T0)
    assert ("page_in", "other") in out.notes and ("unknown_page", "999") in out.notes


def test_typed_digit_counts_only_as_the_next_message() -> None:
    c = Convo(cfg("\n[csat]\nenabled = true\n"))
    c.msg("help", at=T0)
    c.act("accept", at=T0 + SECOND)
    c.act("close", at=T0 + 2 * SECOND)
    c.msg("thanks, bye", at=T0 + 3 * SECOND)  # not an answer: the survey is over
    assert of(c.msg("5", at=T0 + 4 * SECOND), "csat_facts") == []

"""CSAT inside the conversation stage: survey on close, answers counted once, late and non-answers."""

from __future__ import annotations

from typing import Any

from streams.rules.conversation.api import Decision
from tests.rules.convo import HOUR, T0, Convo, cfg, console, outbound, types

SURVEY = "\n[csat]\nenabled = true\nexpire_after_seconds = 600\n[csat.question_by_page]\n\"298733926841562\" = \"How did support do?\"\n"


def closed_with_survey(extra: str = "", key: str | None = None) -> tuple[Convo, Decision]:
    c = Convo(cfg(SURVEY + extra), **({"key": key} if key else {}))
    c.msg("help", at=T0)
    c.act("accept", at=T0 + 1000, agent="ana")
    return c, c.act("close", at=T0 + 2000, agent="ana")


def facts(d: Decision) -> list[dict[str, Any]]:
    return [o.value for o in d.outputs if o.dest == "csat_facts"]


def answer(c: Convo, score: int, at: int = T0 + 60_000, typed: bool = False) -> Decision:
    cid = c.state["survey"]["conversation_id"] if c.state and c.state["survey"] else "gone"
    if typed:
        return c.msg(str(score), at=at)
    return c.msg(f"{score} ⭐", at=at, quick_reply_payload=f"CSAT:{cid}:{score}")


def test_agent_close_sends_the_survey() -> None:
    c, out = closed_with_survey()
    (survey,) = [o for o in outbound(out) if o["origin"] == "csat"]
    msg = survey["request"]["message"]
    assert msg["text"] == "How would you rate your conversation with us?"
    assert [q["payload"].rsplit(":", 1)[1] for q in msg["quick_replies"]] == ["1", "2", "3", "4", "5"]
    assert all(len(q["title"]) <= 20 for q in msg["quick_replies"])
    assert survey["request"]["messaging_type"] == "RESPONSE"
    assert "csat_requested" in types(out)
    assert [f["fact"] for f in facts(out)] == ["survey_sent"]


def test_question_by_page_then_locale() -> None:
    _, out = closed_with_survey(key="298733926841562:u1")
    (req,) = [o for o in outbound(out) if o["origin"] == "csat"]
    assert req["request"]["message"]["text"] == "How did support do?"


def test_quick_reply_answer_is_counted_once() -> None:
    c, _ = closed_with_survey()
    out = answer(c, 5)
    assert types(out) == ["system_message"]  # the thank-you; csat_received comes from the CSAT stage
    (resp,) = [o.value for o in out.outputs if o.dest == "csat_responses"]
    assert resp["score"] == 5 and resp["skill"] == "billing" and resp["agent_id"] == "ana"
    assert [(f["fact"], f["score"], f["agent_id"]) for f in facts(out)] == [("answer", 5, "ana")]
    (hist,) = [o.value for o in out.outputs if o.dest == "history"]
    assert hist["csat_score"] == 5
    # tapping again (a new mid) counts nothing and opens nothing
    again = c.msg("4 ⭐", at=T0 + 70_000, quick_reply_payload=f"CSAT:{resp['conversation_id']}:4")
    assert again.outputs == [] and c.state and c.state["conv"] is None


def test_typed_digit_while_pending_counts() -> None:
    c, _ = closed_with_survey()
    out = answer(c, 3, typed=True)
    assert [f["score"] for f in facts(out)] == [3]


def test_non_answer_opens_a_new_conversation_and_ends_the_survey() -> None:
    c, _ = closed_with_survey()
    out = c.msg("I still need help", at=T0 + 5000)
    assert types(out)[0] == "conversation_opened" and facts(out) == []
    later = c.msg("5", at=T0 + 6000)
    assert types(later) == ["consumer_message"] and facts(later) == []


def test_expired_survey_is_not_counted() -> None:
    c, _ = closed_with_survey()
    late_tap = answer(c, 5, at=T0 + 2000 + 601_000)
    assert facts(late_tap) == [] and late_tap.outputs == []
    c2, _ = closed_with_survey()
    late_typed = answer(c2, 4, at=T0 + 2000 + 601_000, typed=True)
    assert facts(late_typed) == [] and types(late_typed)[0] == "conversation_opened"


def test_no_survey_outside_the_window_or_when_disabled() -> None:
    c = Convo(cfg(SURVEY))
    c.msg("hi", at=T0)
    out = c.act("close", at=T0 + 25 * HOUR)
    assert "csat_requested" not in types(out) and facts(out) == []
    off = Convo(cfg("\n[csat]\nenabled = false\n"))
    off.msg("hi", at=T0)
    assert "csat_requested" not in types(off.act("close", at=T0 + 1000))


def test_consumer_close_surveys_only_when_configured() -> None:
    c = Convo(cfg(SURVEY))
    c.msg("hi", at=T0)
    out = c.event("postback", at=T0 + 1000, data={"title": "End chat", "payload": "CLOSE_CONVERSATION"})
    closed = [v for v in console(out) if v["type"] == "conversation_closed"]
    assert closed[0]["closed_by"] == "consumer" and "csat_requested" not in types(out)
    c2 = Convo(cfg(SURVEY.replace("enabled = true", "enabled = true\non_consumer_close = true")))
    c2.msg("hi", at=T0)
    out2 = c2.msg("bye", at=T0 + 1000, quick_reply_payload="CLOSE_CONVERSATION")
    assert "csat_requested" in types(out2)


def test_facts_are_keyed_by_skill_and_the_rules_read_no_totals() -> None:
    """Decision C: facts go to the CSAT stage keyed by skill; the rules emit no csat_received."""
    c, closed = closed_with_survey()
    out = answer(c, 2)
    assert [o.key for o in closed.outputs + out.outputs if o.dest == "csat_facts"] == ["billing", "billing"]
    assert "csat_received" not in types(closed) + types(out)
    assert not hasattr(c.d, "csat_totals")


def test_thank_you_comes_from_csat_config_and_can_be_overridden_per_skill() -> None:
    c = Convo(cfg(SURVEY.replace("enabled = true", 'enabled = true\nthank_you = "Gracias por tu respuesta"')))
    c.msg("help", at=T0)
    c.act("accept", at=T0 + 1000, agent="ana")
    c.act("close", at=T0 + 2000, agent="ana")
    thanks = [v for v in console(answer(c, 5)) if v["type"] == "system_message"]
    assert [v["text"] for v in thanks] == ["Gracias por tu respuesta"]
    c2, _ = closed_with_survey('\n[auto_messages.csat_thanks.by_skill]\nbilling = "Billing thanks you"\n')
    thanks2 = [v for v in console(answer(c2, 4)) if v["type"] == "system_message"]
    assert [v["text"] for v in thanks2] == ["Billing thanks you"]

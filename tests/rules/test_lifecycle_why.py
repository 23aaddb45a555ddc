"""One test per "Why" bullet of issue #13: each failed on the single-class Decider and passes now."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from streams.core.config import ConfigError
from tests.rules.convo import (
    DAY,
    HOUR,
    MINUTE,
    SECOND,
    T0,
    Convo,
    cfg,
    console,
    of,
    outbound,
    rejections,
    texts,
    triggers,
    types,
)

IDLE_30_MIN = "\n[skills.billing]\nauto_close_after_seconds = 1800\n[csat]\nenabled = false\n"


# 1. Auto-close ignores whose turn it is -----------------------------------------------------------
def test_auto_close_waits_for_the_consumer_after_the_agents_reply() -> None:
    c = Convo(cfg(IDLE_30_MIN))
    c.msg("my bill is wrong", at=T0)
    c.act("accept", at=T0 + MINUTE)
    c.act("message", at=T0 + 28 * MINUTE, text="Fixed it, can you check?")
    assert "conversation_closed" not in types(c.tick(T0 + 30 * MINUTE))  # the customer just got the answer
    assert "conversation_closed" not in types(c.tick(T0 + 58 * MINUTE - 1))
    closed = c.tick(T0 + 58 * MINUTE)
    assert "conversation_closed" in types(closed) and triggers(closed) == ["closed_idle"]


def test_no_auto_close_while_the_consumer_waits_for_an_agent() -> None:
    c = Convo(cfg(IDLE_30_MIN))
    c.msg("anyone there?", at=T0)
    assert "conversation_closed" not in types(c.tick(T0 + 2 * HOUR))
    assert c.state is not None and c.state["conv"] is not None


# 2. A proactive open was auto-closed about a second later --------------------------------------------
def test_proactive_open_is_not_closed_a_second_later() -> None:
    c = Convo(cfg(IDLE_30_MIN))
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + SECOND)
    c.act("close", at=T0 + 2 * SECOND)
    opened = c.act("open", at=T0 + 2 * HOUR, text="Your refund went through", agent="ana")
    assert "conversation_opened" in types(opened)
    assert "conversation_closed" not in types(c.tick(T0 + 2 * HOUR + SECOND))
    assert "conversation_closed" in types(c.tick(T0 + 2 * HOUR + 30 * MINUTE))  # from the open


# 3. A pending CSAT survey swallowed the next conversation ----------------------------------------------
def _surveyed() -> Convo:
    c = Convo(cfg("\n[csat]\nenabled = true\n"))
    c.msg("help", at=T0)
    c.act("accept", at=T0 + SECOND)
    c.act("close", at=T0 + 2 * SECOND)
    assert c.state is not None and c.state["survey"] is not None
    return c


def test_a_proactive_open_ends_the_pending_survey() -> None:
    c = _surveyed()
    c.act("open", at=T0 + MINUTE, text="One more question: option 1 or 2?", agent="a1")
    out = c.msg("2", at=T0 + 2 * MINUTE)
    assert of(out, "csat_facts") == [] and of(out, "csat_responses") == []
    assert "csat_thanks" not in triggers(out)
    assert [v["text"] for v in console(out) if v["type"] == "consumer_message"] == ["2"]


def test_get_started_opens_a_new_conversation_and_ends_the_survey() -> None:
    c = _surveyed()
    opened = c.postback("GET_STARTED", at=T0 + MINUTE, title="Get Started")
    assert types(opened)[0] == "conversation_opened"
    c.act("accept", at=T0 + 2 * MINUTE)
    c.act("message", at=T0 + 3 * MINUTE, text="Option 1 or 2?")
    out = c.msg("2", at=T0 + 4 * MINUTE)
    assert of(out, "csat_facts") == [] and types(out) == ["consumer_message"]


# 4. Wrong words to the customer ----------------------------------------------------------------------
def test_closed_after_a_transfer_names_the_closing_agent_in_whole_words() -> None:
    c = Convo(cfg("\n[csat]\nenabled = false\n"))
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + SECOND)
    c.act("transfer", at=T0 + 2 * SECOND, to_skill="support")
    out = c.act("close", at=T0 + 3 * SECOND, agent="sup1", role="manager")
    assert texts(out) == ["This conversation has been closed by an agent. Thank you for contacting us!"]


def test_connected_to_a_nickname_never_an_id() -> None:
    c = Convo(cfg("\n[agents]\ndefault_nickname = \"one of our agents\"\n"))
    c.msg("hi", at=T0)
    assert texts(c.act("accept", at=T0 + SECOND, agent="ag1")) == ["You are now connected to one of our agents."]
    named = Convo(cfg("\n[agents.nicknames]\nag1 = \"Ana\"\n"))
    named.msg("hi", at=T0)
    assert texts(named.act("accept", at=T0 + SECOND, agent="ag1")) == ["You are now connected to Ana."]


def test_no_waiting_message_after_an_agent_replied() -> None:
    c = Convo(cfg("\n[skills.billing]\nwaiting_for_agent_after_seconds = 30\n"))
    c.msg("hi", at=T0)
    c.act("message", at=T0 + 5 * SECOND, text="A supervisor here, one moment", agent="sup1", role="manager")
    assert "waiting_for_agent" not in triggers(c.tick(T0 + 31 * SECOND))


def test_proactive_open_says_nothing_before_the_agents_message() -> None:
    c = Convo()
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + SECOND)
    c.act("close", at=T0 + 2 * SECOND)
    out = c.act("open", at=T0 + HOUR, text="We found your parcel", agent="ana")
    assert "accepted" not in triggers(out)
    assert [o["origin"] for o in outbound(out)] == ["agent"]


# 5. No ownership ---------------------------------------------------------------------------------------
def test_only_the_assigned_agent_may_message_close_or_transfer() -> None:
    c = Convo()
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + SECOND, agent="ana")
    assert rejections(c.act("message", at=T0 + 2 * SECOND, agent="bob", text="mine now")) == ["not_owner"]
    assert rejections(c.act("close", at=T0 + 3 * SECOND, agent="bob")) == ["not_owner"]
    assert rejections(c.act("transfer", at=T0 + 4 * SECOND, agent="bob", to_skill="support")) == ["not_owner"]
    assert c.conv["owner"]["id"] == "ana"
    unassigned = Convo()
    unassigned.msg("hi", at=T0)
    assert rejections(unassigned.act("message", at=T0 + SECOND, text="hello")) == ["not_assigned"]


def test_an_agent_who_replies_is_in_history_and_rated() -> None:
    c = Convo(cfg("\n[csat]\nenabled = true\n"))
    c.msg("hi", at=T0)
    c.act("message", at=T0 + SECOND, agent="sup1", role="manager", text="Let me help")
    out = c.act("close", at=T0 + 2 * SECOND, agent="sup1", role="manager")
    (summary,) = of(out, "history")
    assert summary["agents"] == ["sup1"]
    assert [f["agent_id"] for f in of(out, "csat_facts")] == ["sup1"]


# 6. Messenger's windows from receive time; standby messages ignored --------------------------------------
def test_windows_run_on_metas_timestamp_not_on_receive_time() -> None:
    c = Convo()
    c.msg("hello", at=T0 + 23 * HOUR, timestamp=T0)  # Meta retried the delivery 23 hours late
    c.act("accept", at=T0 + 23 * HOUR + SECOND)
    (req,) = [o["request"] for o in outbound(c.act("message", at=T0 + 25 * HOUR, text="Sorry!"))]
    assert (req["messaging_type"], req.get("tag")) == ("MESSAGE_TAG", "HUMAN_AGENT")


def test_standby_consumer_messages_refresh_the_window() -> None:
    c = Convo()
    c.msg("hello", at=T0)
    c.act("accept", at=T0 + SECOND)
    c.msg("talking to the other app", at=T0 + 20 * HOUR, standby=True)
    (req,) = [o["request"] for o in outbound(c.act("message", at=T0 + 30 * HOUR, text="Back to us"))]
    assert req["messaging_type"] == "RESPONSE" and "tag" not in req


# 7. Texts not held to the 640-character limit -----------------------------------------------------------
@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[auto_messages.accepted]\ntext = "' + "x" * 3000 + '"\n', "auto_messages.accepted.text: up to 3000"),
        ('[csat]\nquestion = "' + "q" * 700 + '"\n', "csat.question: up to 700"),
        ('[csat]\nthank_you = "Thanks {agent_name}"\n', "csat.thank_you: unknown placeholder {agent_name}"),
    ],
)
def test_every_text_is_checked_at_start_up(toml: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg("\n" + toml)
    assert needle in str(err.value)


# 8. One ~585-line class over plain dicts -----------------------------------------------------------------
def test_the_rules_are_small_modules_of_functions() -> None:
    package = Path(__file__).resolve().parents[2] / "streams" / "rules" / "conversation"
    modules = sorted(package.glob("*.py"))
    assert len(modules) >= 10
    for module in modules:
        source = module.read_text()
        assert source.count("\n") <= 320, f"{module.name} is {source.count(chr(10))} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                assert (node.end_lineno or 0) - node.lineno <= 160, f"class {node.name} in {module.name}"


def test_a_week_later_the_window_is_closed() -> None:
    c = Convo()
    c.msg("hello", at=T0)
    c.act("accept", at=T0 + SECOND)
    assert rejections(c.act("message", at=T0 + 8 * DAY, text="Still there?")) == ["window_closed"]

"""Automatic messages: template resolution (most specific wins), placeholders, and their triggers."""

from __future__ import annotations

import pytest

from streams.core.automessages import (
    DEFAULT_TEXTS,
    DEFAULT_WORDS,
    PLACEHOLDER_MAX,
    AutoMessage,
    Trigger,
    check_templates,
    check_text,
    clamp,
    render,
    resolve_template,
)
from streams.core.config import ConfigError, parse_config
from streams.rules.conversation.api import Decision, Input
from tests.conftest import BASE_CONFIG
from tests.rules.convo import HOUR, T0, Convo, cfg, console, outbound, rejections, types

AUTO = {
    "accepted": AutoMessage(
        text="Connected with {agent_nickname}",
        by_locale={"es_ES": "Conectado con {agent_nickname}", "fr": "Connecté"},
        by_page={"p2": "Page two says hi to {agent_nickname}"},
        by_skill={"vip": "VIP agent {agent_nickname} is here"},
    ),
    "transferred": AutoMessage(enabled=False),
}


@pytest.mark.parametrize(
    ("locale", "page", "skill", "expected"),
    [
        ("en_US", "p1", "general", "Connected with {agent_nickname}"),
        ("es_ES", "p1", "general", "Conectado con {agent_nickname}"),
        ("fr_CA", "p1", "general", "Connecté"),
        ("es_ES", "p2", "general", "Page two says hi to {agent_nickname}"),
        ("es_ES", "p2", "vip", "VIP agent {agent_nickname} is here"),
    ],
)
def test_most_specific_text_wins(locale: str, page: str, skill: str, expected: str) -> None:
    assert resolve_template(AUTO, "accepted", locale=locale, page_id=page, skill=skill) == expected


def test_defaults_and_switched_off_triggers() -> None:
    assert resolve_template(AUTO, "welcome_first", locale="en_US", page_id="p", skill="s") == DEFAULT_TEXTS["welcome_first"]
    assert resolve_template(AUTO, "transferred", locale="en_US", page_id="p", skill="s") is None


def test_render_fills_placeholders() -> None:
    assert render("Hi {agent_nickname} from {skill}", {"agent_nickname": "Ana", "skill": "billing"}) == "Hi Ana from billing"


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[auto_messages.accepted]\ntext = "Hello {agent_name}"\n', "auto_messages.accepted.text: unknown placeholder {agent_name}"),
        ('[auto_messages.accepted.by_skill]\nbilling = "Hi {nope}"\n', "by_skill.billing: unknown placeholder {nope}"),
        ('[auto_messages.accepted]\ntext = "Hello {"\n', "auto_messages.accepted.text"),
        ('[auto_messages.goodbye]\ntext = "bye"\n', "auto_messages.goodbye: unknown trigger"),
        ('[auto_messages.accepted]\ncolour = "red"\n', "auto_messages.accepted.colour: unknown key"),
    ],
)
def test_bad_templates_stop_start_up(toml: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE_CONFIG + "\n" + toml)
    assert needle in str(err.value)


def test_check_templates_accepts_every_default() -> None:
    check_templates({t: AutoMessage(text=txt) for t, txt in DEFAULT_TEXTS.items()})


# --- triggers, through the decision functions -------------------------------------------------

SKILLS = """
[skills.billing]
auto_accept = true
auto_close_after_seconds = 60
waiting_for_agent_after_seconds = 30
[auto_messages.accepted.by_skill]
billing = "Billing agent {agent_nickname} here"
"""


def test_triggers_fire_on_their_events() -> None:
    c = Convo(cfg(SKILLS + "\n[csat]\nenabled = false\n"))
    opened = c.msg("hi")
    assert [v["trigger"] for v in console(opened) if v["type"] == "system_message"] == ["welcome_first"]
    assert opened.arms  # idle and waiting timers armed
    accepted = c.act("typing", on=True, agent="ana", agent_nickname="Ana")  # auto-accept on first action
    assert types(accepted) == ["conversation_accepted", "system_message"]
    assert console(accepted)[1]["text"] == "Billing agent Ana here"
    assert [o["request"].get("sender_action") for o in outbound(accepted)] == [None, "typing_on"]
    transferred = c.act("transfer", to_skill="support", agent="ana")
    assert [v["trigger"] for v in console(transferred) if v["type"] == "system_message"] == ["transferred"]
    c.act("accept", agent="bo")
    closed = c.act("close", agent="bo")
    assert [v["trigger"] for v in console(closed) if v["type"] == "system_message"] == ["closed_by_agent"]


def test_typing_and_read_become_sender_actions_and_are_dropped_when_closed() -> None:
    c = Convo()
    c.msg()
    c.act("accept")
    assert outbound(c.act("typing", on=True))[0]["request"] == {"recipient": {"id": "u1"}, "sender_action": "typing_on"}
    assert outbound(c.act("typing", on=False))[0]["request"]["sender_action"] == "typing_off"
    assert outbound(c.act("read"))[0]["request"]["sender_action"] == "mark_seen"
    c.act("close")
    assert c.act("typing", on=True).outputs == []


def test_auto_accept_only_in_skills_that_enable_it() -> None:
    c = Convo(cfg(SKILLS))
    c.msg()
    first = c.act("message", text="Hello!", agent="ana")
    assert types(first) == ["conversation_accepted", "system_message", "agent_message"]
    assert rejections(c.act("message", text="again", agent="bob")) == ["not_owner"]  # only the first agent takes it
    support = Convo(cfg(SKILLS), key="298733926841562:u2")
    support.msg()
    assert rejections(support.act("message", text="hi")) == ["not_assigned"]  # no auto-accept: accept first
    support.act("accept")
    assert types(support.act("message", text="hi")) == ["agent_message"]


def tick(c: Convo, at: int) -> Decision:
    return c.feed(Input("timer", f"t{at}", at, {}))


def test_auto_close_counts_from_the_agents_last_message_on_the_consumers_turn() -> None:
    c = Convo(cfg(SKILLS + "\n[csat]\nenabled = true\n"))
    c.msg("hi", at=T0)
    c.act("message", at=T0 + 10_000, text="How can I help?", agent="ana")  # auto-accept; consumer's turn
    assert "conversation_closed" not in types(tick(c, T0 + 69_000))
    c.msg("still here", at=T0 + 50_000)  # the agent's turn: no idle timer at all
    assert "conversation_closed" not in types(tick(c, T0 + 200_000))
    c.act("message", at=T0 + 210_000, text="Done!", agent="ana")  # the consumer's turn again
    assert "conversation_closed" not in types(tick(c, T0 + 269_999))
    out = tick(c, T0 + 270_000)
    closed = [v for v in console(out) if v["type"] == "conversation_closed"][0]
    assert (closed["closed_by"], closed["reason"]) == ("system", "idle")
    assert [v["trigger"] for v in console(out) if v["type"] == "system_message"] == ["closed_idle"]
    assert "csat_requested" not in types(out)  # auto_close_csat is off by default
    assert tick(c, T0 + 400_000).outputs == []  # fires once


def test_auto_close_with_survey_when_configured() -> None:
    c = Convo(cfg(SKILLS.replace("auto_accept = true", "auto_accept = true\nauto_close_csat = true")))
    c.msg("hi", at=T0)
    c.act("message", at=T0 + 1000, text="Anything else?", agent="ana")
    assert "csat_requested" in types(tick(c, T0 + 61_000))


def test_waiting_for_agent_fires_only_without_an_agent() -> None:
    c = Convo(cfg(SKILLS))
    c.msg("hi", at=T0)
    out = tick(c, T0 + 31_000)
    assert [v["trigger"] for v in console(out)] == ["waiting_for_agent"]
    assert tick(c, T0 + 40_000).outputs == []
    c2 = Convo(cfg(SKILLS))
    c2.msg("hi", at=T0)
    c2.act("accept", at=T0 + 1000)
    assert tick(c2, T0 + 31_000).outputs == []


def test_proactive_open_inside_and_outside_the_window() -> None:
    c = Convo(cfg("\n[csat]\nenabled = false\n"))
    assert console(c.act("open", text="We have news"))[0]["reason"] == "window_closed"  # never wrote to us
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + 500)
    c.act("close", at=T0 + 1000)
    out = c.act("open", at=T0 + 2 * HOUR, text="Your refund is done", agent="ana")
    assert types(out) == ["conversation_opened", "conversation_accepted", "agent_message"]
    assert console(out)[0]["opened_by"] == "agent"
    (req,) = [o["request"] for o in outbound(out) if o["origin"] == "agent"]
    assert req["messaging_type"] == "UPDATE" and "tag" not in req
    c.act("close", at=T0 + 3 * HOUR, agent="ana")
    tagged = [o["request"] for o in outbound(c.act("open", at=T0 + 3 * 24 * HOUR, text="Following up")) if o["origin"] == "agent"]
    assert tagged[0]["messaging_type"] == "MESSAGE_TAG" and tagged[0]["tag"] == "HUMAN_AGENT"
    c.act("close", at=T0 + 3 * 24 * HOUR + 1)
    assert console(c.act("open", at=T0 + 8 * 24 * HOUR, text="Hello?"))[0]["reason"] == "window_closed"


def test_pushing_the_idle_timer_later_writes_no_new_wheel_entry() -> None:
    c = Convo(cfg(SKILLS))
    assert c.msg("hi", at=T0).arms == [T0 + 30_000]  # waiting for an agent
    assert c.act("message", at=T0 + 1_000, text="Hi!", agent="ana").arms == []  # idle at T0+61 s: a wake-up is pending
    assert tick(c, T0 + 30_000).arms == [T0 + 61_000]  # the early wake-up: nothing due, the idle timer armed
    assert c.act("message", at=T0 + 40_000, text="Anything else?", agent="ana").arms == []  # pushed later: no entry
    out = tick(c, T0 + 61_000)  # not idle yet (since T0+40 s): re-armed for T0+100 s
    assert out.arms == [T0 + 100_000] and "conversation_closed" not in types(out)
    assert "conversation_closed" in types(tick(c, T0 + 100_000))


# --- words, whole values, start-up checks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (None, "shortly"),
        (45, "within 45 seconds"),
        (60, "within 1 minute"),
        (90, "within 90 seconds"),
        (5400, "within 90 minutes"),
        (7200, "within 2 hours"),
        (100_000, "within 28 hours"),
        (86_400, "within 1 day"),
        (3 * 86_400 + 1, "within 4 days"),
    ],
)
def test_response_time_in_words(seconds: int | None, words: str) -> None:
    assert DEFAULT_WORDS.duration(seconds) == words


def test_values_are_cut_at_whole_words_and_sentences_start_with_a_capital() -> None:
    assert clamp("Anna Maria Louisa Smith-Jones", 17) == "Anna Maria Louisa"
    assert clamp("Supercalifragilistic", 5) == "Super"
    long_nick = "Alexandra " * 10
    text = render("{agent_nickname} joined.", {"agent_nickname": long_nick})
    assert text.startswith("Alexandra") and len(text) <= PLACEHOLDER_MAX["agent_nickname"] + len(" joined.")
    assert render("{agent_nickname} joined.", {"agent_nickname": "an agent"}) == "An agent joined."
    assert render("Hello {agent_nickname}", {"agent_nickname": "an agent"}) == "Hello an agent"


def test_check_text_names_the_problem() -> None:
    check_text("x", "Fine {agent_nickname}", 640, 60)
    with pytest.raises(ValueError, match="x: the text is empty"):
        check_text("x", "  ", 640, 60)
    with pytest.raises(ValueError, match=r"x: up to 65 characters"):
        check_text("x", "Hi {agent_nickname}, " + "y" * 20, 64, 60)
    with pytest.raises(ValueError, match="malformed"):
        check_text("x", "Hi {0}", 640, 60)


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[limits]\nagent_text = 100\n', "auto_messages.welcome_first (default text): up to"),
        ('[limits]\nagent_text = 100\n[auto_messages.welcome_first]\nenabled = false\n'
         '[auto_messages.welcome_first_off_hours]\nenabled = false\n',
         "auto_messages.welcome_returning_off_hours (default text)"),
        ('[words.es]\nwithin = "en {n}"\n', "words.es.within"),
        ('[words.es]\nshortly = "' + "z" * 80 + '"\n', "a response time may render 80 characters"),
        ('[csat.question_by_locale]\nes = "¿Qué tal {agent_nickname}?"\n', "csat.question_by_locale.es: unknown placeholder"),
        ('[agents]\ndefault_nickname = ""\n', "agents.default_nickname"),
    ],
)
def test_start_up_checks_of_every_text(toml: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE_CONFIG + "\n" + toml)
    assert needle in str(err.value)


def test_the_example_config_and_every_default_fit_640() -> None:
    config = parse_config(BASE_CONFIG)
    assert config.limits.agent_text == 640
    assert set(DEFAULT_TEXTS) == set(Trigger.__args__)  # type: ignore[attr-defined]

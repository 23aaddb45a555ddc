"""CSAT pure logic: question choice, the survey message, answers, expiry (aggregation: test_csat_cells.py)."""

from __future__ import annotations

from typing import Any

import pytest

from streams.core.config import parse_config
from streams.rules import csat

CONFIG = parse_config(
    """
[account]
app_id = "1"

[[pages]]
page_id = "P1"
skill = "billing"
locale = "es_MX"

[[pages]]
page_id = "P2"
skill = "support"
locale = "fr_FR"

[skills.support]
auto_close_csat = true

[csat]
question = "How did we do?"
thank_you = "Gracias!"
[csat.question_by_locale]
es_ES = "¿Qué tal?"
de = "Wie war es?"
[csat.question_by_page]
"P9" = "Page nine question"
"""
)


# --- question -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("page_id", "locale", "expected"),
    [
        ("P9", "es_ES", "Page nine question"),  # page beats locale
        ("P1", "es_ES", "¿Qué tal?"),  # exact locale
        ("P1", "es-es", "¿Qué tal?"),  # spelled differently
        ("P1", "es_AR", "¿Qué tal?"),  # same language, other country
        ("P1", "de_AT", "Wie war es?"),  # language-only key
        ("P1", "en_US", "How did we do?"),  # default
        ("P1", None, "¿Qué tal?"),  # no locale: the page's (es_MX) → es
        ("P2", None, "How did we do?"),  # page locale fr_FR: no French question
        ("unknown", None, "How did we do?"),
    ],
)
def test_choose_question(page_id: str, locale: str | None, expected: str) -> None:
    assert csat.choose_question(CONFIG, page_id, locale) == expected


def test_should_survey() -> None:
    assert csat.should_survey(CONFIG, "agent", "billing")
    assert not csat.should_survey(CONFIG, "consumer", "billing")
    assert not csat.should_survey(CONFIG, "system", "billing")
    assert csat.should_survey(CONFIG, "system", "support")  # auto_close_csat
    off = CONFIG.model_copy(update={"csat": CONFIG.csat.model_copy(update={"enabled": False})})
    assert not csat.should_survey(off, "agent", "billing")


def test_survey_message_quick_replies() -> None:
    msg = csat.survey_message("P1:u1:1700000000000", "How did we do?")
    assert msg["text"] == "How did we do?"
    replies = msg["quick_replies"]
    assert [r["content_type"] for r in replies] == ["text"] * 5
    assert [r["payload"] for r in replies] == [f"CSAT:P1:u1:1700000000000:{s}" for s in range(1, 6)]
    assert all(1 <= len(r["title"]) <= 20 for r in replies)
    assert [r["title"][0] for r in replies] == ["1", "2", "3", "4", "5"]
    # every payload parses back to its conversation and score
    for s, r in enumerate(replies, start=1):
        assert csat.parse_payload(r["payload"]) == ("P1:u1:1700000000000", s)
        assert csat.parse_answer(r["title"], r["payload"], "P1:u1:1700000000000") == s
        assert csat.parse_answer(r["title"], None, "P1:u1:1700000000000") == s  # title typed/copied


def test_survey_message_refuses_too_long_payload() -> None:
    with pytest.raises(ValueError, match="too long"):
        csat.survey_message("c" * 1000, "q")


# --- answers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "payload", "pending", "expected"),
    [
        (None, "CSAT:c1:4", "c1", 4),
        ("4 ⭐⭐⭐⭐", "CSAT:c1:4", "c1", 4),
        ("4 ⭐⭐⭐⭐", "CSAT:c0:4", "c1", None),  # payload of an older survey
        (None, "CSAT:c1:4", None, None),  # nothing pending
        ("5", "MENU_BILLING", "c1", None),  # someone else's quick reply
        (None, "CSAT:c1:6", "c1", None),
        (None, "CSAT:c1:x", "c1", None),
        (None, "CSAT::3", "c1", None),
        ("5", None, "c1", 5),
        ("  3 \n", None, "c1", 3),
        ("5!", None, "c1", 5),
        ("4/5", None, "c1", 4),
        ("１", None, "c1", 1),  # full-width digit
        ("5\ufe0f\u20e3", None, "c1", 5),  # keycap emoji 5️⃣
        ("⭐⭐⭐⭐", None, "c1", 4),
        ("★★", None, "c1", 2),
        ("3 ⭐⭐", None, "c1", None),  # digit and stars disagree
        ("0", None, "c1", None),
        ("6", None, "c1", None),
        ("10", None, "c1", None),
        ("55", None, "c1", None),
        ("I give it a 5", None, "c1", None),
        ("5 stars, but slow", None, "c1", None),
        ("", None, "c1", None),
        (None, None, "c1", None),
        ("5", None, None, None),  # no survey pending: a plain message
    ],
)
def test_parse_answer(text: str | None, payload: str | None, pending: str | None, expected: int | None) -> None:
    assert csat.parse_answer(text, payload, pending) == expected


def test_payload_with_colons_in_conversation_id() -> None:
    assert csat.parse_payload("CSAT:a:b:c:2") == ("a:b:c", 2)
    assert csat.is_survey_payload("CSAT:a:b:c:2")
    assert not csat.is_survey_payload("CSAT_OTHER")


def test_survey_expired() -> None:
    assert not csat.survey_expired(1_000_000, 1_000_000 + 3_599_999, 3600)
    assert csat.survey_expired(1_000_000, 1_000_000 + 3_600_000, 3600)
    assert not csat.survey_expired(1_000_000, 1_000_000, 1)


def test_percent_and_rate() -> None:
    assert csat.csat_percent(3, 4) == 75.0
    assert csat.csat_percent(0, 0) is None
    assert csat.response_rate(1, 4) == 0.25
    assert csat.response_rate(0, 0) is None


def test_fact_builders_have_stable_ids() -> None:
    common: dict[str, Any] = {
        "conversation_id": "c1", "page_id": "P1", "psid": "u1", "skill": "billing", "agent_id": "a1",
        "locale": "en_US", "timestamp": 5,
    }
    s = csat.fact(**common)
    a = csat.fact(score=5, **common)
    assert (s.fact, s.fact_id, s.score) == ("survey_sent", "c1:survey", None)
    assert (a.fact, a.fact_id, a.score) == ("answer", "c1:answer", 5)
    assert csat.fact(score=5, **common) == a

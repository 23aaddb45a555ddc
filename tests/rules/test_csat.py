"""CSAT pure logic: question choice, the survey message, answers, expiry, and exact aggregation."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.contract import CsatFact
from streams.core.config import parse_config
from streams.rules import csat
from streams.rules.csat_cells import (
    apply_fact,
    cell_key,
    csat_report,
    merge_cells,
    skill_totals,
    split_cell,
    stats,
    window_start,
)

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


# --- aggregation -------------------------------------------------------------------------------------

H = 3600
T0 = 1_700_000_000_000  # epoch ms


def fact(kind: str, conv: str, skill: str = "billing", page: str = "P1", agent: str | None = "a1",
         score: int | None = None, ts: int = T0) -> CsatFact:
    return CsatFact(fact=kind, fact_id=f"{conv}:{'survey' if kind == 'survey_sent' else 'answer'}",  # type: ignore[arg-type]
                    conversation_id=conv, page_id=page, psid="u", skill=skill, agent_id=agent, score=score,
                    locale="en_US", timestamp=ts)


def fold(facts: list[tuple[int, CsatFact]], state: dict[str, Any] | None = None, **kw: Any) -> tuple[Any, list[str]]:
    skipped: list[str] = []
    for offset, f in facts:
        r = apply_fact(state, f, offset, H, **kw)
        if r.state is None:
            skipped.append(r.skipped or "?")
        else:
            state = r.state
    return state, skipped


def test_cells_and_windows() -> None:
    assert split_cell(cell_key("s", "p", None)) == ("s", "p", "-")
    assert split_cell(cell_key("s", "p", "agent|with|bars")) == ("s", "p", "agent|with|bars")
    assert window_start(T0, H) == (T0 // 1000) // H * H
    assert window_start(T0, H) % H == 0


def test_apply_counts_each_fact_once() -> None:
    facts = [
        (0, fact("survey_sent", "c1")),
        (1, fact("survey_sent", "c2")),
        (2, fact("answer", "c1", score=5)),
        (3, fact("answer", "c1", score=5)),  # re-emitted: same fact id, new offset
        (4, fact("survey_sent", "c3", skill="support", page="P2", agent=None)),
        (5, fact("answer", "c3", skill="support", page="P2", agent=None, score=2)),
    ]
    state, skipped = fold(facts)
    assert skipped == ["duplicate"]
    assert state["offset"] == 5
    totals = skill_totals([state])
    assert totals == {"billing": [2, 0, 0, 0, 0, 1], "support": [1, 0, 1, 0, 0, 0]}
    # redelivery of everything (offsets ≤ stored) changes nothing
    again, skipped = fold(facts, state)
    assert again == state
    assert skipped == ["redelivered"] * 6
    # the same facts re-emitted at new offsets: all duplicates
    again, skipped = fold([(10 + o, f) for o, f in facts], state)
    assert again == state
    assert skipped == ["duplicate"] * 6


def test_apply_is_pure() -> None:
    state, _ = fold([(0, fact("survey_sent", "c1"))])
    snapshot = repr(state)
    r = apply_fact(state, fact("answer", "c1", score=4), 1, H)
    assert repr(state) == snapshot
    assert r.state is not None and r.state is not state


def test_windows_are_epoch_aligned_bounded_and_reset_on_resize() -> None:
    facts = [(i, fact("survey_sent", f"c{i}", ts=T0 + i * H * 1000)) for i in range(5)]
    state, _ = fold(facts, max_windows=3)
    starts = sorted(int(s) for s in state["windows"])
    assert len(starts) == 3
    assert starts == [window_start(T0, H) + k * H for k in (2, 3, 4)]
    assert state["totals"][cell_key("billing", "P1", "a1")][0] == 5  # totals keep everything
    # a late fact for a pruned window counts in the totals only
    state2, _ = fold([(9, fact("survey_sent", "late", ts=T0))], state, max_windows=3)
    assert state2["windows"] == state["windows"]
    assert state2["totals"][cell_key("billing", "P1", "a1")][0] == 6
    # another window size: windows start over, totals stay
    r = apply_fact(state2, fact("survey_sent", "c99", ts=T0), 10, 60)
    assert r.state is not None
    assert list(r.state["windows"]) == [str(window_start(T0, 60))]
    assert r.state["totals"][cell_key("billing", "P1", "a1")][0] == 7


def test_fact_ids_pruned_by_age_and_too_old_facts_skipped() -> None:
    day = 86_400_000
    state, _ = fold([(0, fact("survey_sent", "old", ts=T0)), (1, fact("survey_sent", "new", ts=T0 + 3 * day))],
                    horizon_ms=2 * day)
    assert set(state["facts"]) == {"new:survey"}
    _, skipped = fold([(2, fact("survey_sent", "old", ts=T0))], state, horizon_ms=2 * day)
    assert skipped == ["expired"]  # cannot be checked any more: never counted twice


def test_stats_and_report() -> None:
    assert stats([4, 1, 0, 1, 0, 2]) == {
        "surveys_sent": 4, "answers": 4, "positive": 2, "scores": {"1": 1, "2": 0, "3": 1, "4": 0, "5": 2},
        "csat_percent": 50.0, "response_rate": 1.0,
    }
    assert stats([0] * 6)["csat_percent"] is None
    p0, _ = fold([(0, fact("survey_sent", "c1")), (1, fact("answer", "c1", score=5)),
                  (2, fact("survey_sent", "c2", agent="a2", ts=T0 + H * 1000))])
    p1, _ = fold([(0, fact("survey_sent", "c3", skill="support", page="P2")),
                  (1, fact("answer", "c3", skill="support", page="P2", score=3))])
    report = csat_report([p0, p1], window_seconds=H, partitions=[0, 1], total_partitions=2)
    assert report["complete"] is True
    assert report["totals"]["all"]["surveys_sent"] == 3
    assert report["totals"]["all"]["answers"] == 2
    assert report["totals"]["all"]["csat_percent"] == 50.0
    assert report["totals"]["skill"]["billing"]["csat_percent"] == 100.0
    assert report["totals"]["skill"]["billing"]["response_rate"] == 0.5
    assert report["totals"]["agent"]["a1"]["surveys_sent"] == 2
    assert report["totals"]["page"]["P2"]["scores"]["3"] == 1
    assert [w["start"] for w in report["windows"]] == [window_start(T0, H) + H, window_start(T0, H)]
    assert report["windows"][1]["all"]["answers"] == 2
    latest = csat_report([p0, p1], window_seconds=H, partitions=[1], total_partitions=2, window="latest")
    assert latest["complete"] is False
    assert [w["start"] for w in latest["windows"]] == [window_start(T0, H) + H]
    filtered = csat_report([p0, p1], window_seconds=H, partitions=[0, 1], total_partitions=2, skill="support")
    assert list(filtered["totals"]["skill"]) == ["support"]
    assert filtered["totals"]["all"]["answers"] == 1
    one = csat_report([p0, p1], window_seconds=H, partitions=[0, 1], total_partitions=2,
                      window=str(window_start(T0, H)), agent="a1")
    assert one["windows"][0]["all"] == stats([2, 0, 0, 1, 0, 1])  # both skills' a1 facts in that hour
    both = csat_report([p0, p1], window_seconds=H, partitions=[0, 1], total_partitions=2, agent="a1", skill="billing")
    assert both["totals"]["all"] == stats([1, 0, 0, 0, 0, 1])
    assert list(both["totals"]["page"]) == ["P1"]
    with pytest.raises(ValueError, match="multiple"):
        csat_report([p0], window_seconds=H, partitions=[0], total_partitions=1, window="17")
    assert merge_cells([{"x": [1, 2, 3, 4, 5, 6]}, {"x": [1, 1, 1, 1, 1, 1]}]) == {"x": [2, 3, 4, 5, 6, 7]}

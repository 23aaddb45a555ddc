"""CSAT survey logic, pure (no I/O): which question, the survey message, is this an answer, expiry.

The conversation rules call these on a close (`should_survey`, `choose_question`,
`survey_message`, `fact`) and on the consumer's next message while a survey is pending
(`parse_answer`, `survey_expired`, `fact`); see `streams/rules/conversation/csat_hooks.py`. The
CSAT stage (`streams/stages/csat.py`) counts the `CsatFact`s they emit, keyed by skill.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal

from schemas.contract import CsatFact
from streams.core.config import ConnectorConfig

SCORES = (1, 2, 3, 4, 5)
POSITIVE_SCORES = frozenset({4, 5})
PAYLOAD_PREFIX = "CSAT:"
QUICK_REPLY_TITLE_MAX = 20  # Meta's limit on a quick reply title
QUICK_REPLY_PAYLOAD_MAX = 1000  # Meta's limit on a quick reply payload
STAR = "\u2b50"  # ⭐

# What a typed answer may look like once normalized: "4", " 4 ", "4!", "4/5", "4 ⭐⭐⭐⭐", "⭐⭐⭐".
_DIGIT_ANSWER = re.compile(r"^([1-5])\s*(?:/\s*5)?\s*[!.]*\s*(?:[\u2b50\u2605]{1,5})?\s*[!.]*$")
_STARS_ANSWER = re.compile(r"^([\u2b50\u2605]{1,5})\s*[!.]*$")
# Emoji presentation selectors, keycap combiner and zero-width joiners/spaces carry no meaning here.
_INVISIBLE = dict.fromkeys(map(ord, "\ufe0e\ufe0f\u20e3\u200b\u200c\u200d\u2060"), None)


def should_survey(config: ConnectorConfig, closed_by: Literal["agent", "consumer", "system"], skill: str) -> bool:
    """Does this close trigger a survey? Agent closes always (when CSAT is enabled), consumer closes
    with `csat.on_consumer_close`, system (idle) closes only with the skill's `auto_close_csat`."""
    if not config.csat.enabled:
        return False
    if closed_by == "agent":
        return True
    if closed_by == "consumer":
        return config.csat.on_consumer_close
    return config.skill(skill).auto_close_csat


def _norm_locale(locale: str) -> str:
    return locale.strip().replace("-", "_").lower()


def choose_question(config: ConnectorConfig, page_id: str, locale: str | None) -> str:
    """The survey question: `csat.question_by_page`, else `csat.question_by_locale` (exact locale,
    then the same language, e.g. `es_ES` → `es` or `es_MX`), else `csat.question`.

    Without a locale the page's configured locale is used."""
    csat = config.csat
    if page_id in csat.question_by_page:
        return csat.question_by_page[page_id]
    if locale is None:
        page = config.page(page_id)
        locale = page.locale if page else None
    if locale and csat.question_by_locale:
        wanted = _norm_locale(locale)
        by_locale = {_norm_locale(k): v for k, v in sorted(csat.question_by_locale.items())}
        if wanted in by_locale:
            return by_locale[wanted]
        language = wanted.split("_", 1)[0]
        if language in by_locale:
            return by_locale[language]
        for key, question in by_locale.items():
            if key.split("_", 1)[0] == language:
                return question
    return csat.question


def answer_payload(conversation_id: str, score: int) -> str:
    """The quick-reply payload of one score: `CSAT:<conversation_id>:<score>`."""
    return f"{PAYLOAD_PREFIX}{conversation_id}:{score}"


def quick_reply_title(score: int) -> str:
    """The button title of one score: the digit and as many stars (locale-neutral, ≤ 20 chars)."""
    return f"{score} {STAR * score}"


def survey_message(conversation_id: str, question: str) -> dict[str, Any]:
    """The Send API `message` of a survey: the question and quick replies 1–5 whose payloads name
    the conversation, so an answer to an older survey is never counted for a newer one.

    Raises ValueError if the conversation id is too long for Meta's 1000-character payload."""
    longest = answer_payload(conversation_id, 5)
    if len(longest) > QUICK_REPLY_PAYLOAD_MAX:
        raise ValueError(f"conversation id too long for a quick reply payload ({len(longest)} chars)")
    return {
        "text": question,
        "quick_replies": [
            {"content_type": "text", "title": quick_reply_title(s), "payload": answer_payload(conversation_id, s)}
            for s in SCORES
        ],
    }


def parse_payload(payload: str) -> tuple[str, int] | None:
    """(conversation id, score) of one of our payloads, or None if it is not ours."""
    if not payload.startswith(PAYLOAD_PREFIX):
        return None
    conversation_id, sep, score = payload[len(PAYLOAD_PREFIX) :].rpartition(":")
    if not sep or not conversation_id or score not in {"1", "2", "3", "4", "5"}:
        return None
    return conversation_id, int(score)


def is_survey_payload(payload: str) -> bool:
    """Is this quick-reply payload one of our survey answers (for any conversation)?"""
    return parse_payload(payload) is not None


def parse_typed_answer(text: str) -> int | None:
    """A score typed as text: `5`, ` 5 `, `5!`, `5/5`, `５`, `5️⃣`, `⭐⭐⭐⭐`; anything else → None."""
    norm = unicodedata.normalize("NFKC", text).translate(_INVISIBLE).strip()
    if m := _DIGIT_ANSWER.match(norm):
        score = int(m.group(1))
        stars = sum(1 for c in norm if c in (STAR, "\u2605"))
        return score if stars in (0, score) else None
    if m := _STARS_ANSWER.match(norm):
        return len(m.group(1))
    return None


def parse_answer(text: str | None, quick_reply_payload: str | None, pending_conversation_id: str | None) -> int | None:
    """The score (1–5) if this consumer message answers the pending survey, else None.

    - No pending survey → None.
    - A quick-reply payload of ours counts only for the pending conversation; a payload for
      another conversation (an old survey) → None.
    - Any other quick-reply payload (another menu) → None: its title is not a typed answer.
    - Otherwise a typed score (see `parse_typed_answer`).
    """
    if pending_conversation_id is None:
        return None
    if quick_reply_payload:
        parsed = parse_payload(quick_reply_payload)
        if parsed is None:
            return None
        conversation_id, score = parsed
        return score if conversation_id == pending_conversation_id else None
    if not text:
        return None
    return parse_typed_answer(text)


def survey_expired(sent_at_ms: int, now_ms: int, expire_after_seconds: int) -> bool:
    """Has a survey sent at `sent_at_ms` expired by `now_ms` (answers after this are not counted)?"""
    return now_ms - sent_at_ms >= expire_after_seconds * 1000


def csat_percent(positive: int, answers: int) -> float | None:
    """CSAT %: answers scoring 4 or 5 over all answers, 0–100; None without answers."""
    return 100.0 * positive / answers if answers else None


def response_rate(answers: int, surveys: int) -> float | None:
    """Answers over surveys sent, 0–1; None without surveys."""
    return answers / surveys if surveys else None


def survey_fact_id(conversation_id: str) -> str:
    """The stable fact id of a conversation's survey."""
    return f"{conversation_id}:survey"


def answer_fact_id(conversation_id: str) -> str:
    """The stable fact id of a conversation's counted answer."""
    return f"{conversation_id}:answer"


def fact(
    *,
    conversation_id: str,
    page_id: str,
    psid: str,
    skill: str,
    agent_id: str | None,
    locale: str,
    timestamp: int,
    score: int | None = None,
) -> CsatFact:
    """The fact for `csat.facts` (key: the skill, so every fact of a skill meets on one partition):
    `survey_sent` without a score, `answer` with one."""
    return CsatFact(
        fact="survey_sent" if score is None else "answer",
        fact_id=survey_fact_id(conversation_id) if score is None else answer_fact_id(conversation_id),
        conversation_id=conversation_id,
        page_id=page_id,
        psid=psid,
        skill=skill,
        agent_id=agent_id,
        score=score,
        locale=locale,
        timestamp=timestamp,
    )

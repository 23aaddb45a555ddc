"""CSAT inside a conversation: the survey on close, and what a consumer line does to a pending one.

The survey belongs to the conversation it was sent for: only its own quick-reply payload, or a
score typed as the consumer's very next message within `csat.expire_after_seconds`, counts.
Anything else ends it: a message that is not an answer, a new conversation (consumer message,
"Get Started" postback, proactive `open`). A tap on an older survey counts nothing and opens
nothing. Facts go to `csat.facts` keyed by skill; `csat_received` is the CSAT stage's to emit.
"""

from __future__ import annotations

from typing import Any, Literal

from streams.core.automessages import render
from streams.rules import csat
from streams.rules.conversation.api import Output
from streams.rules.conversation.context import Ctx
from streams.rules.conversation.state import Conv, Survey
from streams.rules.conversation.system import say
from streams.rules.conversation.windows import in_response_window


def surveyed_agent(conv: Conv) -> str | None:
    """Whom the survey rates: the owner if they wrote, else the last agent who wrote, else the owner."""
    owner = conv["owner"]
    if owner and owner["id"] in conv["agents"]:
        return owner["id"]
    if conv["agents"]:
        return conv["agents"][-1]
    return owner["id"] if owner else None


def survey_on_close(ctx: Ctx, conv: Conv, summary: dict[str, Any],
                    closed_by: Literal["agent", "consumer", "system"]) -> None:
    """Send the survey after a close when CSAT asks for one and Meta's 24 h window is open."""
    if not csat.should_survey(ctx.config, closed_by, conv["skill"]):
        return
    if not in_response_window(ctx.st["consumer_at"], ctx.now, ctx.config.messaging):
        ctx.note("csat", "window_closed")
        return
    page = ctx.env.page
    question = render(csat.choose_question(ctx.config, ctx.page_id, conv["locale"]), {
        "skill": conv["skill"], "page_id": ctx.page_id, "locale": conv["locale"],
        "page_name": page.name if page and page.name else ctx.config.words_for(conv["locale"]).page,
    })
    message = csat.survey_message(conv["id"], question)
    ctx.outbound("csat", {"recipient": {"id": ctx.psid}, "messaging_type": "RESPONSE", "message": message},
                 None, question)
    ctx.console("csat_requested", question=question, locale=conv["locale"])
    survey: Survey = {"conversation_id": conv["id"], "sent_at": ctx.now, "skill": conv["skill"],
                      "agent_id": surveyed_agent(conv), "locale": conv["locale"], "summary": summary}
    ctx.st["survey"] = survey
    ctx.outputs.append(Output("csat_facts", survey["skill"], _fact(ctx, survey, None)))
    ctx.note("csat_survey", survey["skill"])


def end_survey(ctx: Ctx, why: str) -> None:
    """The pending survey, if any, is over (not answered)."""
    if ctx.st["survey"] is not None:
        ctx.st["survey"] = None
        ctx.note("csat", why)


def on_consumer_line(ctx: Ctx, text: str | None, payload: str | None) -> bool:
    """Apply a consumer message or postback to the pending survey; True when it was consumed here
    (an answer, or a tap on a survey that is not pending: nothing else happens)."""
    survey = ctx.st["survey"]
    if survey is not None:
        if csat.survey_expired(survey["sent_at"], ctx.now, ctx.config.csat.expire_after_seconds):
            end_survey(ctx, "expired")
        else:
            score = csat.parse_answer(text, payload, survey["conversation_id"])
            if score is not None:
                _answer(ctx, survey, score)
                return True
            end_survey(ctx, "not_answered")
    if payload and csat.parse_payload(payload) is not None:
        ctx.note("csat", "late_or_repeated")
        return True
    return False


def _fact(ctx: Ctx, survey: Survey, score: int | None) -> dict[str, Any]:
    return csat.fact(conversation_id=survey["conversation_id"], page_id=ctx.page_id, psid=ctx.psid or "",
                     skill=survey["skill"], agent_id=survey["agent_id"], locale=survey["locale"],
                     timestamp=ctx.now, score=score).model_dump()


def _answer(ctx: Ctx, survey: Survey, score: int) -> None:
    ctx.st["survey"] = None
    cid = survey["conversation_id"]
    response = {"conversation_id": cid, "page_id": ctx.page_id, "psid": ctx.psid, "skill": survey["skill"],
                "agent_id": survey["agent_id"], "score": score, "locale": survey["locale"], "timestamp": ctx.now}
    ctx.outputs.append(Output("csat_responses", cid, response))
    ctx.outputs.append(Output("csat_facts", survey["skill"], _fact(ctx, survey, score)))
    ctx.outputs.append(Output("history", cid, {**survey["summary"], "csat_score": score}))
    say(ctx, "csat_thanks", skill=survey["skill"], locale=survey["locale"], conversation_id=cid)
    ctx.note("csat_answer", f"{survey['skill']}:{score}")

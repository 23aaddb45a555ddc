"""Automatic messages in a conversation: which text, its words, and whether it reaches the consumer.

The template comes from `streams.core.automessages` (skill, page, locale overrides). Every value is
whole words: a nickname falls back to the configured one, then `agents.default_nickname`; the
response time is said in words of the conversation's locale ("within 2 hours", else "shortly").
A text that promises a response time is suppressed once that time is overdue (LivePerson's rule).
The message goes to the consumer only inside Meta's 24 h window (never with a tag: it is not a
human reply); the console always sees it. It changes neither the turn nor the timers.
"""

from __future__ import annotations

from streams.core import automessages
from streams.core.config import Skill
from streams.rules.conversation import rich, thread, turns
from streams.rules.conversation.context import CURRENT, Ctx
from streams.rules.conversation.state import Conv
from streams.rules.conversation.windows import in_response_window

# Triggers that answer an explicit change of the response time: never suppressed as overdue.
_FRESH_TTR = frozenset({"response_time_updated", "marked_urgent", "unmarked_urgent"})


def expected_seconds(conv: Conv | None, skill: Skill) -> int | None:
    """The response time to promise: set by an agent, else the skill's urgent one for an urgent
    conversation, else the skill's `expected_response_seconds`; None when unknown."""
    if conv is not None:
        if conv["response_seconds"]:
            return conv["response_seconds"]
        if conv["urgent"] and skill.urgent_response_seconds:
            return skill.urgent_response_seconds
    return skill.expected_response_seconds


def response_overdue(conv: Conv | None, skill: Skill, now: int) -> bool:
    """Has the consumer waited longer than the promised response time in this turn?"""
    seconds = expected_seconds(conv, skill)
    return bool(conv and seconds and conv["turn"] == "agent" and now - conv["turn_at"] > seconds * 1000)


def say(ctx: Ctx, trigger: str, *, skill: str | None = None, locale: str | None = None,
        nickname: str | None = None, agent_id: str | None = None, conversation_id: str | None = CURRENT) -> bool:
    """Send an automatic message (see the module doc); False when switched off or suppressed."""
    conv = ctx.st["conv"]
    skill = skill or (conv["skill"] if conv else ctx.route()[0])
    locale = locale or ctx.locale
    default = ctx.config.csat.thank_you if trigger == "csat_thanks" else None
    template = automessages.resolve_template(ctx.config.auto_messages, trigger, locale=locale, page_id=ctx.page_id,
                                             skill=skill, default=default)
    if template is None:
        return False
    skill_cfg = ctx.config.skill(skill)
    if (automessages.uses_response_time(template) and trigger not in _FRESH_TTR
            and response_overdue(conv, skill_cfg, ctx.now)):
        ctx.note("auto_message_suppressed", trigger)
        return False
    owner = conv["owner"] if conv else None
    if nickname is None:
        nickname = ctx.config.nickname(owner["id"] if owner else None, owner["nickname"] if owner else None, locale)
    words = ctx.config.words_for(locale)
    page = ctx.env.page
    text = automessages.render(template, {
        "agent_nickname": nickname,
        "agent_id": agent_id or (owner["id"] if owner else nickname),
        "skill": skill,
        "page_name": (page.name if page and page.name else words.page),
        "page_id": ctx.page_id,
        "locale": locale,
        "expected_response_time": words.duration(expected_seconds(conv, skill_cfg)),
        "consumer_first_name": rich.first_name(ctx),
    })
    sent = in_response_window(ctx.st["consumer_at"], ctx.now, ctx.config.messaging) and thread.may_send(ctx)
    outbox_id = None
    if sent:
        outbox_id = ctx.outbound("system", {"recipient": {"id": ctx.psid}, "messaging_type": "RESPONSE",
                                            "message": {"text": text}}, None, text)
    ctx.console("system_message", skill, conversation_id=conversation_id, trigger=trigger, text=text, locale=locale,
                sent=sent, outbox_id=outbox_id)
    if conv is not None and conversation_id is CURRENT:
        ctx.st["conv"] = turns.system_line(conv)
    return True

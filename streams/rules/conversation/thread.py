"""Who owns the Messenger thread (Conversation Routing), as part of the conversation's state.

The owner is learned from the data: a hand-over event names it; an event on the `standby` channel
means another app owns the thread; a consumer line on the `messaging` channel means we do; the
dispatcher's results of our own thread-control calls confirm a take, a pass or a release. `None`
means unknown or idle: we may send (as before #15). Thread-control calls travel on
`messenger.outbound` like messages, with `endpoint` naming the Graph edge and `request` its body.

The thread goes back to the page's bot when a conversation closes, after its CSAT survey is
answered or has expired (so the bot does not swallow the answer); without a survey at once. With no
bot for the page it is released to idle (`bots.release_without_bot`) or left alone.

This module sits below `lifecycle` and `csat_hooks` (they call its hooks); `bots` is above them.
"""

from __future__ import annotations

from typing import Any

import orjson

from streams.core.config_bots import METADATA_MAX
from streams.rules.conversation.api import Output
from streams.rules.conversation.context import Ctx
from streams.rules.conversation.state import State
from streams.rules.conversation.state_bots import Handback, Thread, new_thread

THREAD_ENDPOINTS = ("pass_thread_control", "take_thread_control", "request_thread_control",
                    "release_thread_control")
UNKNOWN_APP = "unknown"  # another app owns the thread (seen on standby) and we do not know which


def thread_of(st: State, now: int = 0) -> Thread:
    """The key's thread part (a fresh one when the state has none)."""
    return st.get("thread") or new_thread(now)


def owner(st: State) -> str | None:
    """The app that owns the thread; None: unknown or idle."""
    thread = st.get("thread")
    return thread["owner"] if thread else None


def others_own(ctx: Ctx) -> bool:
    """Does another app own the thread now (our sends would be refused or steal it)?"""
    current = owner(ctx.st)
    return current is not None and current != ctx.config.account.app_id


def may_send(ctx: Ctx) -> bool:
    """May the connector send to the person on its own (automatic messages, surveys)?"""
    return not others_own(ctx)


def set_owner(ctx: Ctx, app_id: str | None) -> str | None:
    """Record a new owner; returns the previous one."""
    thread = thread_of(ctx.st, ctx.now)
    before = thread["owner"]
    if before != app_id:
        ctx.st["thread"] = {**thread, "owner": app_id, "at": ctx.now, "requested_at": None}
    return before


def bot_of(ctx: Ctx) -> str | None:
    """The bot of this conversation's page (`[bots]`), if any."""
    return ctx.config.bots.app_for(ctx.page_id)


def control(ctx: Ctx, endpoint: str, *, origin: str = "system", agent_id: str | None = None,
            target_app_id: str | None = None, metadata: str | None = None) -> str:
    """A thread-control call on `messenger.outbound` (`endpoint` + its Graph body as `request`)."""
    conv = ctx.st["conv"]
    outbox_id = ctx.next_id("ob")
    request: dict[str, Any] = {"recipient": {"id": ctx.psid}}
    if target_app_id is not None:
        request["target_app_id"] = target_app_id
    if metadata:
        request["metadata"] = metadata[:METADATA_MAX]
    value = {
        "page_id": ctx.page_id,
        "psid": ctx.psid,
        "outbox_id": outbox_id,
        "conversation_id": conv["id"] if conv else None,
        "origin": origin,
        "endpoint": endpoint,
        "request": request,
        "skill": conv["skill"] if conv else None,
        "agent_id": agent_id,
        "created_at": ctx.now,
    }
    ctx.outputs.append(Output("outbound", ctx.key, value))
    ctx.note("outbound", origin)
    ctx.note("thread_control", endpoint)
    return outbox_id


def handback_metadata(conversation_id: str, closed_by: str, reason: str) -> str:
    """What the bot is told when the thread comes back: JSON, at most 1,000 characters."""
    doc = {"conversation_id": conversation_id, "closed_by": closed_by, "close_reason": reason[:200]}
    return orjson.dumps(doc).decode()


def hand_back(ctx: Ctx, conversation_id: str, closed_by: str, reason: str, skill: str | None = None) -> None:
    """Give the thread back: to the page's bot, else release it to idle or leave it (by setting).
    Nothing when another app owns it already."""
    thread = thread_of(ctx.st, ctx.now)
    if thread["handback"] is not None:
        ctx.st["thread"] = thread = {**thread, "handback": None}
    if others_own(ctx):
        return
    bot = bot_of(ctx)
    if bot is not None:
        control(ctx, "pass_thread_control", target_app_id=bot,
                metadata=handback_metadata(conversation_id, closed_by, reason))
        set_owner(ctx, bot)
        ctx.console("thread_control", skill, change="passed", to_app_id=bot, from_app_id=ctx.config.account.app_id,
                    conversation_id=conversation_id, page_inbox=False, metadata=None)
        ctx.note("handoff", "to_bot")
    elif ctx.config.bots.release_without_bot:
        control(ctx, "release_thread_control")
        set_owner(ctx, None)
        ctx.note("handoff", "released")


def on_close(ctx: Ctx, conversation_id: str, skill: str, closed_by: str, reason: str,
             survey_until: int | None) -> None:
    """A conversation closed: the thread goes back now, or when its survey is over (`survey_until`)."""
    if survey_until is None:
        hand_back(ctx, conversation_id, closed_by, reason, skill)
        return
    if others_own(ctx) or (bot_of(ctx) is None and not ctx.config.bots.release_without_bot):
        return
    handback: Handback = {"conversation_id": conversation_id, "skill": skill, "closed_by": closed_by,
                          "reason": reason, "until": survey_until}
    ctx.st["thread"] = {**thread_of(ctx.st, ctx.now), "handback": handback}


def survey_answered(ctx: Ctx) -> None:
    """The survey was answered: a pending hand-back goes now."""
    handback = pending_handback(ctx.st)
    if handback is not None:
        hand_back(ctx, handback["conversation_id"], handback["closed_by"], handback["reason"], handback["skill"])


def cancel_handback(ctx: Ctx) -> None:
    """The consumer wrote again (the survey ended unanswered, a new conversation opens): we keep the thread."""
    thread = ctx.st.get("thread")
    if thread is not None and thread["handback"] is not None:
        ctx.st["thread"] = {**thread, "handback": None}
        ctx.note("handoff", "kept")


def pending_handback(st: State) -> Handback | None:
    thread = st.get("thread")
    return thread["handback"] if thread else None


def on_timer(ctx: Ctx) -> None:
    """The survey expired unanswered: it ends, and the thread goes back."""
    handback = pending_handback(ctx.st)
    if handback is None or handback["until"] > ctx.now:
        return
    survey = ctx.st["survey"]
    if survey is not None and survey["conversation_id"] == handback["conversation_id"]:
        ctx.st["survey"] = None
        ctx.note("csat", "expired")
    hand_back(ctx, handback["conversation_id"], handback["closed_by"], handback["reason"], handback["skill"])


def on_result(ctx: Ctx, res: dict[str, Any]) -> None:
    """A result of our own thread-control call: a take that went through makes the thread ours; a
    failed pass or release leaves it ours; a failed take leaves it with the other app."""
    endpoint = res.get("endpoint")
    if endpoint not in THREAD_ENDPOINTS:
        return
    ours = ctx.config.account.app_id
    sent = res.get("status") == "sent"
    if endpoint == "take_thread_control":
        if sent:
            set_owner(ctx, ours)
        elif owner(ctx.st) == ours:
            set_owner(ctx, UNKNOWN_APP)
    elif endpoint in ("pass_thread_control", "release_thread_control") and not sent:
        set_owner(ctx, ours)
    if not sent:
        ctx.console("thread_control", change="failed", endpoint=endpoint, outbox_id=res.get("outbox_id"),
                    code=res.get("code"), message=res.get("message"), page_inbox=False)
        ctx.note("thread_control_failed", str(endpoint))


def wakes(st: State) -> list[int]:
    """When this part needs the stage: a pending hand-back's deadline."""
    handback = pending_handback(st)
    return [handback["until"]] if handback is not None else []


def compact(st: State, kept: State, now: int, transcript_ms: int) -> list[int]:
    """Keep what is still useful at compaction: the owner, a pending hand-back, transcript lines not
    older than the transcript window; returns when the kept part expires."""
    thread = st.get("thread")
    if thread is None:
        return []
    lines = [line for line in thread["lines"] if line[1] + transcript_ms > now]
    handback = thread["handback"]
    if thread["owner"] is None and not lines and handback is None:
        return []
    kept["thread"] = {**thread, "lines": lines}
    ends = [line[1] + transcript_ms for line in lines[:1]]
    if handback is not None:
        ends.append(handback["until"])
    return ends

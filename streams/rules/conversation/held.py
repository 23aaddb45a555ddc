"""Actions held for a conversation not open yet (#12).

After a restart an agent's action can be consumed before the input that opened its conversation
is replayed. Such an action is held (at most `HELD_MAX` actions, `HELD_BYTES` together, for
`agents.hold_unknown_seconds`): when a conversation opens it is applied if it was taken at or after
the opening, else rejected `unknown_conversation`; when its hold expires it is rejected too. An
action naming the conversation closed last is rejected at once, never held.
"""

from __future__ import annotations

from typing import Any

import orjson

from schemas.contract import AgentAction
from streams.rules.conversation.context import Ctx
from streams.rules.conversation.state import HELD_BYTES, HELD_MAX, Conv, Held

HOLDABLE = frozenset(
    {"accept", "message", "close", "transfer", "return_to_queue", "set_response_time", "join", "leave"}
)


def hold(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    """Keep an action for a conversation not open yet, or reject it when it cannot wait."""
    st = ctx.st
    if action.conversation_id and action.conversation_id == st["last_closed"]:
        ctx.reject(raw, "unknown_conversation", "the conversation is closed")
        return
    size = len(orjson.dumps(raw))
    used = sum(len(orjson.dumps(h["action"])) for h in st["held"])
    if len(st["held"]) >= HELD_MAX or used + size > HELD_BYTES:
        ctx.reject(raw, "unknown_conversation", "no open conversation for this page and person")
        return
    until = ctx.now + ctx.config.agents.hold_unknown_seconds * 1000
    st["held"] = [*st["held"], {"id": ctx.inp.id, "at": ctx.now, "until": until, "action": raw}]
    ctx.note("held", action.type)


def releasable(held: list[Held], conv: Conv) -> tuple[list[Held], list[Held]]:
    """(to apply, to reject) when `conv` opens: an action taken before the opening was meant for an
    earlier conversation; one naming another conversation id is not for this one either."""
    apply: list[Held] = []
    reject: list[Held] = []
    for h in held:
        named = h["action"].get("conversation_id")
        ok = h["at"] >= conv["opened_at"] and (not named or named == conv["id"])
        (apply if ok else reject).append(h)
    return apply, reject


def expire_held(ctx: Ctx) -> None:
    """Reject the held actions whose hold is over (a `timer` input)."""
    expired = [h for h in ctx.st["held"] if h["until"] <= ctx.now]
    if not expired:
        return
    ctx.st["held"] = [h for h in ctx.st["held"] if h["until"] > ctx.now]
    for h in expired:
        with ctx.acting_as(h["id"] + "|expired", h["until"]):
            ctx.reject(h["action"], "unknown_conversation",
                       f"no conversation opened within {ctx.config.agents.hold_unknown_seconds} s")

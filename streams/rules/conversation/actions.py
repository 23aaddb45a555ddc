"""Agent actions: validation, ownership, held actions, and what each action does.

Ownership (`ownership`, pure): only the assigned agent may act on a conversation; a `"role":
"manager"` may act on any. With the skill's `auto_accept` the first agent who acts on an
unassigned conversation takes it; without it acting before `accept` is rejected `not_assigned`.

An action for a conversation not open yet is held (`held`) and applied when one opens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import ValidationError

from schemas.contract import AgentAction
from streams.core.automessages import clamp
from streams.rules.conversation import bots, held, lifecycle, rich, routing, thread, turns
from streams.rules.conversation.context import Ctx, remember
from streams.rules.conversation.state import Agent, Conv
from streams.rules.conversation.system import say
from streams.rules.conversation.windows import in_response_window, send_mode
from streams.rules.messages import Part

Verdict = Literal["owner", "manager", "take", "not_owner", "not_assigned"]
NICKNAME_MAX = 40


def ownership(conv: Conv, agent_id: str, role: str, auto_accept: bool) -> Verdict:
    """May `agent_id` act on `conv`: as its owner, as a manager, by taking it (auto-accept), or not."""
    owner = conv["owner"]
    if owner is not None and owner["id"] == agent_id:
        return "owner"
    if role == "manager":
        return "manager"
    if owner is not None:
        return "not_owner"
    return "take" if auto_accept else "not_assigned"


def agent_of(action: AgentAction) -> Agent:
    """The acting agent as the conversation stores them (nickname cut to whole words)."""
    nick = action.agent_nickname.strip() if action.agent_nickname else None
    return {"id": action.agent_id, "nickname": clamp(nick, NICKNAME_MAX) if nick else None}


def on_action(ctx: Ctx, raw: dict[str, Any]) -> bool:
    """Apply one agent action; True when it erases the key's state (`forget`)."""
    try:
        action = AgentAction.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        ctx.reject(raw, "invalid_action", f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}")
        return False
    if f"{action.page_id}:{action.psid}" != ctx.key:
        ctx.reject(raw, "invalid_action", "record key must be '<page_id>:<psid>' of the action")
        return False
    if not remember(ctx, "action:" + action.action_id):
        ctx.note("duplicate", "action")
        return False
    if action.type == "forget":
        if action.role != "admin":
            ctx.reject(raw, "invalid_action", "forget needs \"role\": \"admin\"")
            return False
        return True
    conv = ctx.st["conv"]
    if conv is None and action.type in held.HOLDABLE:
        held.hold(ctx, action, raw)
        return False
    apply(ctx, action, raw)
    return False


def apply(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    """Apply a validated action (first time, or released from hold)."""
    conv = ctx.st["conv"]
    if conv is None and action.type in held.HOLDABLE:
        # released from hold after an earlier released action (a close) ended the conversation
        ctx.reject(raw, "unknown_conversation", "no open conversation for this page and person")
        return
    if conv is not None and action.conversation_id and action.conversation_id != conv["id"]:
        ctx.reject(raw, "unknown_conversation", f"conversation {action.conversation_id} is not the open one")
        return
    _HANDLERS[action.type](ctx, action, raw)


def release_held(ctx: Ctx) -> None:
    """A conversation opened: apply the held actions taken at or after its opening, reject the rest."""
    conv = ctx.st["conv"]
    if not ctx.st["held"] or conv is None:
        return
    apply_now, too_early = held.releasable(ctx.st["held"], conv)
    ctx.st["held"] = []
    for h in too_early:
        with ctx.acting_as(h["id"], h["at"]):
            ctx.reject(h["action"], "unknown_conversation", "no conversation was open when the action was taken")
    for h in apply_now:
        with ctx.acting_as(h["id"], h["at"]):
            action = AgentAction.model_validate(h["action"])
            ctx.note("released", action.type)
            apply(ctx, action, h["action"])


# helpers -----------------------------------------------------------------------------------------
def _authorized(ctx: Ctx, conv: Conv, action: AgentAction, raw: dict[str, Any]) -> Verdict | None:
    verdict = ownership(conv, action.agent_id, action.role, ctx.config.skill(conv["skill"]).auto_accept)
    if verdict in ("not_owner", "not_assigned"):
        detail = ("the conversation is assigned to another agent" if verdict == "not_owner"
                  else "accept the conversation first")
        ctx.reject(raw, verdict, detail)
        return None
    return verdict


def _send(ctx: Ctx, action: AgentAction, parts: list[Part], mode: tuple[str, str | None]) -> None:
    """Text and rich messages (#17): one request and one `agent_message` per bubble."""
    rich.send(ctx, action, parts, mode)
    lifecycle.agent_wrote(ctx, action.agent_id)


def _conv(ctx: Ctx) -> Conv:
    conv = ctx.st["conv"]
    assert conv is not None  # noqa: S101 - handlers of holdable actions run with a conversation
    return conv


# handlers ----------------------------------------------------------------------------------------
def _accept(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    conv = _conv(ctx)
    owner = conv["owner"]
    if owner is not None and owner["id"] == action.agent_id:
        return  # already theirs
    if owner is not None and action.role != "manager":
        ctx.reject(raw, "not_owner", "the conversation is assigned to another agent")
        return
    lifecycle.take(ctx, agent_of(action))


def _message(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    conv = _conv(ctx)
    parts = rich.content(ctx, action, raw)
    if parts is None:
        return
    verdict = _authorized(ctx, conv, action, raw)
    if verdict is None:
        return
    mode = send_mode(ctx.st["consumer_at"], ctx.now, ctx.config.messaging, ctx.config.account.human_agent_tag)
    if mode is None:
        ctx.reject(raw, "window_closed", "outside Meta's messaging window for this person")
    if mode is None or not bots.thread_ready(ctx, raw, action.agent_id):  # #15: or another app's thread
        return
    if verdict == "take":
        lifecycle.take(ctx, agent_of(action))
    _send(ctx, action, parts, mode)


def _sender_action(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    conv = ctx.st["conv"]
    if conv is None or not in_response_window(ctx.st["consumer_at"], ctx.now, ctx.config.messaging) \
            or thread.others_own(ctx):  # #15: not into another app's thread either
        ctx.note("dropped", action.type)
        return  # typing / read for no open conversation, or outside the window: dropped
    verdict = _authorized(ctx, conv, action, raw)
    if verdict is None:
        return
    if verdict == "take":
        lifecycle.take(ctx, agent_of(action))
    name = "mark_seen" if action.type == "read" else ("typing_on" if action.on is not False else "typing_off")
    ctx.outbound("agent", {"recipient": {"id": ctx.psid}, "sender_action": name}, action.agent_id, None)


def _close(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    conv = _conv(ctx)
    verdict = _authorized(ctx, conv, action, raw)
    if verdict is None:
        return
    if verdict == "take":
        lifecycle.take(ctx, agent_of(action), announce=False)
    lifecycle.close(ctx, closed_by="agent", reason=action.reason or "agent", agent_id=action.agent_id,
                    nickname=agent_of(action)["nickname"])


def _transfer(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    conv = _conv(ctx)
    src = conv["skill"]
    dst_or_none = routing.transfer_target(action.to_skill, src, ctx.skills)
    if dst_or_none is None:
        ctx.reject(raw, "invalid_action", f"to_skill {action.to_skill!r} is not a known skill")
        return
    dst = dst_or_none
    if action.to_skill is None and action.to_agent_id is None:
        ctx.reject(raw, "invalid_action", "transfer needs to_skill or to_agent_id")
        return
    owner = conv["owner"]
    if dst == src and action.to_agent_id is None:
        ctx.reject(raw, "invalid_action", f"the conversation is already in skill {src!r}")
        return
    if dst == src and owner is not None and owner["id"] == action.to_agent_id:
        ctx.reject(raw, "invalid_action", f"the conversation is already assigned to {action.to_agent_id!r}")
        return
    verdict = _authorized(ctx, conv, action, raw)
    if verdict is None:
        return
    for skill in dict.fromkeys((src, dst)):
        ctx.console("conversation_transferred", skill, from_skill=src, to_skill=dst, agent_id=action.agent_id,
                    to_agent_id=action.to_agent_id)
    ctx.note("transferred", f"{src}>{dst}")
    lifecycle.leave_queue(ctx, conv)
    if dst != src:
        ctx.note("open-", src)
        ctx.note("open+", dst)
        conv = turns.move_to_skill(conv, dst)
    if action.to_agent_id is not None:
        nick = action.to_agent_nickname.strip() if action.to_agent_nickname else None
        target: Agent = {"id": action.to_agent_id, "nickname": clamp(nick, NICKNAME_MAX) if nick else None}
        ctx.st["conv"] = turns.assign(conv, target, ctx.now)
    else:
        ctx.st["conv"] = turns.requeue(conv, ctx.now)
        ctx.note("queue+", dst)
    say(ctx, "transferred", skill=dst)


def _return_to_queue(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    conv = _conv(ctx)
    if conv["owner"] is None:
        ctx.reject(raw, "invalid_action", "the conversation is already in the queue")
        return
    if _authorized(ctx, conv, action, raw) is None:
        return
    lifecycle.to_queue(ctx)
    ctx.console("conversation_returned", agent_id=action.agent_id)
    say(ctx, "returned_to_queue")


def _set_response_time(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    conv = _conv(ctx)
    if action.seconds is None:
        ctx.reject(raw, "invalid_action", "set_response_time needs seconds")
        return
    verdict = _authorized(ctx, conv, action, raw)
    if verdict is None:
        return
    if verdict == "take":
        lifecycle.take(ctx, agent_of(action))
    current = ctx.st["conv"]
    assert current is not None  # noqa: S101 - still open
    ctx.st["conv"] = {**current, "response_seconds": action.seconds}
    ctx.console("response_time_set", agent_id=action.agent_id, seconds=action.seconds)
    say(ctx, "response_time_updated")


def _join_leave(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    conv = _conv(ctx)
    if action.role != "manager":
        ctx.reject(raw, "invalid_action", f"{action.type} needs \"role\": \"manager\"")
        return
    present = any(m["id"] == action.agent_id for m in conv["managers"])
    if (action.type == "join") == present:
        ctx.note("ignored", action.type)
        return
    manager = agent_of(action)
    nickname = ctx.config.nickname(manager["id"], manager["nickname"], conv["locale"])
    if action.type == "join":
        ctx.st["conv"] = turns.join(conv, manager)
    else:
        ctx.st["conv"] = turns.leave(conv, action.agent_id)
    trigger = "manager_joined" if action.type == "join" else "manager_left"
    ctx.console(trigger, agent_id=action.agent_id, nickname=nickname)
    say(ctx, trigger, nickname=nickname)


def _open(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
    if ctx.st["conv"] is not None:
        ctx.reject(raw, "invalid_action", "a conversation is already open with this person")
        return
    parts = rich.content(ctx, action, raw)
    if parts is None:
        return
    mode = send_mode(ctx.st["consumer_at"], ctx.now, ctx.config.messaging, ctx.config.account.human_agent_tag,
                     inside="UPDATE")
    if mode is None:
        ctx.reject(raw, "window_closed", "outside Meta's messaging window for this person")
    if mode is None or not bots.thread_ready(ctx, raw, action.agent_id):  # #15: or another app's thread
        return
    lifecycle.open_by_agent(ctx, agent_of(action))
    _send(ctx, action, parts, mode)


_HANDLERS: dict[str, Callable[[Ctx, AgentAction, dict[str, Any]], None]] = {
    "accept": _accept,
    "message": _message,
    "typing": _sender_action,
    "read": _sender_action,
    "close": _close,
    "transfer": _transfer,
    "return_to_queue": _return_to_queue,
    "set_response_time": _set_response_time,
    "join": _join_leave,
    "leave": _join_leave,
    "open": _open,
    "to_bot": lambda ctx, action, raw: bots.to_bot_action(ctx, action, raw, _authorized),  # #15
}

"""Bots and human agents in one Messenger thread (#15): hand-over in, the bot transcript, agent
messages while another app owns the thread, and `to_bot`.

- **Transcript.** What the customer and the bot say on the standby channel (while the bot owns the
  thread) is kept as lines, the last `bots.transcript_minutes` and at most `bots.transcript_messages`
  (texts cut to 300 characters, 2,400 bytes together), in the key's `thread` part.
- **Hand-over in.** A `pass_thread_control` whose new owner is our app opens a conversation
  (`opened_by: "bot"`, with the welcome) on the skill the metadata names (`skill_for`) and shows the
  agent one `handover_context` event: the metadata and the transcript. The standby consumer
  messages before it already opened Meta's window (`windows`), so the agent can answer at once.
- **Owner changes** (take, request, a pass elsewhere, Page Inbox) are shown as `thread_control`.
- **Agent messages while another app owns the thread**: with `bots.take_thread_on_agent_message`
  the connector takes the thread first (the take goes out before the message, in order); else the
  action is rejected `thread_not_owned` and a `request_thread_control` goes out (at most one per
  `bots.request_again_after_seconds`).
- **`to_bot`**: the thread goes to the page's bot at once and the conversation closes (reason
  `to_bot`, no survey: the bot owns the thread).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from schemas.contract import AgentAction
from streams.core.automessages import clamp
from streams.core.config_bots import PAGE_INBOX_APP_ID
from streams.rules.conversation import lifecycle, thread
from streams.rules.conversation.context import Ctx
from streams.rules.conversation.state import Conv
from streams.rules.conversation.state_bots import LINE_TEXT_MAX, LINES_BYTES, Line

SKILL_TEXT_MAX = 64  # plain-text metadata longer than this names no skill


def parse_metadata(metadata: str | None) -> tuple[str | None, dict[str, Any] | None]:
    """(the skill name the metadata gives, its JSON fields): plain text is the name itself, a JSON
    object gives its `skill` field; anything else gives no name."""
    if not metadata or not metadata.strip():
        return None, None
    text = metadata.strip()
    if text.startswith("{"):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None, None
        if not isinstance(doc, dict):
            return None, None
        name = doc.get("skill")
        return (name.strip() if isinstance(name, str) and name.strip() else None), doc
    return (text if len(text) <= SKILL_TEXT_MAX else None), None


def skill_for(ctx: Ctx, metadata: str | None) -> str:
    """The skill of a hand-over: the metadata's name through `[bots.skills]`, or the name itself when
    it is a known skill (configured, or of a page connected live: `Ctx.skills`), else the page's skill
    (routing)."""
    name, _ = parse_metadata(metadata)
    if name is not None:
        mapped = ctx.config.bots.skills.get(name)
        if mapped is not None:
            return mapped
        if name in ctx.skills:
            return name
    return ctx.route()[0]


# transcript ----------------------------------------------------------------------------------------
def _line_text(ev: dict[str, Any]) -> str | None:
    text = ev.get("text")
    if isinstance(text, str) and text.strip():
        return clamp(text.strip(), LINE_TEXT_MAX)
    kinds = [str(a.get("type")) for a in ev.get("attachments") or [] if isinstance(a, dict)]
    if kinds:
        return "[" + ", ".join(kinds[:5]) + "]"
    if ev.get("kind") == "postback":
        return "[button]"
    return None


def add_line(lines: list[Line], line: Line, now: int, minutes: int, messages: int) -> list[Line]:
    """The transcript with one more line (`[by, at, text]`): the last `minutes`, at most `messages`
    lines and `LINES_BYTES` of text (the oldest go first)."""
    since = now - minutes * 60_000
    # in Meta's time order: separate webhook bodies may arrive out of order
    kept = sorted((ln for ln in [*lines, line] if ln[1] >= since), key=lambda ln: ln[1])[-messages:]
    total = sum(len((ln[2] or "").encode()) for ln in kept)
    while kept and total > LINES_BYTES:
        total -= len((kept[0][2] or "").encode())
        kept = kept[1:]
    return kept


def transcript(ctx: Ctx) -> list[dict[str, Any]]:
    """The transcript still within the window at `ctx.now`, as the console shows it."""
    since = ctx.now - ctx.config.bots.transcript_minutes * 60_000
    return [{"by": ln[0], "at": ln[1], "text": ln[2]} for ln in thread.thread_of(ctx.st, ctx.now)["lines"]
            if ln[1] >= since]


def on_standby(ctx: Ctx, ev: dict[str, Any]) -> None:
    """An event on the standby channel: another app owns the thread; customer and bot lines go to the
    transcript."""
    kind = ev["kind"]
    app_id = ev.get("app_id")
    if kind == "echo" and app_id and app_id != PAGE_INBOX_APP_ID:
        thread.set_owner(ctx, app_id)  # the app sending on the standby channel holds the thread
    elif thread.owner(ctx.st) in (None, ctx.config.account.app_id):
        thread.set_owner(ctx, thread.bot_of(ctx) or thread.UNKNOWN_APP)
    if kind in ("message", "postback"):
        by = "customer"
    elif kind == "echo":
        by = "page" if app_id == PAGE_INBOX_APP_ID else "bot"
    else:
        return
    line: Line = [by, int(ev.get("timestamp") or ctx.now), _line_text(ev)]
    cfg = ctx.config.bots
    current = thread.thread_of(ctx.st, ctx.now)
    lines = add_line(current["lines"], line, ctx.now, cfg.transcript_minutes, cfg.transcript_messages)
    ctx.st["thread"] = {**current, "lines": lines}


def on_messaging(ctx: Ctx) -> None:
    """A consumer line on the messaging channel: the thread is ours (or idle with us as primary)."""
    ours = ctx.config.account.app_id
    if thread.owner(ctx.st) not in (None, ours):
        thread.set_owner(ctx, ours)


# hand-over events ----------------------------------------------------------------------------------
def on_handover(ctx: Ctx, ev: dict[str, Any]) -> None:
    """`pass_thread_control`, `take_thread_control` or `request_thread_control` (messaging_handovers)."""
    d = ev.get("data") or {}
    kind = d.get("type")
    ours = ctx.config.account.app_id
    metadata = d.get("metadata") if isinstance(d.get("metadata"), str) else None
    if kind == "pass_thread_control":
        new, prev = d.get("new_owner_app_id"), d.get("previous_owner_app_id")
        thread.set_owner(ctx, new)
        if new == ours:
            hand_over_in(ctx, ev, prev, metadata)
            return
        _show(ctx, ev, "passed", from_app_id=prev, to_app_id=new, metadata=metadata)
    elif kind == "take_thread_control":
        prev = d.get("previous_owner_app_id")
        new = d.get("new_owner_app_id") or (thread.bot_of(ctx) if prev == ours else None) or thread.UNKNOWN_APP
        thread.set_owner(ctx, new)
        _show(ctx, ev, "taken", from_app_id=prev, to_app_id=new, metadata=metadata)
        ctx.note("handoff", "taken")
    elif kind == "request_thread_control":
        _show(ctx, ev, "requested", from_app_id=thread.owner(ctx.st), to_app_id=d.get("requested_owner_app_id"),
              metadata=metadata)
    else:
        ctx.console("context_event", timestamp=ev["timestamp"], kind=ev["kind"], data=d)


def _show(ctx: Ctx, ev: dict[str, Any], change: str, *, from_app_id: str | None, to_app_id: str | None,
          metadata: str | None) -> None:
    page_inbox = PAGE_INBOX_APP_ID in (from_app_id, to_app_id)
    ctx.console("thread_control", timestamp=ev["timestamp"], change=change, from_app_id=from_app_id,
                to_app_id=to_app_id, owner_app_id=thread.owner(ctx.st), page_inbox=page_inbox, metadata=metadata)
    if page_inbox:
        ctx.note("handoff", "page_inbox")


def hand_over_in(ctx: Ctx, ev: dict[str, Any], from_app_id: str | None, metadata: str | None) -> None:
    """The thread was passed to us: a conversation on the metadata's skill (unless one is open) and
    the `handover_context` (metadata + transcript); the transcript is then forgotten."""
    skill_name, fields = parse_metadata(metadata)
    skill = skill_for(ctx, metadata)
    if ctx.st["conv"] is None:
        lifecycle.open_with(ctx, skill, "bot", timestamp=ev["timestamp"], from_app_id=from_app_id)
    lines = transcript(ctx)
    ctx.console("handover_context", timestamp=ev["timestamp"], from_app_id=from_app_id,
                page_inbox=from_app_id == PAGE_INBOX_APP_ID, metadata=metadata, metadata_fields=fields,
                metadata_skill=skill_name, transcript=lines)
    current = thread.thread_of(ctx.st, ctx.now)
    ctx.st["thread"] = {**current, "lines": []}
    ctx.note("handoff", "in")


# agent side ----------------------------------------------------------------------------------------
def thread_ready(ctx: Ctx, raw: dict[str, Any], agent_id: str) -> bool:
    """May an agent's message go now? Takes the thread first (`take_thread_on_agent_message`), or
    rejects the action `thread_not_owned` and requests control; True when the message may go."""
    if not thread.others_own(ctx):
        return True
    owner = thread.owner(ctx.st)
    cfg = ctx.config.bots
    if cfg.take_thread_on_agent_message:
        thread.control(ctx, "take_thread_control", origin="agent", agent_id=agent_id,
                       metadata=f"agent {agent_id} replies")
        thread.set_owner(ctx, ctx.config.account.app_id)
        ctx.note("handoff", "taken_by_agent")
        return True
    ctx.reject(raw, "thread_not_owned", f"app {owner} owns the thread; control was requested")
    current = thread.thread_of(ctx.st, ctx.now)
    last = current["requested_at"]
    if last is None or ctx.now - last >= cfg.request_again_after_seconds * 1000:
        thread.control(ctx, "request_thread_control", origin="agent", agent_id=agent_id,
                       metadata=f"agent {agent_id} wants to reply")
        ctx.st["thread"] = {**thread.thread_of(ctx.st, ctx.now), "requested_at": ctx.now}
    return False


def to_bot_action(ctx: Ctx, action: AgentAction, raw: dict[str, Any],
                  authorized: Callable[[Ctx, Conv, AgentAction, dict[str, Any]], object]) -> None:
    """The `to_bot` action: the owner (or a manager) of an open conversation, anyone without one
    (`authorized` is the actions module's ownership check, which rejects with the reason)."""
    conv = ctx.st["conv"]
    if conv is None or authorized(ctx, conv, action, raw) is not None:
        to_bot(ctx, raw, action.agent_id, action.metadata)


def to_bot(ctx: Ctx, raw: dict[str, Any], agent_id: str, metadata: str | None) -> None:
    """`to_bot`: the thread goes to the page's bot now; an open conversation closes (`to_bot`)."""
    bot = thread.bot_of(ctx)
    if bot is None:
        ctx.reject(raw, "invalid_action", f"no bot is configured for page {ctx.page_id} ([bots])")
        return
    if thread.owner(ctx.st) == bot:
        ctx.reject(raw, "invalid_action", "the bot owns the thread already")
        return
    conv = ctx.st["conv"]
    text = metadata or thread.handback_metadata(conv["id"] if conv else "", "agent", "to_bot")
    thread.control(ctx, "pass_thread_control", origin="agent", agent_id=agent_id, target_app_id=bot, metadata=text)
    thread.set_owner(ctx, bot)
    ctx.console("thread_control", change="passed", from_app_id=ctx.config.account.app_id, to_app_id=bot,
                owner_app_id=bot, page_inbox=False, metadata=text, agent_id=agent_id)
    ctx.note("handoff", "to_bot")
    if conv is not None:
        lifecycle.close(ctx, closed_by="agent", reason="to_bot", agent_id=agent_id)

"""#17 in the conversation rules: rich agent messages, the customer's profile, the conversation's
locale, the `{consumer_first_name}` placeholder, and inbound attachments whole on the console.

- Rich messages: `content` checks an action's `text` / `attachment` / `quick_replies` / `template`
  (`streams.rules.messages`) and `send` writes one outbound request and one `agent_message` per
  Messenger bubble, the event carrying the bubble's structure (`attachment`, `quick_replies`,
  `template`) beside `text`, so a console renders what the consumer sees.
- Profile: `on_open` asks the dispatcher for the User Profile when the kept one is missing or stale
  (`streams.rules.profile`) and shows a kept one (`profile` event, `source: cache`); `on_profile_result`
  keeps the answer and shows it (`source: graph`). Nothing waits for it.
- Locale: `opening_locale` is the profile's when known, else the page's; it is fixed when the
  conversation opens and picks the automatic-message and CSAT texts (language fallback there).
"""

from __future__ import annotations

from typing import Any

from schemas.contract import AgentAction
from streams.rules import messages, profile
from streams.rules.conversation import checkout
from streams.rules.conversation.api import Output
from streams.rules.conversation.context import Ctx
from streams.rules.messages import Part
from streams.rules.profile import ProfileState


def _profile(ctx: Ctx) -> ProfileState:
    return profile.migrate(ctx.st.get("profile"))


# --- locale and placeholder -------------------------------------------------------------------------

def opening_locale(ctx: Ctx) -> str:
    """The locale of a conversation opening now: the person's (profile) when known, else the page's."""
    return profile.locale_of(_profile(ctx)) or (ctx.env.page.locale if ctx.env.page else "en_US")


def first_name(ctx: Ctx) -> str:
    """`{consumer_first_name}`: the kept first name, else `profile.first_name_fallback`."""
    return profile.first_name(_profile(ctx), ctx.config.profile.first_name_fallback)


# --- profile ---------------------------------------------------------------------------------------

def on_open(ctx: Ctx) -> None:
    """A conversation opened: show a kept profile, and ask for a fresh one when due."""
    ps = _profile(ctx)
    if ps["data"]:
        ctx.console("profile", **profile.console_fields(ps, "cache"))
    cfg = ctx.config.profile
    # #15: a checkout key (`uref:` / `ref:`) names no person to ask about; its reply opens under the PSID
    if ctx.psid is None or checkout.kind_of(ctx.key) != "psid" or not profile.need_fetch(ps, ctx.now, cfg):
        return
    conv = ctx.st["conv"]
    ctx.outputs.append(Output("outbound", ctx.key, {
        "page_id": ctx.page_id,
        "psid": ctx.psid,
        "outbox_id": ctx.next_id("pf"),
        "conversation_id": conv["id"] if conv else None,
        "origin": "system",
        "endpoint": profile.ENDPOINT,
        "request": profile.request(ctx.psid, cfg),
        "skill": conv["skill"] if conv else None,
        "agent_id": None,
        "created_at": ctx.now,
    }))
    ctx.st["profile"] = profile.asked(ps, ctx.now)
    ctx.note("profile", "asked")


def on_profile_result(ctx: Ctx, res: dict[str, Any]) -> None:
    """The dispatcher's answer to a profile request: keep it and show it; a failure is only noted."""
    ps = _profile(ctx)
    body = res.get("profile")
    if res.get("status") != "sent" or not isinstance(body, dict):
        ctx.st["profile"] = profile.failed(ps, ctx.now)
        ctx.note("profile", "failed")
        return
    ps = profile.answered(ps, profile.parse(body, ctx.config.profile.fields), ctx.now)
    ctx.st["profile"] = ps
    ctx.note("profile", "fetched")
    if ctx.st["conv"] is not None:
        ctx.console("profile", **profile.console_fields(ps, "graph"))


# --- rich agent messages ---------------------------------------------------------------------------

def content(ctx: Ctx, action: AgentAction, raw: dict[str, Any]) -> list[Part] | None:
    """The bubbles of a `message` / `open` action, or None after rejecting it (`text_too_long` when
    the text is the only problem, else `invalid_message`; `invalid_action` for an empty text alone,
    as before rich messages)."""
    if not messages.is_rich(raw) and not (action.text and action.text.strip()):
        ctx.reject(raw, "invalid_action", f"{action.type} needs a non-empty text")
        return None
    checked = messages.check_message(raw, text_limit=ctx.config.limits.agent_text)
    if not checked.ok:
        ctx.reject(raw, checked.reason, checked.detail())
        return None
    return checked.parts


def send(ctx: Ctx, action: AgentAction, parts: list[Part], mode: tuple[str, str | None]) -> None:
    """One outbound request and one `agent_message` per bubble, in order."""
    messaging_type, tag = mode
    for i, part in enumerate(parts):
        request: dict[str, Any] = {"recipient": {"id": ctx.psid}, "messaging_type": messaging_type}
        if tag:
            request["tag"] = tag
        request["message"] = dict(part.message)
        text = part.shown.get("text")
        outbox_id = ctx.outbound("agent", request, action.agent_id, text, agent_nickname=action.agent_nickname)
        extra: dict[str, Any] = {k: v for k, v in part.shown.items() if k != "text"}
        if len(parts) > 1:
            extra.update(part=i + 1, parts=len(parts), action_id=action.action_id)
        ctx.console("agent_message", agent_id=action.agent_id, text=text, outbox_id=outbox_id, mid=None,
                    messaging_type=messaging_type, tag=tag, role=action.role, **extra)


# --- inbound, whole -----------------------------------------------------------------------------------

def attachments(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """A normalized event's attachments for the console: `type`, `url`, and where present `title`,
    `sticker_id`, `coordinates` (`{lat, long}`)."""
    out = []
    for a in ev.get("attachments") or []:
        item = {"type": a.get("type"), "url": a.get("url")}
        for key in ("title", "sticker_id", "coordinates"):
            if a.get(key) is not None:
                item[key] = a[key]
        out.append(item)
    return out


def message_extras(ev: dict[str, Any]) -> dict[str, Any]:
    """Fields a `consumer_message` carries besides the contract's: the sticker id and the ad referral
    (on the first message after a Click-to-Messenger ad), when present."""
    extra: dict[str, Any] = {}
    if ev.get("sticker_id"):
        extra["sticker_id"] = ev["sticker_id"]
    if ev.get("referral"):
        extra["referral"] = ev["referral"]
    return extra

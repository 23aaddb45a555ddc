"""Consumer-side events (normalized Messenger events) and the dispatcher's send results.

Dedupe keys are kept only for kinds that are not idempotent by themselves: receipts are idempotent
by their watermark, echoes of our own sends by their outbox id; every other event is checked
against the conversation's recent keys (40-bit hashes, epoch seconds, within the horizon).
"""

from __future__ import annotations

from typing import Any

from streams.rules.conversation import bots, csat_hooks, lifecycle, optin, rich, thread, turns
from streams.rules.conversation.context import Ctx, remember
from streams.rules.conversation.hours import off_hours_end
from streams.rules.conversation.state import SEEN_MAX, short_hash
from streams.rules.conversation.system import say
from streams.rules.conversation.windows import meta_time, newest
from streams.rules.dedupe import dedupe


def on_event(ctx: Ctx, ev: dict[str, Any]) -> bool:
    """Apply one event; True when it is a duplicate (nothing changed)."""
    kind = ev["kind"]
    received = int(ev.get("received_at") or ctx.now)
    standby = bool(ev.get("standby"))
    if not standby:
        if kind in ("delivery", "read"):
            _receipt(ctx, ev)
            return False
        if kind == "echo" and _ours(ctx, ev):
            meta = ev.get("metadata")
            if meta:
                learn_mid(ctx, meta, ev.get("mid"), via="echo")
            return False
    if is_duplicate(ctx, ev["idempotency_key"], received):
        ctx.note("duplicate", kind)
        return True
    if standby:
        if kind in ("message", "postback"):
            ctx.st["consumer_at"] = newest(ctx.st["consumer_at"], meta_time(ev, received))
        if kind == "handover":  # #15: hand-over events may come on either channel
            bots.on_handover(ctx, ev)
            return False
        bots.on_standby(ctx, ev)  # #15: the owner and the bot transcript
        # another app holds the thread: shown as context, never answered automatically
        ctx.console("standby_event", timestamp=ev["timestamp"], kind=kind, mid=ev.get("mid"), text=ev.get("text"),
                    data=ev.get("data") or {})
        return False
    if kind in ("message", "postback"):
        _consumer_line(ctx, ev, received)
    elif kind == "echo":
        _external(ctx, ev)
    elif kind == "reaction":
        d = ev.get("data") or {}
        ctx.console("reaction", timestamp=ev["timestamp"], mid=d.get("mid"), reaction=d.get("reaction"),
                    emoji=d.get("emoji"), action=d.get("action"))
    elif kind == "message_edit":
        ctx.console("message_edit", timestamp=ev["timestamp"], mid=ev.get("mid"), text=ev.get("text"),
                    num_edit=(ev.get("data") or {}).get("num_edit"))
    elif kind == "handover":  # #15
        bots.on_handover(ctx, ev)
    elif kind == "optin":  # #15: checkout opt-ins
        optin.on_optin(ctx, ev)
    elif kind == "referral":
        d = (ev.get("data") or {}).get("referral") or {}
        ctx.console("referral", timestamp=ev["timestamp"], ref=d.get("ref"), source=d.get("source"),
                    referral_type=d.get("type"), ad_id=d.get("ad_id"))
    else:
        ctx.console("context_event", timestamp=ev["timestamp"], kind=kind, data=ev.get("data") or {})
    return False


def is_duplicate(ctx: Ctx, idempotency_key: str, received_ms: int) -> bool:
    """Was this key seen within the horizon? If not, remember it (hashed, in seconds, bounded)."""
    seen = dict(ctx.st["seen"])
    limit = min(ctx.rules.max_keys, SEEN_MAX)
    if dedupe(seen, short_hash(idempotency_key), received_ms // 1000, ctx.rules.horizon_ms // 1000, limit):
        return True
    ctx.st["seen"] = seen
    return False


def _ours(ctx: Ctx, ev: dict[str, Any]) -> bool:
    meta = ev.get("metadata")
    return ev.get("app_id") == ctx.config.account.app_id or (meta is not None and meta in ctx.st["outbox"])


def learn_mid(ctx: Ctx, outbox_id: str, mid: str | None, via: str) -> None:
    """Our send got its mid (echo or send result): the agent message is shown again with it, once;
    the kept text is dropped."""
    entry = ctx.st["outbox"].get(outbox_id)
    if entry is None or not mid or entry["mid"]:
        return
    ctx.st["outbox"] = {**ctx.st["outbox"], outbox_id: {**entry, "mid": mid, "text": None}}
    if entry["origin"] == "agent":
        ctx.console("agent_message", entry["skill"], conversation_id=entry["conversation_id"],
                    agent_id=entry["agent_id"], text=entry["text"], outbox_id=outbox_id, mid=mid, via=via)


def on_result(ctx: Ctx, res: dict[str, Any]) -> None:
    """A dispatcher result: `sent` gives the mid; `failed` becomes `send_failed`, once."""
    outbox_id = str(res.get("outbox_id") or "")
    if res.get("endpoint") == "user_profile":
        rich.on_profile_result(ctx, res)  # #17
        return
    thread.on_result(ctx, res)  # #15: results of thread-control calls move the owner
    if res.get("status") == "sent":
        learn_mid(ctx, outbox_id, res.get("mid"), via="send_result")
        return
    if not remember(ctx, f"result:{outbox_id}:{res.get('status')}"):
        ctx.note("duplicate", "result")
        return
    entry = ctx.st["outbox"].get(outbox_id)
    ctx.console("send_failed", entry["skill"] if entry else None,
                conversation_id=(entry["conversation_id"] if entry else None) or res.get("conversation_id"),
                outbox_id=outbox_id, origin=res.get("origin"), code=res.get("code"), subcode=res.get("subcode"),
                message=res.get("message"), retryable=bool(res.get("retryable")))


def _receipt(ctx: Ctx, ev: dict[str, Any]) -> None:
    status = "delivered" if ev["kind"] == "delivery" else "read"
    wm = int(ev.get("watermark") or 0)
    if wm <= ctx.st["wm"].get(status, 0):
        return  # not newer than one already seen: out-of-order and repeated receipts are safe
    ctx.st["wm"] = {**ctx.st["wm"], status: wm}
    ctx.console("status", timestamp=ev["timestamp"], status=status, watermark=wm, mids=ev.get("mids"))


def _external(ctx: Ctx, ev: dict[str, Any]) -> None:
    ext = ctx.env.external_user
    ctx.console("external_message", timestamp=ev["timestamp"], mid=ev.get("mid"), text=ev.get("text"),
                attachments=rich.attachments(ev),
                author={"agent_id": ext.agent_id, "nickname": ext.nickname}, app_id=ev.get("app_id"))
    ctx.note("page_out", ctx.page_label)
    conv = ctx.st["conv"]
    if conv is not None:
        ctx.st["conv"] = turns.external_line(conv)


def _consumer_line(ctx: Ctx, ev: dict[str, Any], received: int) -> None:
    """A consumer message or postback: the window, the survey, the conversation, urgency, close."""
    st = ctx.st
    st["consumer_at"] = newest(st["consumer_at"], meta_time(ev, received))
    text: str | None = ev.get("text")
    payload: str | None = ev.get("quick_reply_payload")
    if ev["kind"] == "postback":
        payload = payload or (ev.get("data") or {}).get("payload")
    bots.on_messaging(ctx)  # #15: a line on the messaging channel: the thread is ours
    if csat_hooks.on_consumer_line(ctx, text, payload):
        return
    opened = st["conv"] is None
    # #15: a reply to a checkout (`prior_message`) continues that conversation under this PSID
    if not optin.claim_on_reply(ctx, ev, opened) and opened:
        lifecycle.open_by_consumer(ctx, timestamp=ev["timestamp"])
    conv = st["conv"]
    assert conv is not None  # noqa: S101 - opened above
    st["conv"] = turns.consumer_line(conv, ctx.now)
    ctx.note("page_in", ctx.page_label)
    if ev["kind"] == "postback":
        # #17: a tapped postback button reaches the console as a consumer message with its payload
        d = ev.get("data") or {}
        ctx.console("consumer_message", timestamp=ev["timestamp"], mid=ev.get("mid"), text=d.get("title"),
                    attachments=[], quick_reply_payload=None, truncated=False, reply_to_mid=None,
                    payload=d.get("payload"), tap="postback", referral=d.get("referral"))
    else:
        limit = ctx.config.limits.consumer_text
        truncated = text is not None and len(text) > limit
        ctx.console("consumer_message", timestamp=ev["timestamp"], mid=ev.get("mid"),
                    text=text[:limit] if text is not None and truncated else text,
                    attachments=rich.attachments(ev), quick_reply_payload=payload, truncated=truncated,
                    reply_to_mid=(ev.get("data") or {}).get("reply_to_mid"),
                    payload=payload, tap="quick_reply" if payload else None, **rich.message_extras(ev))
    if not opened:
        _off_hours_mid_conversation(ctx)
    if payload:
        _payload(ctx, payload)


def _off_hours_mid_conversation(ctx: Ctx) -> None:
    """The first consumer line of an off-hours period in an open conversation gets the message."""
    conv = ctx.st["conv"]
    assert conv is not None  # noqa: S101 - called with a conversation
    off = off_hours_end(ctx.config.skill(conv["skill"]).hours, ctx.now)
    if off is None or conv["off_hours_until"] == off:
        return
    ctx.st["conv"] = {**conv, "off_hours_until": off}
    say(ctx, "off_hours_mid_conversation")


def _payload(ctx: Ctx, payload: str) -> None:
    """Urgency and close payloads (postback or quick reply)."""
    messaging = ctx.config.messaging
    conv = ctx.st["conv"]
    assert conv is not None  # noqa: S101 - called with a conversation
    if payload in messaging.urgent_payloads or payload in messaging.not_urgent_payloads:
        urgent = payload in messaging.urgent_payloads
        if conv["urgent"] != urgent:
            ctx.st["conv"] = {**conv, "urgent": urgent}
            ctx.console("urgency_changed", urgent=urgent)
            say(ctx, "marked_urgent" if urgent else "unmarked_urgent")
    elif payload in messaging.close_payloads:
        lifecycle.close(ctx, closed_by="consumer", reason="consumer", agent_id=None)

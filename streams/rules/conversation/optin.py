"""Checkout opt-ins (#15), and a checkbox conversation moving to the PSID when the person answers.

An opt-in is remembered at its own key for the match window and meets the orders waiting there
(`orders`); one carrying a `ref` tells the ref key where it lives (`optin_ref`), so orders that name
only the ref find it.

When the person answers a checkbox checkout, their message carries `prior_message`
(`checkbox_plugin`, the user_ref). The PSID key opens the conversation at once under the id the
checkout key gave it (derived from page and user_ref: both sides know it without asking) and
sends a `claim` to the checkout key; the checkout key answers with a `handoff` (its conversation,
its orders), forgets them, and forwards to the PSID what still reaches it (order updates, agent
actions) for `optin.relink_days`. The PSID key merges the handoff into its conversation: same id,
purchase details and counts intact. Nobody waits: the reply is answered at once, the handoff
completes the conversation when it arrives. Docs: docs/bots-and-optin.md.
"""

from __future__ import annotations

from typing import Any

from streams.rules.conversation import actions, lifecycle, orders, turns
from streams.rules.conversation.api import Output
from streams.rules.conversation.checkout import (
    DAY_MS,
    RELAY_TYPES,
    UREF,
    as_order,
    checkout_conversation_id,
    checkout_of,
    key_of,
    kind_of,
    put,
    relay,
    waiting_orders,
    window_ms,
    with_order,
)
from streams.rules.conversation.context import Ctx, remember
from streams.rules.conversation.state import AGENTS_MAX, SKILLS_MAX, Conv, short_hash
from streams.rules.conversation.state_bots import HOMES_MAX, LINKED_MAX, OPTINS_MAX, Home, KnownOrder
from streams.rules.conversation.windows import meta_time, newest
from streams.rules.receipt import digest, purchase_summary


# events ------------------------------------------------------------------------------------------
def on_optin(ctx: Ctx, ev: dict[str, Any]) -> None:
    """A `messaging_optins` event: a checkout opt-in (checkbox `user_ref`, or Send to Messenger with
    the person's PSID) is remembered for the match window and meets the orders waiting here."""
    d = ev.get("data") or {}
    ctx.console("context_event", timestamp=ev["timestamp"], kind=ev["kind"], data=d)
    kind = kind_of(ctx.key)
    user_ref = d.get("user_ref") if kind == "uref" else None
    if d.get("type") or kind == "ref" or (kind == "uref" and not user_ref):
        return  # marketing-message opt-ins and the like: context only
    ref = d.get("ref") if isinstance(d.get("ref"), str) and d.get("ref") else None
    if kind == "psid":  # Send to Messenger: the person acted, Meta's window opens
        ctx.st["consumer_at"] = newest(ctx.st["consumer_at"], meta_time(ev, int(ev.get("received_at") or ctx.now)))
    co = checkout_of(ctx.st)
    co = {**co, "optins": [*co["optins"], ctx.now][-OPTINS_MAX:]}
    put(ctx, co)
    ctx.note("optin", "checkbox" if kind == "uref" else "send_to_messenger")
    if ref:
        relay(ctx, key_of(ctx.page_id, ref=ref), "optin_ref", home=ctx.key)
    for waiting in waiting_orders(co):
        if ctx.now - waiting["at"] <= window_ms(ctx):
            orders.match(ctx, waiting)


def claim_on_reply(ctx: Ctx, ev: dict[str, Any], opening: bool) -> bool:
    """A consumer line at a PSID key with `prior_message` from the checkbox plugin: claim the
    checkout's conversation. When no conversation is open here it opens now, under the checkout's
    id; True when it opened one (the caller then applies the line to it)."""
    pm = (ev.get("data") or {}).get("prior_message")
    if not isinstance(pm, dict) or pm.get("source") != "checkbox_plugin" or kind_of(ctx.key) != "psid":
        return False
    user_ref = pm.get("identifier")
    if not isinstance(user_ref, str) or not user_ref:
        return False
    co = checkout_of(ctx.st)
    h = short_hash(user_ref)
    if h in co["linked"]:
        return False
    put(ctx, {**co, "linked": [*co["linked"], h][-LINKED_MAX:]})
    relay(ctx, key_of(ctx.page_id, user_ref=user_ref), "claim", psid=ctx.psid, user_ref=user_ref)
    ctx.note("optin", "claimed")
    if not opening:
        return False
    lifecycle.open_with(ctx, ctx.route()[0], "optin", timestamp=ev["timestamp"],
                        conversation_id=checkout_conversation_id(ctx.page_id, user_ref), user_ref=user_ref)
    return True


# relays ------------------------------------------------------------------------------------------
def on_relay(ctx: Ctx, data: dict[str, Any]) -> None:
    """A record from another key (or from the orders router). Raises ValueError for a malformed one."""
    type_ = data.get("type")
    relay_id = data.get("relay_id")
    if type_ not in RELAY_TYPES or not isinstance(relay_id, str):
        raise ValueError(f"not a relay record: type {type_!r}")
    if type_ != "order" and not remember(ctx, "relay:" + relay_id):
        ctx.note("duplicate", "relay")
        return
    if type_ == "order":
        h = data.get("hash")
        via = str(data.get("via") or "merchant")
        orders.on_order(ctx, data.get("order") or {}, via, h if isinstance(h, str) else None)
    elif type_ == "optin_ref":
        _on_optin_ref(ctx, str(data["home"]))
    elif type_ == "claim":
        _on_claim(ctx, str(data["psid"]), str(data["user_ref"]))
    elif type_ == "handoff":
        _on_handoff(ctx, data)
    else:
        action = data.get("action")
        if isinstance(action, dict):
            actions.on_action(ctx, action)


def forwards_action(ctx: Ctx, raw: dict[str, Any]) -> bool:
    """An agent action at a checkout key whose person answered goes to their PSID key (not `forget`)."""
    co = ctx.st.get("checkout")
    if co is None or co["moved_to"] is None or raw.get("type") == "forget":
        return False
    relay(ctx, f"{ctx.page_id}:{co['moved_to']}", "action", action={**raw, "psid": co["moved_to"]})
    return True


def _on_optin_ref(ctx: Ctx, home: str) -> None:
    """At a ref key: an opt-in carrying this ref lives at `home`; waiting orders go there."""
    co = checkout_of(ctx.st)
    homes = [hm for hm in co["homes"] if hm["key"] != home and ctx.now - hm["at"] <= window_ms(ctx)]
    here: Home = {"key": home, "at": ctx.now}
    co = {**co, "homes": [*homes, here][-HOMES_MAX:]}
    put(ctx, co)
    for waiting in waiting_orders(co):
        if ctx.now - waiting["at"] <= window_ms(ctx) and waiting["order"] is not None:
            orders.forward(ctx, checkout_of(ctx.st), waiting, as_order(waiting["order"]), home)


# the person answered -----------------------------------------------------------------------------
def _on_claim(ctx: Ctx, psid: str, user_ref: str) -> None:
    """At a checkout key: its person answered from `psid`. Hand the conversation and the orders over,
    forget them, and forward to the PSID from now on."""
    co = checkout_of(ctx.st)
    if co["moved_to"] not in (None, psid):
        ctx.note("optin", "claimed_twice")
        relay(ctx, f"{ctx.page_id}:{psid}", "handoff", user_ref=user_ref, conversation=None, orders=[])
        return
    conv = ctx.st["conv"]
    handed = [{"order": o["order"], "matched": o["matched"], "hash": o["hash"]} for o in co["orders"]
              if o["order"] is not None and o["to"] is None]
    if conv is not None:
        ctx.note("open-", conv["skill"])
        if conv["owner"] is None:
            ctx.note("queue-", conv["skill"])
        ctx.st["conv"] = None
        ctx.st["expire_at"] = ctx.now + ctx.config.retention.closed_state_seconds * 1000
    relay(ctx, f"{ctx.page_id}:{psid}", "handoff", user_ref=user_ref, conversation=conv, orders=handed)
    until = ctx.now + ctx.config.optin.relink_days * DAY_MS
    put(ctx, {**co, "orders": [], "optins": [], "moved_to": psid, "moved_until": until})
    ctx.note("optin", "handed_off")


def _on_handoff(ctx: Ctx, data: dict[str, Any]) -> None:
    """At a PSID key: the checkout's conversation and orders arrive; merged into the conversation
    opened on the reply (same id), or closed as merged into another one open here."""
    user_ref = str(data.get("user_ref") or "")
    hconv = data.get("conversation")
    conv = ctx.st["conv"]
    if isinstance(hconv, dict):
        if conv is not None and conv["id"] == hconv["id"]:
            _merge(ctx, conv, hconv, user_ref)
        elif hconv["id"] != ctx.st["last_closed"]:
            _close_merged(ctx, hconv, conv)
    for item in data.get("orders") or []:
        doc = item.get("order") if isinstance(item, dict) else None
        if not isinstance(doc, dict):
            continue
        h = str(item.get("hash") or "") or None
        if item.get("matched"):
            _adopt(ctx, doc, h)
        else:
            orders.on_order(ctx, as_order(doc), "claim", h)


def _merge(ctx: Ctx, conv: Conv, hconv: dict[str, Any], user_ref: str) -> None:
    h = hconv
    merged: Conv = {
        **conv,
        "opened_at": min(conv["opened_at"], int(h["opened_at"])),
        "opened_by": "optin",
        "skills": list(dict.fromkeys([*h["skills"], *conv["skills"]]))[-SKILLS_MAX:],
        "agents": list(dict.fromkeys([*h["agents"], *conv["agents"]]))[-AGENTS_MAX:],
        "counts": {"consumer": conv["counts"]["consumer"] + int(h["counts"].get("consumer", 0)),
                   "agent": conv["counts"]["agent"] + int(h["counts"].get("agent", 0)),
                   "external": conv["counts"]["external"] + int(h["counts"].get("external", 0)),
                   "system": conv["counts"]["system"] + int(h["counts"].get("system", 0))},
        "first_agent_at": min((t for t in (conv["first_agent_at"], h["first_agent_at"]) if t is not None),
                              default=None),
        "queue_ms": conv["queue_ms"] + int(h["queue_ms"]),
        "urgent": conv["urgent"] or bool(h["urgent"]),
    }
    ctx.st["conv"] = merged
    ctx.console("conversation_relinked", user_ref=user_ref, previous_psid=UREF + user_ref, psid=ctx.psid,
                opened_at=merged["opened_at"], skills=merged["skills"])
    owner = h.get("owner")
    if conv["owner"] is None and isinstance(owner, dict):
        lifecycle.take(ctx, {"id": str(owner["id"]), "nickname": owner.get("nickname")}, announce=False)
    ctx.note("optin", "relinked")


def _close_merged(ctx: Ctx, hconv: dict[str, Any], into: Conv | None) -> None:
    """The checkout's conversation cannot continue here (another one is open, or ours closed first):
    it is closed as merged, with its summary."""
    skill = str(hconv["skill"])
    ctx.console("conversation_closed", skill, conversation_id=hconv["id"], closed_by="system", reason="merged",
                agent_id=None, merged_into=into["id"] if into else None)
    summary = turns.summary(hconv, key=ctx.key, page_id=ctx.page_id, psid=ctx.psid,  # type: ignore[arg-type]
                            now=ctx.now, closed_by="system", reason="merged")
    ctx.outputs.append(Output("history", str(hconv["id"]), summary))
    ctx.note("closed", skill)


def _adopt(ctx: Ctx, order: dict[str, Any], h: str | None) -> None:
    """A matched order of the checkout: known here from now on (for its updates), shown again."""
    conv = ctx.st["conv"]
    co = checkout_of(ctx.st)
    full = as_order(order)
    v = order.get("updated_at")
    entry: KnownOrder = {"id": short_hash(str(order["order_id"])), "hash": h or digest(full), "at": ctx.now,
                         "v": v if isinstance(v, int) else None, "matched": True, "order": None,
                         "conversation_id": conv["id"] if conv else None, "to": None}
    put(ctx, with_order(co, entry))
    ctx.console("purchase", order=purchase_summary(order), receipt_sent=False, outbox_id=None,
                reason="sent_before_reply", user_ref=order.get("user_ref"), relinked=True)

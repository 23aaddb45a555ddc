"""Orders at a checkout key (#15): waiting for the opt-in, the match (conversation, purchase,
receipt), updates as messages under the window rules, and the report of an order that met nothing.

An order goes to the key its ids name (psid, else user_ref, else ref: `checkout.order_key`) and
meets an opt-in that arrived there at most `optin.match_window_seconds` before or after it. A ref
key forwards its orders to the opt-in that named the ref. A match opens a conversation
(`opened_by: "optin"`) on the page's skill, shows the purchase (`purchase`) and sends the receipt
template: to `recipient.user_ref` at a checkbox key (the one message Meta allows before the person
answers), to the PSID inside Meta's window otherwise. An order that meets nothing within its window
(or finds its key full) goes to `commerce.orders.unmatched` with an `order_unmatched` console event:
kept and reported, never dropped.
"""

from __future__ import annotations

from typing import Any

from schemas.commerce import Order
from streams.rules.conversation import lifecycle, thread
from streams.rules.conversation.api import Output
from streams.rules.conversation.checkout import (
    checkout_conversation_id,
    checkout_of,
    kind_of,
    known_order,
    put,
    recent_optin,
    relay,
    seen_before,
    size,
    user_ref_of,
    waiting_orders,
    window_ms,
    with_order,
)
from streams.rules.conversation.context import Ctx
from streams.rules.conversation.state import State, short_hash
from streams.rules.conversation.state_bots import (
    ORDERS_MAX,
    PENDING_CHECKOUT_BYTES,
    PENDING_ORDER_BYTES,
    Checkout,
    KnownOrder,
)
from streams.rules.conversation.windows import in_response_window
from streams.rules.receipt import ORDER_BUDGET, compact_order, digest, purchase_summary, receipt_message


def on_order(ctx: Ctx, raw: dict[str, Any], via: str, h: str | None = None) -> None:
    """An order (or an update of one) reaching this key: `merchant` from the orders router, `ref`
    from a ref key that knows the opt-in, `moved` from a checkout key whose person answered,
    `claim` in a handoff (with `h`, the digest of the order as the merchant wrote it)."""
    order = Order.model_validate(raw)
    full = order.model_dump(mode="json", exclude_none=True)
    h = h or digest(full)
    if seen_before(ctx, f"order:{order.order_id}:{h}"):
        ctx.note("duplicate", "order")
        return
    co = checkout_of(ctx.st)
    if co["moved_to"] is not None:
        relay(ctx, f"{ctx.page_id}:{co['moved_to']}", "order", order=full, via="moved", hash=h)
        ctx.note("order", "forwarded")
        return
    known = known_order(co, order.order_id)
    compact = compact_order(order, PENDING_ORDER_BYTES if kind_of(ctx.key) == "psid" else ORDER_BUDGET)
    if known is not None:
        _again(ctx, co, known, order, compact, full, h)
        return
    ctx.note("order", "received")
    entry: KnownOrder = {"id": short_hash(order.order_id), "hash": h, "at": ctx.now, "v": order.updated_at,
                         "matched": False, "order": compact, "conversation_id": None, "to": None}
    if kind_of(ctx.key) == "ref":
        homes = [hm for hm in co["homes"] if ctx.now - hm["at"] <= window_ms(ctx)]
        if homes:
            forward(ctx, co, entry, full, homes[-1]["key"])
            return
    elif via in ("moved", "ref", "claim") or recent_optin(ctx, co):
        put(ctx, with_order(co, entry))
        match(ctx, entry)
        return
    _wait(ctx, co, entry)


def _again(ctx: Ctx, co: Checkout, known: KnownOrder, order: Order, compact: dict[str, Any],
           full: dict[str, Any], h: str) -> None:
    """A known order id: an update when its content changed."""
    if known["hash"] == h:
        ctx.note("duplicate", "order")
        return
    if order.updated_at is not None and known["v"] is not None and order.updated_at <= known["v"]:
        ctx.note("order", "stale")  # an older version arrived late (records not keyed by order id)
        return
    known = {**known, "v": order.updated_at if order.updated_at is not None else known["v"]}
    if known["to"] is not None:
        relay(ctx, known["to"], "order", order=full, via="ref", hash=h)
        put(ctx, with_order(co, {**known, "hash": h}))
        ctx.note("order", "forwarded")
        return
    if not known["matched"]:  # still waiting: the newer version waits instead
        put(ctx, with_order(co, {**known, "hash": h, "order": compact}))
        return
    kept = compact if known["order"] is not None else None
    put(ctx, with_order(co, {**known, "hash": h, "order": kept}))
    _update_message(ctx, known, compact)


def forward(ctx: Ctx, co: Checkout, entry: KnownOrder, full: dict[str, Any], home: str) -> None:
    """From a ref key to the opt-in's key (its updates will follow it)."""
    relay(ctx, home, "order", order=full, via="ref", hash=entry["hash"])
    put(ctx, with_order(co, {**entry, "order": None, "to": home}))
    ctx.note("order", "forwarded")


def _wait(ctx: Ctx, co: Checkout, entry: KnownOrder) -> None:
    """An order waits for its opt-in for the match window, if the key has room (else it is reported)."""
    waiting = waiting_orders(co)
    budget = PENDING_ORDER_BYTES if kind_of(ctx.key) == "psid" else PENDING_CHECKOUT_BYTES
    if len(waiting) >= ORDERS_MAX - 1 or sum(size(o["order"]) for o in waiting) + size(entry["order"]) > budget:
        _report(ctx, entry, "too_many_orders")
        return
    put(ctx, with_order(co, entry))
    ctx.note("order", "waiting")


# the match ---------------------------------------------------------------------------------------
def match(ctx: Ctx, entry: KnownOrder) -> None:
    """An order met its opt-in: the conversation (opened unless one is open), the purchase on the
    console, the receipt."""
    order = entry["order"]
    assert order is not None  # noqa: S101 - waiting orders keep theirs
    kind = kind_of(ctx.key)
    user_ref = user_ref_of(ctx.key)
    if ctx.st["conv"] is None:
        cid = checkout_conversation_id(ctx.page_id, user_ref) if user_ref else None
        lifecycle.open_with(ctx, ctx.route()[0], "optin", timestamp=ctx.now, conversation_id=cid, welcome=False,
                            user_ref=user_ref)
    conv = ctx.st["conv"]
    assert conv is not None  # noqa: S101 - opened above
    co = checkout_of(ctx.st)
    outbox_id = None
    if kind == "uref":
        allowed, reason = co["receipts"] == 0, "one_message_before_reply"
        recipient: dict[str, str] = {"user_ref": user_ref or ""}
    else:
        allowed = in_response_window(ctx.st["consumer_at"], ctx.now, ctx.config.messaging) and thread.may_send(ctx)
        reason = "window_closed"
        recipient = {"id": ctx.psid or ""}
    if allowed:
        message = receipt_message(order, ctx.config.optin.payment_method)
        outbox_id = ctx.outbound("system", {"recipient": recipient, "messaging_type": "RESPONSE",
                                            "message": message}, None, None)
        co = {**co, "receipts": co["receipts"] + (1 if kind == "uref" else 0)}
    keep = order if kind == "uref" else None  # a checkout key hands the order on when the person answers
    put(ctx, with_order(co, {**entry, "matched": True, "conversation_id": conv["id"], "order": keep}))
    ctx.console("purchase", order=purchase_summary(order), receipt_sent=allowed, outbox_id=outbox_id,
                reason=None if allowed else reason, user_ref=user_ref)
    ctx.note("order", "matched")


def _update_message(ctx: Ctx, known: KnownOrder, order: dict[str, Any]) -> None:
    """A matched order changed: a message to the customer under the window rules, and the console."""
    values = {"order_number": order["order_number"], "status": order.get("status") or "updated",
              "note": order.get("note") or ""}
    text = ctx.config.optin.update_text.format_map(values).strip()
    outbox_id = None
    if kind_of(ctx.key) != "psid":
        sent, reason = False, "no_reply_yet"
    elif not thread.may_send(ctx):
        sent, reason = False, "thread_not_owned"
    elif not in_response_window(ctx.st["consumer_at"], ctx.now, ctx.config.messaging):
        sent, reason = False, "window_closed"
    else:
        sent, reason = True, None
        outbox_id = ctx.outbound("system", {"recipient": {"id": ctx.psid}, "messaging_type": "UPDATE",
                                            "message": {"text": text}}, None, text)
    conv = ctx.st["conv"]
    cid = conv["id"] if conv is not None else known["conversation_id"]
    ctx.console("order_update", conversation_id=cid, order_id=order["order_id"], order_number=order["order_number"],
                status=order.get("status"), note=order.get("note"), text=text, sent=sent, reason=reason,
                outbox_id=outbox_id)
    ctx.note("order", "update_sent" if sent else "update_held")


def _report(ctx: Ctx, entry: KnownOrder, reason: str) -> None:
    """An order that met no opt-in: kept on `commerce.orders.unmatched` and shown on the console."""
    order = entry["order"] or {}
    totals = order.get("totals") or {}
    order_id = str(order.get("order_id"))
    value = {"order_id": order_id, "page_id": ctx.page_id, "reason": reason, "key": ctx.key,
             "user_ref": order.get("user_ref"), "psid": order.get("psid"), "ref": order.get("ref"),
             "order_number": order.get("order_number"), "total_cost": totals.get("total_cost"),
             "currency": order.get("currency"), "received_at": entry["at"], "reported_at": ctx.now, "order": order}
    ctx.outputs.append(Output("orders_unmatched", order_id, value))
    ctx.console("order_unmatched", conversation_id=None, order_id=order_id, order_number=order.get("order_number"),
                reason=reason, received_at=entry["at"])
    ctx.note("order", "unmatched")


# time --------------------------------------------------------------------------------------------
def on_timer(ctx: Ctx) -> None:
    """Orders whose match window passed are reported; stale opt-ins and homes are forgotten. A
    checkout or ref key remembers no person (nobody "returns" to it): compaction does not keep one."""
    unanswered = unanswered_until(ctx.st, ctx.key, ctx.config.optin.close_unanswered_after_hours)
    if unanswered is not None and unanswered <= ctx.now:
        lifecycle.close(ctx, closed_by="system", reason="no_reply", agent_id=None)
    if kind_of(ctx.key) != "psid" and ctx.st["conv"] is None:
        ctx.st["person"] = None
    co = ctx.st.get("checkout")
    if co is None:
        return
    window = window_ms(ctx)
    for waiting in waiting_orders(co):
        if waiting["at"] + window <= ctx.now:
            _report(ctx, waiting, "no_optin")
            co = {**co, "orders": [o for o in co["orders"] if o["id"] != waiting["id"]]}
    co = {**co, "optins": [at for at in co["optins"] if at + window > ctx.now],
          "homes": [hm for hm in co["homes"] if hm["at"] + window > ctx.now]}
    if co["moved_until"] is not None and co["moved_until"] <= ctx.now:
        co = {**co, "moved_to": None, "moved_until": None}
    put(ctx, co)


def unanswered_until(st: State, key: str, hours: int) -> int | None:
    """When a checkbox checkout's conversation closes if the person never answers (None: no such)."""
    conv = st["conv"]
    if conv is None or kind_of(key) != "uref":
        return None
    return conv["opened_at"] + hours * 3_600_000


def wakes(st: State, key: str, match_window_ms: int, unanswered_hours: int) -> list[int]:
    """When this part needs the stage: the end of each waiting order's match window, the close of
    an unanswered checkout conversation."""
    co = st.get("checkout")
    ends = [o["at"] + match_window_ms for o in waiting_orders(co)] if co is not None else []
    until = unanswered_until(st, key, unanswered_hours)
    if until is not None:
        ends.append(until)
    return ends


def compact(st: State, kept: State, now: int, match_window_ms: int, relink_ms: int) -> list[int]:
    """Keep at compaction what is still useful: waiting orders, opt-ins and homes inside the match
    window, matched orders (for their updates) and the forwarding for `optin.relink_days`;
    returns when the kept part expires."""
    co = st.get("checkout")
    if co is None:
        return []

    def end(o: KnownOrder) -> int:  # waiting orders end with their window, the others after relink_days
        return o["at"] + (match_window_ms if not o["matched"] and o["to"] is None else relink_ms)

    orders = [o for o in co["orders"] if end(o) > now]
    optins = [at for at in co["optins"] if at + match_window_ms > now]
    homes = [hm for hm in co["homes"] if hm["at"] + match_window_ms > now]
    moved = co["moved_until"] is not None and co["moved_until"] > now
    ends = [end(o) for o in orders]
    ends += [at + match_window_ms for at in optins] + [hm["at"] + match_window_ms for hm in homes]
    if moved and co["moved_until"] is not None:
        ends.append(co["moved_until"])
    if not ends:
        return []
    kept["checkout"] = {**co, "orders": orders, "optins": optins, "homes": homes,
                        "moved_to": co["moved_to"] if moved else None,
                        "moved_until": co["moved_until"] if moved else None}
    return ends

"""Checkout keys and their state part (#15): where opt-ins, orders and relays meet.

Keys (all `<page_id>:<...>`, so each lives on the partition its key hashes to):
- `<page>:<psid>` — a person (a Send to Messenger opt-in carries `sender.id`);
- `<page>:uref:<user_ref>` — a checkbox checkout: the plugin's opt-in names only a `user_ref`;
- `<page>:ref:<ref>` — a meeting point for orders that name only the opt-in's `ref`.

Keys talk through `conversations.relay` (`relay`): the runner writes a relay like any output (after
the state, re-sent with the same `relay_id` after a crash); the receiver applies a `relay_id` once.
The flow is in `optin` and `orders`; the design in docs/bots-and-optin.md.
"""

from __future__ import annotations

from typing import Any

import orjson

from schemas.commerce import Order
from streams.rules.conversation.api import Output
from streams.rules.conversation.context import Ctx, id_hash
from streams.rules.conversation.state import SEEN_MAX, State, short_hash
from streams.rules.conversation.state_bots import ORDERS_MAX, Checkout, KnownOrder, new_checkout
from streams.rules.dedupe import dedupe
from streams.rules.receipt import digest

UREF = "uref:"
REF = "ref:"
DAY_MS = 86_400_000
RELAY_TYPES = ("order", "optin_ref", "claim", "handoff", "action")


# keys --------------------------------------------------------------------------------------------
def key_of(page_id: str, *, psid: str | None = None, user_ref: str | None = None, ref: str | None = None) -> str:
    """The conversation key of a person, a checkbox checkout or a ref (in that order of preference)."""
    if psid:
        return f"{page_id}:{psid}"
    if user_ref:
        return f"{page_id}:{UREF}{user_ref}"
    if ref:
        return f"{page_id}:{REF}{ref}"
    raise ValueError("no psid, user_ref or ref to key on")


def order_key(order: Order) -> str:
    """Where an order meets its opt-in: the key its ids name."""
    return key_of(order.page_id, psid=order.psid, user_ref=order.user_ref, ref=order.ref)


def order_relay(order: Order) -> tuple[str, dict[str, Any]]:
    """(key, relay record) of a merchant order: what the orders router writes to `conversations.relay`.
    The `relay_id` is the order's content, so a merchant's repeated record is applied once."""
    full = order.model_dump(mode="json", exclude_none=True)
    h = digest(full)
    value = {"type": "order", "relay_id": f"order:{order.order_id}:{h}", "from": None, "order": full,
             "via": "merchant", "hash": h}
    return order_key(order), value


def kind_of(key: str) -> str:
    """`psid`, `uref` or `ref`: what a conversation key names."""
    rest = key.partition(":")[2]
    if rest.startswith(UREF):
        return "uref"
    if rest.startswith(REF):
        return "ref"
    return "psid"


def user_ref_of(key: str) -> str | None:
    rest = key.partition(":")[2]
    return rest[len(UREF):] if rest.startswith(UREF) else None


def checkout_conversation_id(page_id: str, user_ref: str) -> str:
    """The id of a checkbox checkout's conversation: the PSID key derives the same from `prior_message`."""
    return f"c-{id_hash(page_id + '|uref|' + user_ref, 20)}"


# state -------------------------------------------------------------------------------------------
def checkout_of(st: State) -> Checkout:
    return st.get("checkout") or new_checkout()


def put(ctx: Ctx, co: Checkout) -> None:
    ctx.st["checkout"] = co


def window_ms(ctx: Ctx) -> int:
    return ctx.config.optin.match_window_seconds * 1000


def relay(ctx: Ctx, target: str, type_: str, **fields: Any) -> None:
    """A record for another key (`conversations.relay`), with a `relay_id` stable across re-runs."""
    value = {"type": type_, "relay_id": ctx.next_id("rl"), "from": ctx.key, "at": ctx.now, **fields}
    ctx.outputs.append(Output("relay", target, value))
    ctx.note("relay", type_)


def seen_before(ctx: Ctx, ident: str) -> bool:
    seen = dict(ctx.st["seen"])
    limit = min(ctx.rules.max_keys, SEEN_MAX)
    if dedupe(seen, short_hash(ident), ctx.now // 1000, ctx.rules.horizon_ms // 1000, limit):
        return True
    ctx.st["seen"] = seen
    return False


def known_order(co: Checkout, order_id: str) -> KnownOrder | None:
    h = short_hash(order_id)
    return next((o for o in co["orders"] if o["id"] == h), None)


def with_order(co: Checkout, entry: KnownOrder) -> Checkout:
    """`co` with `entry` replacing the order of its id, or added; when more than `ORDERS_MAX` are
    known the oldest one not waiting goes (its later updates arrive as new orders)."""
    orders = [o for o in co["orders"] if o["id"] != entry["id"]]
    orders.append(entry)
    while len(orders) > ORDERS_MAX:
        drop = next((o for o in orders if o["matched"] or o["to"] is not None), orders[0])
        orders.remove(drop)
    return {**co, "orders": orders}


def waiting_orders(co: Checkout) -> list[KnownOrder]:
    """Orders at this key still waiting for their opt-in."""
    return [o for o in co["orders"] if not o["matched"] and o["to"] is None and o["order"] is not None]


def size(order: dict[str, Any] | None) -> int:
    return len(orjson.dumps(order)) if order is not None else 0


def recent_optin(ctx: Ctx, co: Checkout) -> bool:
    return any(ctx.now - at <= window_ms(ctx) for at in co["optins"])


def as_order(compact: dict[str, Any]) -> dict[str, Any]:
    """A compact order as an `Order` document again (the items kept, the bookkeeping fields out)."""
    return {k: v for k, v in compact.items() if k not in ("items_total", "items_omitted")}

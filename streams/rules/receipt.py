"""Merchant orders as the conversation keeps them, and Messenger's receipt template built from them.

`compact_order` keeps what the receipt and the agent need within `budget` bytes (items in order,
as many as fit; the count of the others in `items_omitted`), so an order fits the conversation
state's size budget. `receipt_message` builds the Send API `message` of a receipt template within
Meta's limits: at most 100 elements, texts cut at a word boundary, amounts as decimal numbers,
`timestamp` in seconds. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from schemas.commerce import ITEMS_MAX, Order
from streams.core.automessages import clamp

ORDER_BUDGET = 2_200  # bytes of one compact order in the state
TEXT_MAX = 80  # element titles and subtitles, like the generic template's
FIELD_MAX = 128  # recipient and merchant names, order number, payment method
URL_MAX = 1000


def digest(order: dict[str, Any]) -> str:
    """A short digest of an order's content: a changed digest under the same `order_id` is an update."""
    raw = orjson.dumps(order, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(raw, digest_size=6).hexdigest()


def _size(doc: dict[str, Any]) -> int:
    return len(orjson.dumps(doc))


def compact_order(order: Order, budget: int = ORDER_BUDGET) -> dict[str, Any]:
    """The order as kept, at most `budget` bytes: ids, names (cut), totals; then, while they fit, the
    shipping address, the items in order (the count of the others in `items_omitted`), the note,
    adjustments, the order URL. The billing address is not kept (the receipt has none)."""
    full = order.model_dump(mode="json", exclude_none=True)
    doc: dict[str, Any] = {k: full[k] for k in ("order_id", "page_id", "user_ref", "psid", "ref", "status",
                                               "currency", "created_at", "updated_at", "totals") if k in full}
    doc["order_number"] = clamp(order.order_number or order.order_id, FIELD_MAX // 2)
    for key in ("recipient_name", "merchant_name", "payment_method"):
        if key in full:
            doc[key] = clamp(full[key], TEXT_MAX)
    items: list[dict[str, Any]] = full.get("items", [])
    doc["items"] = []
    doc["items_total"] = len(items)
    used = _size(doc) + 24  # room for `"items_omitted":100`
    address = full.get("shipping_address")
    if address:
        short = {k: clamp(str(v), 60) for k, v in address.items()}
        if used + _size(short) + 22 <= budget:
            doc["shipping_address"] = short
            used += _size(short) + 22
    for item in items:
        item = {**item, "title": clamp(item["title"], TEXT_MAX)}
        if "subtitle" in item:
            item["subtitle"] = clamp(item["subtitle"], TEXT_MAX)
        if used + _size(item) + 1 > budget:
            item.pop("image_url", None)
            item.pop("subtitle", None)
            if used + _size(item) + 1 > budget:
                break
        doc["items"].append(item)
        used += _size(item) + 1
    if order.note and used + len(order.note.encode()) + 10 <= budget:
        doc["note"] = order.note
        used += len(order.note.encode()) + 10
    adjustments = []
    for adj in full.get("adjustments", []):
        adj = {"name": clamp(adj["name"], 40), "amount": adj["amount"]}
        if used + _size(adj) + 18 > budget:
            break
        adjustments.append(adj)
        used += _size(adj) + 1
    if adjustments:
        doc["adjustments"] = adjustments
        used += 16
    omitted = len(items) - len(doc["items"])
    if omitted:
        doc["items_omitted"] = omitted
    url = full.get("order_url")
    if url and used + len(url) + 16 <= budget:
        doc["order_url"] = url
    return doc


def _money(value: Any) -> float:
    return round(float(value), 2)


def receipt_message(order: dict[str, Any], payment_method_default: str) -> dict[str, Any]:
    """The Send API `message` of a receipt template for a compact order."""
    payload: dict[str, Any] = {
        "template_type": "receipt",
        "recipient_name": clamp(str(order["recipient_name"]), FIELD_MAX),
        "order_number": clamp(str(order.get("order_number") or order["order_id"]), FIELD_MAX),
        "currency": str(order["currency"]).upper(),
        "payment_method": clamp(str(order.get("payment_method") or payment_method_default), FIELD_MAX),
    }
    if order.get("merchant_name"):
        payload["merchant_name"] = clamp(str(order["merchant_name"]), FIELD_MAX)
    if order.get("order_url") and len(order["order_url"]) <= URL_MAX:
        payload["order_url"] = order["order_url"]
    if order.get("created_at"):
        payload["timestamp"] = str(int(order["created_at"]) // 1000)
    elements = []
    for item in order.get("items", [])[:ITEMS_MAX]:
        el: dict[str, Any] = {"title": clamp(str(item["title"]), TEXT_MAX), "quantity": int(item.get("quantity", 1)),
                              "price": _money(item["price"]),
                              "currency": str(item.get("currency") or order["currency"]).upper()}
        if item.get("subtitle"):
            el["subtitle"] = clamp(str(item["subtitle"]), TEXT_MAX)
        if item.get("image_url"):
            el["image_url"] = item["image_url"]
        elements.append(el)
    if elements:
        payload["elements"] = elements
    address = order.get("shipping_address")
    if address:
        payload["address"] = {k: str(address.get(k) or "") for k in
                              ("street_1", "street_2", "city", "postal_code", "state", "country")
                              if address.get(k) or k != "street_2"}
    totals = order["totals"]
    payload["summary"] = {k: _money(totals[k]) for k in ("subtotal", "shipping_cost", "total_tax", "total_cost")
                          if totals.get(k) is not None}
    adjustments = [{"name": clamp(str(a["name"]), TEXT_MAX), "amount": _money(a["amount"])}
                   for a in order.get("adjustments", [])]
    if adjustments:
        payload["adjustments"] = adjustments
    return {"attachment": {"type": "template", "payload": payload}}


def purchase_summary(order: dict[str, Any]) -> dict[str, Any]:
    """What the agent sees of a purchase (the compact order without the routing ids)."""
    return {k: v for k, v in order.items() if k not in ("page_id", "psid", "user_ref", "ref")}

"""Orders stage (#15): merchant orders to the key where they meet their opt-in, and the orders
that never met one.

- `route_orders` consumes `commerce.orders` (any key: merchants key as they like) and writes each
  valid order to `conversations.relay`, keyed by the conversation key its ids name
  (`streams.rules.conversation.checkout.order_relay`), where the conversation stage applies it. The
  relay record is acknowledged by Kafka before the order's offset can be committed (at-least-once);
  its `relay_id` is the order's content, so the conversation applies a repeated record once. An
  order that does not validate goes to the dead-letter topic (`invalid_order`) with its bytes.
- `GET /orders/unmatched` lists the orders the conversation stage reported on the compacted
  `commerce.orders.unmatched` (every worker follows the whole topic): newest first, `page` and
  `limit` filters. In memory: the newest `MAX_LISTED` orders, a summary of each.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from schemas.commerce import Order
from streams.core import metrics, serde
from streams.core.mirror import MirrorError, TopicMirror
from streams.rules.conversation.checkout import kind_of, order_relay
from streams.rules.normalize import short_error

if TYPE_CHECKING:
    from mode.types.signals import BaseSignalT

    from streams.stages.app import Pipeline

log = logging.getLogger("messenger_streams.orders")

MAX_LISTED = 10_000  # unmatched orders a worker keeps for GET /orders/unmatched (the newest)
LIST_LIMIT = 1_000  # the most one request returns
READY_SECONDS = 2.0  # how long GET /orders/unmatched waits for the mirror to catch up


def summary_of(value: bytes) -> dict[str, Any]:
    """The listed summary of one `commerce.orders.unmatched` value (ValueError when it is not one)."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or "order_id" not in doc:
        raise ValueError("not an unmatched order")
    kept = doc.get("order")
    order: dict[str, Any] = kept if isinstance(kept, dict) else {}
    keep = ("order_id", "page_id", "reason", "key", "user_ref", "psid", "ref", "order_number", "total_cost",
            "currency", "received_at", "reported_at")
    return {**{k: doc.get(k) for k in keep}, "recipient_name": order.get("recipient_name"),
            "items": order.get("items_total")}


class UnmatchedMirror(TopicMirror[dict[str, Any]]):
    """The unmatched orders of the whole cluster, at most `MAX_LISTED` (the oldest reported go first)."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        super().__init__(bootstrap_servers, topic, summary_of)
        self.evicted = 0

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        super().apply(key, value)
        while len(self._data) > MAX_LISTED:
            self._data.pop(next(iter(self._data)))
            self.evicted += 1

    def listing(self, page: str | None, limit: int) -> list[dict[str, Any]]:
        rows = [v for _, v in self.items() if page is None or v.get("page_id") == page]
        rows.sort(key=lambda r: int(r.get("reported_at") or 0), reverse=True)
        return rows[:limit]


def register(pipe: Pipeline) -> None:
    """Attach `route_orders`, the unmatched-orders mirror and `GET /orders/unmatched`."""
    app = pipe.app
    settings = pipe.settings
    relay_topic = settings.topics.name("relay")
    orders_in = metrics.BoundLabels(metrics.ORDERS_ROUTED)

    @app.agent(pipe.topic("orders"), name="route_orders")
    async def route_orders(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            raw = event.value if isinstance(event.value, bytes) else b""
            try:
                order = Order.model_validate_json(raw)
            except ValidationError as exc:
                await pipe.dead_letter(msg, "invalid_order", short_error(exc))
                orders_in.inc("invalid")
                continue
            key, value = order_relay(order)
            # acknowledged before the order's offset can be committed: nothing lost
            await app.producer.send_and_wait(relay_topic, key.encode(), serde.dumps(value), None, None, None)
            orders_in.inc(kind_of(key))

    mirror = UnmatchedMirror(settings.bootstrap_servers, settings.topics.name("orders_unmatched"))

    @app.task  # type: ignore[untyped-decorator]  # faust is untyped
    async def follow_unmatched() -> None:
        while True:
            try:
                await mirror.start()
                return
            except MirrorError as exc:
                log.warning("unmatched orders mirror: %s; retrying", exc)
                await asyncio.sleep(2.0)

    async def close(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        await mirror.stop()

    app.on_before_shutdown.connect(close)

    @app.page("/orders/unmatched")
    async def unmatched_page(web: Any, request: Any) -> Any:
        query = request.query
        try:
            limit = int(query.get("limit", 100))
            if not 1 <= limit <= LIST_LIMIT:
                raise ValueError(f"limit must be 1 to {LIST_LIMIT}")
        except ValueError as exc:
            return web.json({"error": f"bad query: {exc}", "param": "limit"}, status=400)
        complete = await mirror.wait_caught_up(READY_SECONDS)  # every report written so far is listed
        metrics.ORDERS_UNMATCHED_LISTED.set(len(mirror))
        return web.json({"orders": mirror.listing(query.get("page") or None, limit), "count": len(mirror),
                         "evicted": mirror.evicted, "complete": complete})

    pipe.extras["agents.route_orders"] = route_orders

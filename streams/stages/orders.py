"""Orders stage (#15): merchant orders to the key where they meet their opt-in, and the orders
that never met one.

- `route_orders` consumes `commerce.orders` (any key: merchants key as they like) in batches and
  writes each valid order to `conversations.relay`, keyed by the conversation key its ids name
  (`streams.rules.conversation.checkout.order_relay`), where the conversation stage applies it. A
  batch is acked (so committed) only after Kafka acknowledged every record written for it
  (at-least-once; a failed write ends the worker, like the ingest stage); the `relay_id` is the
  order's content, so the conversation applies a repeated record once. An order that does not
  validate goes to the dead-letter topic (`invalid_order`) with its bytes; one catch-all per record.
- `GET /orders/unmatched` lists the orders the conversation stage reported on the compacted
  `commerce.orders.unmatched` (every worker follows the whole topic): newest first, `page` and
  `limit` filters. In memory: the newest `MAX_LISTED` orders, a summary of each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from schemas.commerce import Order
from streams.core import metrics, serde
from streams.core.mirror import MirrorError, TopicMirror
from streams.rules.conversation.checkout import kind_of, order_relay
from streams.rules.normalize import short_error
from streams.stages.runtime import AppProducer, BatchRouter, Record, WriteFailed, crash_worker, is_too_large

if TYPE_CHECKING:
    from mode.types.signals import BaseSignalT

    from streams.stages.pipeline import Pipeline

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


class OrderRouter(BatchRouter):
    """Routes batches of merchant orders; every write's ack is awaited before the batch is acked."""

    what = "relay or dead-letter"

    def __init__(self, pipe: Pipeline, producer: AppProducer) -> None:
        settings = pipe.settings
        super().__init__(producer, settings.topics.name("dlq"), settings.dead_letter_max_bytes)
        self.relay_name = settings.topics.name("relay")
        self.routed = metrics.BoundLabels(metrics.ORDERS_ROUTED)

    async def _one(self, rec: Record, acks: list[Awaitable[Any]]) -> None:
        try:
            order = Order.model_validate_json(rec.value or b"")
            key, value = order_relay(order)
            payload = serde.dumps(value)
        except ValidationError as exc:
            await self._dead(rec, "invalid_order", short_error(exc), acks)
            self.routed.inc("invalid")
            return
        except Exception as exc:  # noqa: BLE001 - one record must never stop the router
            log.exception("cannot route order record %s: dead-lettered", rec.src)
            await self._dead(rec, "processing_error", f"{type(exc).__name__}: {exc}", acks)
            return
        try:
            acks.append(await self.producer.send(self.relay_name, key.encode(), payload))
        except Exception as exc:
            if not is_too_large(exc):
                raise WriteFailed(f"cannot send an order relay: {exc!r}") from exc
            await self._dead(rec, "invalid_order", "the order is too large for Kafka", acks)
            return
        self.routed.inc(kind_of(key))


def register(pipe: Pipeline) -> None:
    """Attach `route_orders`, the unmatched-orders mirror and `GET /orders/unmatched`."""
    app = pipe.app
    settings = pipe.settings
    router = OrderRouter(pipe, AppProducer(app))
    within = settings.batch_within_ms / 1000.0

    @app.agent(pipe.topic("orders"), name="route_orders")
    async def route_orders(stream: Any) -> None:
        async for events in stream.noack_take(settings.batch_max, within):
            records = [Record.of_event(e) for e in events]
            try:
                await router.run_batch(records)
            except Exception as exc:  # noqa: BLE001 - WriteFailed or a bug: never ack what was not written
                crash_worker(exc)
            for e in events:
                await stream.ack(e)

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

"""Ingest stage: raw webhook bodies → normalized events keyed by conversation.

- The agent `split_webhooks` reads `messenger.webhook.raw`, splits every entry and every
  `messaging` / `standby` item, normalizes them and writes each to `messenger.events.split`, keyed
  by `<page_id>:<psid>` (so one conversation lands on one partition). What cannot be processed
  goes to `messenger.dlq` with reason, error, source and the original bytes.
- Duplicates are dropped later, by the conversation stage (`streams.rules.dedupe`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from schemas.events import Source
from streams.core import metrics, serde
from streams.rules.normalize import split_body

if TYPE_CHECKING:
    from streams.stages.app import Pipeline


def _received_at(headers: Any, timestamp: float | None) -> int:
    for name, value in headers or ():
        if name == "received-at":
            try:
                return int(value)
            except (TypeError, ValueError):
                break
    return int((timestamp or time.time()) * 1000)


def register(pipe: Pipeline) -> None:
    """Attach the `split_webhooks` agent to the pipeline's app."""
    app = pipe.app
    settings = pipe.settings
    raw_topic = pipe.topic("raw")
    split_name = settings.topics.name("split")
    send = pipe.send
    split_latency = metrics.PROCESSING_LATENCY.labels("split")
    events_in = metrics.BoundLabels(metrics.EVENTS_IN)
    pages = pipe.pages

    @app.agent(raw_topic, name="split_webhooks")
    async def split_webhooks(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            raw: bytes = event.value if isinstance(event.value, bytes) else b""
            source = Source(topic=msg.topic, partition=msg.partition, offset=msg.offset)
            metrics.RAW_BODIES.inc()
            result = split_body(
                raw,
                max_bytes=settings.max_body_bytes,
                source=source,
                received_at=_received_at(msg.headers, msg.timestamp),
            )
            # #14: events of pages switched off / not connected become dead letters (page_disabled,
            # page_not_connected) with the raw body, so `dlq replay` brings them back
            admitted, blocked = pages.gate(result.events, int(time.time() * 1000))
            for ev in admitted:
                await send(split_name, ev.conversation_key.encode(), serde.dumps(ev))
                events_in.inc(ev.kind)
            for rej in [*result.rejected, *blocked]:
                await pipe.dead_letter(msg, rej.reason, rej.error, rej.item_index)
            split_latency.observe(max(0.0, time.time() - (msg.timestamp or time.time())))

    pipe.extras["agents.split_webhooks"] = split_webhooks

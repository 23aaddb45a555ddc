"""Ingest stage: raw webhook bodies → normalized events keyed by conversation, and dedupe.

- The agent `split_webhooks` reads `messenger.webhook.raw`, splits every entry and every
  `messaging` / `standby` item, normalizes them and writes each to `messenger.events.split`, keyed
  by `<page_id>:<psid>` (so one conversation lands on one partition). What cannot be processed
  goes to `messenger.dlq` with reason, error, source and the original bytes.
- `dedupe` is the pure duplicate check over one conversation's recently seen idempotency keys. The
  conversation stage applies it to every event before deciding, with the keys kept in the
  conversation's own state: one hop and one table write fewer per event than a dedupe agent of
  its own (see docs/benchmarks.md).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from schemas.dlq import DeadLetter
from schemas.events import Source
from streams import metrics, serde
from streams.normalize import split_body

if TYPE_CHECKING:
    from streams.app import Pipeline


def now_ms() -> int:
    return int(time.time() * 1000)


def dead_letter(
    raw: bytes, reason: str, error: str, source: Source, item_index: str | None = None
) -> DeadLetter:
    """The dead letter of one record (or one item of it), keeping the original bytes."""
    payload, encoding = serde.encode_payload(raw)
    return DeadLetter(
        reason=reason,
        error=error[:2000],
        source=source,
        payload=payload,
        payload_encoding=encoding,
        item_index=item_index,
        dead_lettered_at=now_ms(),
    )


def dedupe(seen: dict[str, int], idempotency_key: str, seen_at: int, horizon_ms: int, max_keys: int) -> bool:
    """True when `idempotency_key` is a duplicate; else records it in `seen` (changed in place).

    `seen` maps one conversation's recently seen keys to when they were seen (epoch ms, the raw
    record's receive time), oldest first. Keys older than the horizon relative to `seen_at` are
    pruned, and at most `max_keys` are kept (the oldest go first), so the state stays bounded by
    one conversation's traffic within the horizon.
    """
    first = seen.get(idempotency_key)
    if first is not None and seen_at - first <= horizon_ms:
        return True
    cutoff = seen_at - horizon_ms
    if seen and next(iter(seen.values())) < cutoff:  # insertion order ≈ arrival order: oldest first
        for key in [k for k, t in seen.items() if t < cutoff]:
            del seen[key]
    seen.pop(idempotency_key, None)  # a key seen again after the horizon moves to the end
    seen[idempotency_key] = seen_at
    while len(seen) > max_keys:
        del seen[next(iter(seen))]
    return False


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
            for ev in result.events:
                await send(split_name, ev.conversation_key.encode(), serde.dumps(ev))
                events_in.inc(ev.kind)
            for rej in result.rejected:
                await pipe.dead_letter(msg, rej.reason, rej.error, rej.item_index)
            split_latency.observe(max(0.0, time.time() - (msg.timestamp or time.time())))

    pipe.extras["agents.split_webhooks"] = split_webhooks

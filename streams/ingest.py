"""Ingest stage: raw webhook bodies → normalized, deduplicated events keyed by conversation.

Two agents:
- `split_webhooks` reads `messenger.webhook.raw`, splits every entry and every `messaging` /
  `standby` item, normalizes them and writes each to `messenger.events.split`, keyed by
  `<page_id>:<psid>` (so one conversation lands on one partition). What cannot be processed
  goes to `messenger.dlq` with reason, error, source and the original bytes.
- `dedupe_events` reads that topic and drops events whose idempotency key was seen within the
  horizon (table `seen_events`, keyed by conversation), writing the rest to `messenger.events`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from schemas.dlq import DeadLetter
from schemas.events import Source
from streams import metrics, serde
from streams.normalize import Rejected, split_body

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


@dataclass(frozen=True)
class DedupeDecision:
    """What to do with one event: forward it or not, and the conversation's new dedupe state."""

    duplicate: bool
    state: dict[str, Any]


def dedupe(
    state: dict[str, Any] | None, idempotency_key: str, seen_at: int, horizon_ms: int
) -> DedupeDecision:
    """Pure dedupe over one conversation's recently seen keys (`{"k": {key: seen_at_ms}}`).

    Keys older than the horizon (relative to `seen_at`, the raw record's receive time) are pruned,
    so the state stays bounded by the traffic of one conversation within the horizon.
    """
    seen: dict[str, int] = dict(state["k"]) if state else {}
    if idempotency_key in seen and seen_at - seen[idempotency_key] <= horizon_ms:
        return DedupeDecision(True, state or {"k": seen})
    cutoff = seen_at - horizon_ms
    if seen and next(iter(seen.values())) < cutoff:  # insertion order ≈ arrival order: oldest first
        seen = {k: t for k, t in seen.items() if t >= cutoff}
    seen.pop(idempotency_key, None)  # a key seen again after the horizon moves to the end
    seen[idempotency_key] = seen_at
    return DedupeDecision(False, {"k": seen})


def _received_at(headers: Any, timestamp: float | None) -> int:
    for name, value in headers or ():
        if name == "received-at":
            try:
                return int(value)
            except (TypeError, ValueError):
                break
    return int((timestamp or time.time()) * 1000)


def register(pipe: Pipeline) -> None:
    """Attach the ingest agents and the `seen_events` table to the pipeline's app."""
    app = pipe.app
    settings = pipe.settings
    raw_topic = pipe.topic("raw")
    split_topic = pipe.topic("split")
    split_name = settings.topics.name("split")
    events_name = settings.topics.name("events")
    dlq_name = settings.topics.name("dlq")
    send = pipe.send
    horizon_ms = settings.dedupe_horizon_seconds * 1000
    split_latency = metrics.PROCESSING_LATENCY.labels("split")
    events_in = metrics.BoundLabels(metrics.EVENTS_IN)
    dedupe_latency = metrics.PROCESSING_LATENCY.labels("dedupe")

    seen_events = app.Table("seen_events", default=None, partitions=settings.partitions)
    pipe.extras["seen_events"] = seen_events

    async def send_dead_letter(key: bytes | None, raw: bytes, rej: Rejected, source: Source) -> None:
        letter = dead_letter(raw, rej.reason, rej.error, source, rej.item_index)
        await send(dlq_name, key, serde.dumps(letter))
        metrics.DEAD_LETTERS.labels(rej.reason).inc()

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
                await send_dead_letter(msg.key, raw, rej, source)
            split_latency.observe(max(0.0, time.time() - (msg.timestamp or time.time())))

    @app.agent(split_topic, name="dedupe_events")
    async def dedupe_events(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                ev = serde.loads(event.value)
                key = ev["conversation_key"]
                decision = dedupe(seen_events.get(key), ev["idempotency_key"], ev["received_at"] or 0, horizon_ms)
            except (ValueError, KeyError, TypeError) as exc:
                await send_dead_letter(
                    msg.key,
                    event.value,
                    Rejected("processing_error", f"bad normalized event: {exc!r}"),
                    Source(topic=msg.topic, partition=msg.partition, offset=msg.offset),
                )
                continue
            if decision.duplicate:
                metrics.DUPLICATES.labels(ev["kind"]).inc()
                continue
            # Forward first, then record: the table's changelog write is flushed after the send,
            # so a crash between the two redelivers the event instead of losing it.
            await send(events_name, msg.key, event.value)
            seen_events[key] = decision.state
            dedupe_latency.observe(max(0.0, time.time() - (msg.timestamp or time.time())))

    pipe.extras["agents.split_webhooks"] = split_webhooks
    pipe.extras["agents.dedupe_events"] = dedupe_events

"""Ingest stage: raw webhook bodies → normalized events keyed by conversation.

- The agent `split_webhooks` reads `messenger.webhook.raw` in batches, splits every entry and every
  `messaging` / `standby` item, normalizes them and writes each to `messenger.events.split`, keyed
  by `<page_id>:<psid>` (so one conversation lands on one partition). What cannot be processed
  goes to `messenger.dlq` with reason, error, source and the original bytes (a bounded prefix
  plus size and SHA-256 when the body is too large for a dead letter, `streams.core.deadletter`).
- One catch-all per record: whatever a body does to the splitter, that body is dead-lettered and
  the batch goes on; a record too large for Kafka is dead-lettered, never retried.
- At-least-once: the batch's records are acked (and so committed) only after Kafka acknowledged
  every record written for them; a failed write ends the worker (`runtime.crash_worker`).
- Duplicates are dropped later, by the conversation stage (`streams.rules.dedupe`).
- Pages (issue 14): events of a page switched off, or of a page not connected when
  `routing.unknown_pages = "dead_letter"`, are dead-lettered here (`page_disabled` /
  `page_not_connected`, the raw body kept) by the live page directory's gate (`streams.stages.pages`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from schemas.events import NormalizedEvent, Source
from streams.core import metrics, serde
from streams.rules.normalize import Rejected, split_body
from streams.stages.runtime import AppProducer, BatchRouter, Record, WriteFailed, crash_worker, is_too_large

if TYPE_CHECKING:
    from streams.stages.pages import LivePages
    from streams.stages.pipeline import Pipeline

log = logging.getLogger("messenger_streams.ingest")


def received_at(headers: Sequence[tuple[str, Any]], timestamp_ms: int) -> int:
    """The `received-at` header (epoch ms, set by the webhook), else the record's timestamp."""
    for name, value in headers or ():
        if name == "received-at":
            try:
                return int(value)
            except (TypeError, ValueError):
                break
    return timestamp_ms


def split_record(rec: Record, max_body_bytes: int, pages: LivePages) -> tuple[list[NormalizedEvent], list[Rejected]]:
    """One raw body's events to take in and its dead letters (reason, error, item index): every
    item normalized or rejected, then the live page directory's gate (issue 14: events of pages
    switched off or not connected become `page_disabled` / `page_not_connected` dead letters with
    the raw body, so `dlq replay --reason …` brings them back). Counts the body. Raises on a bug only:
    the caller dead-letters the whole body."""
    metrics.RAW_BODIES.inc()
    source = Source(topic=rec.topic, partition=rec.partition, offset=rec.offset)
    at = received_at(rec.headers, rec.timestamp_ms)
    result = split_body(rec.value or b"", max_bytes=max_body_bytes, source=source, received_at=at)
    admitted, blocked = pages.gate(result.events, at)
    return admitted, [*result.rejected, *blocked]


class Splitter(BatchRouter):
    """Splits batches of raw bodies; every write's ack is awaited before the batch is acked."""

    what = "split or dead-letter"

    def __init__(self, pipe: Pipeline, producer: AppProducer) -> None:
        settings = pipe.settings
        super().__init__(producer, settings.topics.name("dlq"), settings.dead_letter_max_bytes)
        self.split_name = settings.topics.name("split")
        self.max_body_bytes = settings.max_body_bytes
        self.events_in = metrics.BoundLabels(metrics.EVENTS_IN)
        self.errors = metrics.BoundLabels(metrics.PROCESSING_ERRORS)
        self.pages = pipe.pages  # issue 14: the live page directory's gate

    async def _one(self, rec: Record, acks: list[Awaitable[Any]]) -> None:
        try:
            admitted, rejected = split_record(rec, self.max_body_bytes, self.pages)
        except Exception as exc:  # noqa: BLE001 - one body must never stop ingest; logged with traceback
            log.exception("cannot split raw record %s: dead-lettered", rec.src)
            self.errors.inc("split", type(exc).__name__)
            await self._dead(rec, "processing_error", f"{type(exc).__name__}: {exc}", acks)
            return
        for ev in admitted:
            try:
                value = serde.dumps(ev)
                acks.append(await self.producer.send(self.split_name, ev.conversation_key.encode(), value))
            except Exception as exc:
                if not is_too_large(exc) and not isinstance(exc, (TypeError, ValueError)):
                    raise WriteFailed(f"cannot send a split event: {exc!r}") from exc
                where = ev.source.index if ev.source is not None else None
                await self._dead(rec, "processing_error",
                                 f"event {where or ''} cannot be written: {type(exc).__name__}: {exc}", acks, where)
                continue
            self.events_in.inc(ev.kind)
        for rej in rejected:
            await self._dead(rec, rej.reason, rej.error, acks, rej.item_index)


def register(pipe: Pipeline) -> None:
    """Attach the `split_webhooks` agent to the pipeline's app, unless the conversation stage of
    this app splits the raw bodies itself (`Pipeline.one_hop`, issue 18)."""
    if pipe.one_hop:
        return
    app = pipe.app
    settings = pipe.settings
    raw_topic = pipe.topic("raw")
    splitter = Splitter(pipe, AppProducer(app))
    split_latency = metrics.PROCESSING_LATENCY.labels("split")
    within = settings.batch_within_ms / 1000.0

    @app.agent(raw_topic, name="split_webhooks")
    async def split_webhooks(stream: Any) -> None:
        async for events in stream.noack_take(settings.batch_max, within):
            records = [Record.of_event(e) for e in events]
            try:
                await splitter.run_batch(records)
            except Exception as exc:  # noqa: BLE001 - WriteFailed or a bug: never ack what was not written
                crash_worker(exc)
            for e in events:
                await stream.ack(e)
            now_ms = time.time() * 1000
            for rec in records:
                split_latency.observe(max(0.0, (now_ms - rec.timestamp_ms) / 1000.0))

    pipe.extras["agents.split_webhooks"] = split_webhooks

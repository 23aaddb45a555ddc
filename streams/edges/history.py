"""The history sink: `messenger-streams history sink`, its own process (not an agent in the worker).

It reads every skill topic (subscribed by pattern, so a skill added later is picked up within
`MESSENGER_STREAMS_HISTORY_TOPIC_REFRESH_MS` without a restart), `conversations.history` and
`csat.responses`, and writes them into PostgreSQL (`streams.history.store`), one transaction per
batch of up to `MESSENGER_STREAMS_HISTORY_BATCH_SIZE` records. Offsets are committed only after
the batch's transaction: a crash replays at most the uncommitted batch, and the writes are
idempotent (keys from event ids), so the rows end the same. More sinks in the same consumer group
share the partitions; sinks in different groups (or during a rebalance) may write the same records
at once, which leaves the same rows too.

Why a process of its own: the database's pace (or an outage) never stalls the conversation
stage, the sink scales on its own, and a plain consumer can subscribe by pattern without faust's
table and rebalance machinery.

A record that is not a console event, summary or CSAT answer goes to the dead-letter topic (reason
`history_invalid_record`) and is skipped; a database outage is retried with backoff (nothing is
skipped, nothing is committed meanwhile). Every `history.retention_check_seconds` it deletes the
conversations idle longer than `history.retain_days`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord
from psycopg_pool import PoolTimeout

from schemas.events import Source
from streams.core import metrics, serde
from streams.core.config import ConnectorConfig
from streams.core.deadletter import dead_letter
from streams.core.settings import Settings
from streams.history.store import HistoryStore
from streams.rules.history import Batch, RecordError, Src, decode

log = logging.getLogger("messenger_streams.history")

INVALID_REASON = "history_invalid_record"
WRITE_REASON = "history_write_error"
BACKOFF_MAX = 30.0

Kind = Literal["skill", "history", "csat"]
Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


def topic_pattern(settings: Settings) -> str:
    """The regular expression of every topic the sink reads."""
    t = settings.topics
    return (f"^(?:{re.escape(t.skill(''))}.+|{re.escape(t.name('history'))}"
            f"|{re.escape(t.name('csat_responses'))})$")


def topic_kind(settings: Settings, topic: str) -> Kind:
    if topic == settings.topics.name("history"):
        return "history"
    if topic == settings.topics.name("csat_responses"):
        return "csat"
    return "skill"


@dataclass
class SinkStats:
    records: int = 0
    batches: int = 0
    invalid: int = 0
    retries: int = 0


class HistorySink:
    """A consumer group member that writes its partitions' records to the store."""

    def __init__(
        self,
        settings: Settings,
        config: ConnectorConfig,
        store: HistoryStore,
        *,
        group: str | None = None,
        batch_size: int | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.config = config
        self.store = store
        self.group = group or settings.history_group or f"{settings.app_id}-history"
        self.batch_size = batch_size or settings.history_batch_size
        self.now = now
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.stats = SinkStats()
        self._pattern = topic_pattern(settings)

    async def start(self, timeout: float = 30.0) -> None:
        """Connect to Kafka and subscribe; raises ConnectionError when Kafka cannot be reached."""
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=self.settings.history_topic_refresh_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self.producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap_servers, acks="all")
        try:
            await asyncio.wait_for(self.consumer.start(), timeout)
            await asyncio.wait_for(self.producer.start(), timeout)
        except (TimeoutError, KafkaError, OSError) as exc:
            await self.stop()
            raise ConnectionError(f"cannot reach Kafka at {self.settings.bootstrap_servers}: "
                                  f"{type(exc).__name__}") from None
        self.consumer.subscribe(pattern=self._pattern)

    async def stop(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self.consumer = self.producer = None

    # one batch ------------------------------------------------------------------------------------
    def build(self, records: list[Record]) -> tuple[Batch, list[tuple[Record, str]]]:
        """The rows of some records, and the records that cannot be stored (with the reason)."""
        batch = Batch()
        bad: list[tuple[Record, str]] = []
        for rec in records:
            try:
                batch.add(topic_kind(self.settings, rec.topic), decode(rec.value),
                          Src(rec.topic, rec.partition, rec.offset))
            except RecordError as exc:
                bad.append((rec, str(exc)))
        retain_days = self.config.history.retain_days
        if retain_days:
            batch.drop_older_than(int(self.now() * 1000) - retain_days * 86_400_000)
        return batch, bad

    async def dead_letter(self, rec: Record, reason: str, error: str) -> None:
        assert self.producer is not None  # noqa: S101 - started
        letter = dead_letter(rec.value or b"", reason, error,
                             Source(topic=rec.topic, partition=rec.partition, offset=rec.offset))
        await self.producer.send_and_wait(self.settings.topics.name("dlq"), serde.dumps(letter), key=rec.key)
        metrics.DEAD_LETTERS.labels(reason).inc()
        self.stats.invalid += 1
        log.warning("history sink: dead-lettered %s/%d@%d: %s", rec.topic, rec.partition, rec.offset, error)

    async def write(self, records: list[Record], stop: asyncio.Event) -> bool:
        """Write the records; False when `stop` was set while the database was unreachable."""
        batch, bad = self.build(records)
        for rec, error in bad:
            await self.dead_letter(rec, INVALID_REASON, error)
        delay = 0.5
        while True:
            try:
                await self.store.write(batch)
                return True
            except (psycopg.OperationalError, PoolTimeout) as exc:
                self.stats.retries += 1
                log.warning("history sink: database unavailable (%s); retrying in %.1f s",
                            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, delay)
            except psycopg.Error as exc:
                # one record the database refuses (a value out of range...): find it, dead-letter it
                log.warning("history sink: batch refused (%s); writing its records one by one", type(exc).__name__)
                await self._write_one_by_one(records, bad)
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return False
            delay = min(delay * 2, BACKOFF_MAX)

    async def _write_one_by_one(
        self, records: list[Record], bad: list[tuple[Record, str]]
    ) -> None:
        skip = {id(rec) for rec, _ in bad}
        for rec in records:
            if id(rec) in skip:
                continue
            batch, _ = self.build([rec])
            try:
                await self.store.write(batch)
            except (psycopg.OperationalError, PoolTimeout):
                raise
            except psycopg.Error as exc:
                await self.dead_letter(rec, WRITE_REASON, f"{type(exc).__name__}: {exc}")

    # the loop -------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, *, idle: Callable[[], Awaitable[None]] | None = None) -> None:
        """Consume and write until `stop` is set. `idle` is awaited whenever a poll returns nothing."""
        consumer = self.consumer
        if consumer is None:
            raise RuntimeError("start() the sink first")
        while not stop.is_set():
            polled = await consumer.getmany(timeout_ms=500, max_records=self.batch_size)
            records = [rec for recs in polled.values() for rec in recs]
            if not records:
                if idle is not None:
                    await idle()
                continue
            if not await self.write(records, stop):
                return
            offsets = {tp: recs[-1].offset + 1 for tp, recs in polled.items() if recs}
            try:
                await consumer.commit(offsets)
            except CommitFailedError as exc:
                # partitions moved to another sink: it re-reads from the last commit (idempotent)
                log.info("history sink: commit after a rebalance failed (%s); records will be re-read", exc)
            self.stats.records += len(records)
            self.stats.batches += 1


async def retention_loop(store: HistoryStore, config: ConnectorConfig, stop: asyncio.Event) -> None:
    """Delete old conversations now and then every `history.retention_check_seconds` until stopped."""
    days = config.history.retain_days
    if not days:
        return
    while not stop.is_set():
        try:
            erased = await store.retain(days)
            if any(erased.values()):
                log.warning("history retention (%d days): deleted %s", days, erased)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.warning("history retention: database unavailable (%s)", type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), config.history.retention_check_seconds)


async def serve(settings: Settings, config: ConnectorConfig, dsn: str, stop: asyncio.Event) -> None:
    """The `history sink` process: migrate, consume until stopped, retention alongside."""
    store = HistoryStore(dsn)
    await store.open()  # StoreError (a ConnectionError) when unreachable or newer than this program
    sink = HistorySink(settings, config, store)
    try:
        await sink.start()
        log.warning("history sink: group %s reading /%s/, schema version %d",
                    sink.group, sink._pattern, await store.schema_version())
        retention = asyncio.create_task(retention_loop(store, config, stop), name="history-retention")
        try:
            await sink.run(stop)
        finally:
            stop.set()
            retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retention
    finally:
        await sink.stop()
        await store.close()

"""The dispatcher's sent log on Kafka: what was sent, per conversation, surviving restarts and
moving with the partition.

A compacted topic (`messenger.dispatch.sent`, cleanup `compact,delete`) with exactly as many
partitions as `messenger.outbound`; what the dispatcher does with a record of outbound partition p is
written to partition p (explicitly, not by the key's hash), so whoever owns outbound partition p
reads everything about its conversations from log partition p. The records and their fold are pure
(`streams.rules.sendapi.SentLog`); this module writes them (idempotent `acks=all` producer, each write
awaited) and follows the partitions the dispatcher owns with a group-less consumer.

`acquire(partitions)` (on assignment): read each partition from the beginning (or from where this
process stopped reading it, when it had it before), write a claim record with a fresh owner token and
read through it, so the in-memory log holds every record written before this owner took over.
`release(partitions)` (on revoke): stop following; the fold is kept until the next assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from streams.core import metrics
from streams.rules.sendapi import CLAIM_KEY, SentLog, SentLogBounds, claim_value

log = logging.getLogger("messenger_streams.dispatch")

HOUR_MS = 3_600_000


class SentLogError(ConnectionError):
    """The sent log cannot be read or written: the dispatcher must stop (nothing is sent unrecorded)."""


def topic_configs(bounds: SentLogBounds) -> dict[str, str]:
    """Compacted (one record per outbox id) and deleted after the log's horizon (`keep_ms`)."""
    return {
        "cleanup.policy": "compact,delete",
        "retention.ms": str(bounds.keep_ms),
        "segment.ms": str(min(HOUR_MS, bounds.keep_ms)),
    }


async def ensure_sent_log_topic(
    bootstrap: str, topic: str, outbound_topic: str, bounds: SentLogBounds, replication_factor: int,
    timeout: float = 30.0,
) -> int:
    """Create the sent-log topic with as many partitions as the outbound topic (which must exist),
    or check that the existing one has as many; returns that number. Raises SentLogError."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        try:
            await asyncio.wait_for(admin.start(), timeout)
            deadline = time.monotonic() + timeout
            while True:  # a topic created a moment ago may not be in every broker's metadata yet
                existing = set(await admin.list_topics())  # describing a missing topic could auto-create it
                described = await admin.describe_topics([t for t in (outbound_topic, topic) if t in existing])
                counts = {d["topic"]: len(d.get("partitions") or []) for d in described if not d.get("error_code")}
                if counts.get(outbound_topic) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise SentLogError(f"cannot reach Kafka at {bootstrap}: {type(exc).__name__}") from None
        wanted = counts.get(outbound_topic, 0)
        if not wanted:
            raise SentLogError(f"topic {outbound_topic} does not exist")
        have = counts.get(topic, 0)
        if have and have != wanted:
            raise SentLogError(
                f"the sent log {topic} has {have} partitions but {outbound_topic} has {wanted}: they must be "
                f"co-partitioned (add partitions to {topic} to match before starting the dispatcher)"
            )
        if not have:
            resp = await admin.create_topics(
                [NewTopic(topic, wanted, replication_factor, topic_configs=topic_configs(bounds))],
                timeout_ms=int(timeout * 1000),
            )
            for name, code, message in getattr(resp, "topic_errors", []):
                if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (another dispatcher created it)
                    raise SentLogError(f"cannot create topic {name}: error {code} {message or ''}".strip())
        return wanted
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


class SentLedger:
    """The sent log of the partitions this dispatcher owns: fold in memory, writes to Kafka."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        producer: AIOKafkaProducer,
        bounds: SentLogBounds,
        *,
        timeout: float = 30.0,
        prune_every: float = 60.0,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.producer = producer
        self.bounds = bounds
        self.timeout = timeout
        self.prune_every = prune_every
        self.logs: dict[int, SentLog] = {}
        self.assigned: set[int] = set()
        self.error: BaseException | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._applied = asyncio.Condition()
        self._has_work = asyncio.Event()
        self._known: set[int] = set()
        self._evicted = 0  # evictions counted so far (over the folds held)

    # life cycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
            request_timeout_ms=int(self.timeout * 1000),
        )
        try:
            await asyncio.wait_for(self._consumer.start(), self.timeout)
        except (TimeoutError, KafkaError, OSError) as exc:
            await self.stop()
            raise SentLogError(f"cannot reach Kafka at {self.bootstrap_servers}: {type(exc).__name__}") from None
        self._task = asyncio.create_task(self._follow(), name=f"sent-log:{self.topic}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def entries(self) -> int:
        """Outbox ids held in memory, over the partitions kept."""
        return sum(len(lg) for lg in self.logs.values())

    # ownership ----------------------------------------------------------------------------------
    async def acquire(self, partitions: set[int]) -> dict[int, str]:
        """Follow `partitions` too, claim each with a fresh owner token and read it through the claim;
        returns partition → token. Folds of partitions neither kept nor acquired are dropped."""
        consumer = self._need_consumer()
        async with self._lock:
            for p in list(self.logs):
                if p not in partitions and p not in self.assigned:
                    del self.logs[p]
            self.assigned |= partitions
            consumer.assign([TopicPartition(self.topic, p) for p in sorted(self.assigned)])
            for p in sorted(self.assigned):
                tp = TopicPartition(self.topic, p)
                lg = self.logs.get(p)
                if lg is None:
                    self.logs[p] = SentLog(self.bounds)
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, lg.position)
            if self.assigned:
                self._has_work.set()
        tokens = {p: uuid.uuid4().hex for p in partitions}
        started = time.monotonic()
        claims = [self.write(p, CLAIM_KEY, claim_value(t, _now_ms())) for p, t in tokens.items()]
        offsets = await asyncio.gather(*claims)
        await asyncio.gather(*(self.wait_applied(p, off) for p, off in zip(tokens, offsets, strict=True)))
        if partitions:
            log.info("sent log: claimed partitions %s (%d ids in memory) in %.2fs", sorted(partitions),
                     self.entries(), time.monotonic() - started)
        return tokens

    async def release(self, partitions: set[int]) -> None:
        """Stop following `partitions` (their folds are kept for a quick re-acquire)."""
        consumer = self._consumer
        async with self._lock:
            self.assigned -= partitions
            if consumer is not None:
                consumer.assign([TopicPartition(self.topic, p) for p in sorted(self.assigned)])
                for p in self.assigned:
                    consumer.seek(TopicPartition(self.topic, p), self.logs[p].position)
            if not self.assigned:
                self._has_work.clear()

    def log(self, partition: int) -> SentLog:
        lg = self.logs.get(partition)
        if lg is None:
            raise SentLogError(f"partition {partition} of {self.topic} is not acquired")
        return lg

    # writing and reading back ----------------------------------------------------------------------
    async def write(self, partition: int, key: bytes, value: bytes | None) -> int:
        """Write one record to `partition` and wait for Kafka's ack; its offset. Raises SentLogError."""
        await self._know_partition(partition)
        for attempt in range(1, 6):
            try:
                meta = await asyncio.wait_for(
                    self.producer.send_and_wait(self.topic, value, key=key, partition=partition), self.timeout
                )
                return int(meta.offset)
            except (KafkaError, TimeoutError) as exc:
                if attempt == 5:
                    raise SentLogError(f"cannot write the sent log {self.topic}: {type(exc).__name__}") from None
                await asyncio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _know_partition(self, partition: int) -> None:
        """The producer's metadata must list the partition before an explicit-partition send (a topic
        created a moment ago may not be complete in it yet)."""
        if partition in self._known:
            return
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                known = await asyncio.wait_for(self.producer.partitions_for(self.topic), self.timeout)
            except (KafkaError, TimeoutError) as exc:
                raise SentLogError(f"no metadata for {self.topic}: {type(exc).__name__}") from None
            if partition in known:
                self._known = set(known)
                return
            if time.monotonic() > deadline:
                raise SentLogError(f"partition {partition} of {self.topic} does not exist")
            await self.producer.client.force_metadata_update()
            await asyncio.sleep(0.2)

    async def wait_applied(self, partition: int, offset: int, timeout: float | None = None) -> None:
        """Wait until the fold of `partition` has applied the record at `offset` (and all before it)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        async with self._applied:
            while True:
                if self.error is not None:
                    raise SentLogError(f"the sent log {self.topic} cannot be read: {self.error}")
                lg = self.logs.get(partition)
                if lg is None or partition not in self.assigned:
                    raise SentLogError(f"partition {partition} of {self.topic} was released while waiting")
                if lg.position > offset:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SentLogError(
                        f"the sent log {self.topic}[{partition}] did not reach offset {offset} "
                        f"(at {lg.position}) within {timeout or self.timeout:.0f}s"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._applied.wait(), left)

    async def _follow(self) -> None:
        consumer = self._need_consumer()
        last_prune = time.monotonic()
        while True:
            await self._has_work.wait()
            try:
                async with self._lock:
                    batch = await consumer.getmany(timeout_ms=100, max_records=5000)
                    for tp, records in batch.items():
                        lg = self.logs.get(tp.partition)
                        if lg is None or tp.partition not in self.assigned:
                            continue
                        for rec in records:
                            if rec.offset >= lg.position:
                                lg.apply(rec.offset, rec.key, rec.value)
            except KafkaError as exc:
                log.warning("sent log %s: %s; retrying", self.topic, type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            except Exception as exc:  # noqa: BLE001 - waiters must learn that the log is not followed
                self.error = exc
                log.error("sent log %s: cannot follow: %s: %s", self.topic, type(exc).__name__, exc)
                async with self._applied:
                    self._applied.notify_all()
                return
            if batch:
                async with self._applied:
                    self._applied.notify_all()
                evicted = sum(lg.evicted for lg in self.logs.values())
                if evicted > self._evicted:
                    metrics.SENT_LOG_EVICTED.inc(evicted - self._evicted)
                self._evicted = evicted
            if time.monotonic() - last_prune >= self.prune_every:
                last_prune = time.monotonic()
                now = _now_ms()
                dropped = sum(lg.prune(now) for lg in self.logs.values())
                metrics.SENT_LOG_IDS.set(self.entries())
                if dropped:
                    log.info("sent log: forgot %d ids older than %d days", dropped, self.bounds.keep_ms // 86_400_000)

    def _need_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise SentLogError("start() the sent ledger first")
        return self._consumer


def _now_ms() -> int:
    return int(time.time() * 1000)

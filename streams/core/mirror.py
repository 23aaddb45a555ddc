"""A live, read-only copy of a compacted topic in any process: key → latest value, all partitions.

Used where every process needs the whole of a small keyed data set, whoever wrote it: the connected
pages (every worker and every dispatcher), and the CSAT cells that each worker's partitions write
(so `/csat` answers for the whole cluster on any worker).

It is a plain aiokafka consumer without a consumer group: it assigns itself every partition of the
topic, reads from the beginning, and keeps following. A record with a null value (a tombstone)
deletes its key. `wait_ready()` returns once it has read up to the end offsets the topic had when
it started, so a process can refuse to serve before it knows the data. Memory is bounded by the
topic's key space (one entry per live key), which is what compaction keeps on the broker too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

log = logging.getLogger("messenger_streams.mirror")

V = TypeVar("V")


class MirrorError(ConnectionError):
    """The topic could not be read (Kafka unreachable, topic missing)."""


class TopicMirror(Generic[V]):
    """key (str) → decoded value of the newest record of that key, for every partition of `topic`.

    `decode(bytes) -> V` raises ValueError for a value it cannot read; such a record is skipped and
    counted in `skipped` (the previous value of its key stays). `on_change(key, value_or_None)` is
    called for every applied record, in log order per partition."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        decode: Callable[[bytes], V],
        *,
        on_change: Callable[[str, V | None], None] | None = None,
        poll_ms: int = 200,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self._decode = decode
        self._on_change = on_change
        self._poll_ms = poll_ms
        self._data: dict[str, V] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._targets: dict[TopicPartition, int] = {}
        self.partitions: list[int] = []
        self.skipped = 0
        self.records = 0
        self._waiters: list[tuple[dict[TopicPartition, int], asyncio.Future[bool]]] = []

    # reading ----------------------------------------------------------------------------------
    def get(self, key: str) -> V | None:
        return self._data.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def items(self) -> Iterator[tuple[str, V]]:
        return iter(list(self._data.items()))

    @property
    def ready(self) -> bool:
        """True once everything the topic held at start-up has been read."""
        return self._ready.is_set()

    # life cycle -------------------------------------------------------------------------------
    async def start(self, timeout: float = 30.0) -> None:
        """Connect, assign every partition from the beginning, and start following in the background.

        Raises MirrorError when Kafka cannot be reached or the topic does not exist within `timeout`."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
            request_timeout_ms=int(timeout * 1000),
        )
        try:
            await asyncio.wait_for(consumer.start(), timeout)
            parts = await asyncio.wait_for(self._partitions(consumer), timeout)
        except (TimeoutError, KafkaError, OSError) as exc:
            with contextlib.suppress(Exception):
                await consumer.stop()
            where = f"topic {self.topic} at {self.bootstrap_servers}"
            raise MirrorError(f"cannot read {where}: {type(exc).__name__}") from None
        tps = [TopicPartition(self.topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        self._targets = {tp: off for tp, off in ends.items() if off > 0}
        self.partitions = sorted(parts)
        self._consumer = consumer
        if not self._targets:
            self._ready.set()
        self._task = asyncio.create_task(self._follow(), name=f"mirror:{self.topic}")

    async def _partitions(self, consumer: AIOKafkaConsumer) -> set[int]:
        while True:
            parts = consumer.partitions_for_topic(self.topic)
            if parts:
                return set(parts)
            await consumer._client.force_metadata_update()  # noqa: SLF001 - the public call caches a miss
            parts = consumer.partitions_for_topic(self.topic)
            if parts:
                return set(parts)
            await asyncio.sleep(0.2)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the start-up contents are read; False when `timeout` passed first."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

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

    # following --------------------------------------------------------------------------------
    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one record (also used by tests): a tombstone deletes, a bad value is skipped."""
        if key is None:
            self.skipped += 1
            return
        k = key.decode("utf-8", "replace")
        self.records += 1
        if value is None:
            if self._data.pop(k, None) is not None and self._on_change is not None:
                self._on_change(k, None)
            return
        try:
            decoded = self._decode(value)
        except ValueError as exc:
            self.skipped += 1
            log.warning("mirror of %s: skipped the value of key %r: %s", self.topic, k, exc)
            return
        self._data[k] = decoded
        if self._on_change is not None:
            self._on_change(k, decoded)

    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None  # noqa: S101 - set by start() before this task runs
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=self._poll_ms, max_records=5000)
            except KafkaError as exc:
                log.warning("mirror of %s: %s; retrying", self.topic, exc)
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for rec in records:
                    self.apply(rec.key, rec.value)
            if not self._ready.is_set():
                await self._check_ready(consumer)
            if self._waiters:
                await self._check_waiters(consumer)

    async def _check_ready(self, consumer: AIOKafkaConsumer) -> None:
        for tp, end in list(self._targets.items()):
            if await consumer.position(tp) >= end:
                del self._targets[tp]
        if not self._targets:
            self._ready.set()

    # catching up (added for GET /csat) ---------------------------------------------------------
    async def wait_caught_up(self, timeout: float) -> bool:
        """Wait until this copy has applied every record the topic held when called (the end offsets
        of all its partitions then). False when `timeout` passed first or the mirror is not running."""
        consumer, task = self._consumer, self._task
        if consumer is None or task is None or task.done():
            return False
        tps = [TopicPartition(self.topic, p) for p in self.partitions]
        try:
            ends = await asyncio.wait_for(consumer.end_offsets(tps), timeout)
        except (TimeoutError, KafkaError):
            return False
        targets = {tp: off for tp, off in ends.items() if off > 0}
        if not targets:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (targets, waiter)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return False
        finally:
            self._waiters.remove(entry)

    async def _check_waiters(self, consumer: AIOKafkaConsumer) -> None:
        # runs in the follow task right after a batch is applied, so positions are applied offsets
        for targets, waiter in list(self._waiters):
            for tp, end in list(targets.items()):
                if await consumer.position(tp) >= end:
                    del targets[tp]
            if not targets and not waiter.done():
                waiter.set_result(True)

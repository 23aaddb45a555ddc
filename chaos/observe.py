"""What came out: one consumer (no group) reads every output topic of a scenario from the start and
indexes it; the traffic driver waits on console events through it, the audit counts from it.

Helpers over the fake Graph API of tests/fakegraph.py (used as is, with a Graph-like answer delay):
a message counts as delivered when the fake answered it 200, whether or not the dispatcher lived to
read the answer — the definition the dispatcher's own tests use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import murmur2
from aiokafka.structs import TopicPartition

from tests.fakegraph import FakeGraph, GraphRequest

log = logging.getLogger("chaos")

Pred = Callable[[dict[str, Any]], bool]
CID = "\x00cid:"  # prefix of a waiter index by conversation_id (record keys never start with it)


def partition_of(key: str | bytes, partitions: int) -> int:
    """Kafka's default partition of a key (what the worker's producer and ours use)."""
    raw = key.encode() if isinstance(key, str) else key
    return int(murmur2(raw) & 0x7FFFFFFF) % partitions


@dataclass
class Console:
    """One console event as read: the parsed value plus where and when it was written."""

    value: dict[str, Any]
    topic: str
    partition: int
    offset: int
    ts_ms: int


@dataclass
class Letter:
    """One dead letter, its payload reduced to length + SHA-256 (2 MB bodies are not kept)."""

    reason: str
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    item_index: str | None
    payload_len: int
    payload_sha256: str
    fields: dict[str, Any]  # the letter without its payload (size / sha256 fields of oversized ones)
    inner_source: tuple[int, int] | None = None  # for a normalized event's letter: its raw (partition, offset)
    ts_ms: int = 0


@dataclass
class Observer:
    """Reads the scenario's output topics; `topics` maps a role to topic names."""

    bootstrap: str
    partitions: int
    skill_topics: list[str]
    split_topic: str
    dlq_topic: str
    outbound_topic: str
    raw_topic: str
    console: dict[str, list[Console]] = field(default_factory=lambda: defaultdict(list))  # by record key
    by_conversation: dict[str, list[Console]] = field(default_factory=lambda: defaultdict(list))  # by conversation_id
    console_count: int = 0
    console_ts: list[int] = field(default_factory=list)  # create times of console records (ms), in read order
    split_sources: dict[tuple[int, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    split_first_after: list[tuple[int, int]] = field(default_factory=list)  # (ts_ms, raw partition)
    console_by_partition: list[tuple[int, int]] = field(default_factory=list)  # (ts_ms, key partition)
    letters: list[Letter] = field(default_factory=list)
    outbound: list[dict[str, Any]] = field(default_factory=list)
    errors: int = 0
    _waiters: dict[str, list[tuple[Pred, asyncio.Future[Console]]]] = field(default_factory=lambda: defaultdict(list))
    _task: asyncio.Task[None] | None = None
    _consumer: AIOKafkaConsumer | None = None
    _stop: bool = False
    last_record_at: float = 0.0

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            fetch_max_wait_ms=100,
            request_timeout_ms=60_000,
        )
        await self._consumer.start()
        topics = [*self.skill_topics, self.split_topic, self.dlq_topic, self.outbound_topic]
        tps = [TopicPartition(t, p) for t in topics for p in range(self.partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run(), name="observer")

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()

    async def _run(self) -> None:
        assert self._consumer is not None
        skill = set(self.skill_topics)
        while not self._stop:
            try:
                batch = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker restarts under us: keep reading
                self.errors += 1
                log.debug("observer: %r", exc)
                await asyncio.sleep(0.5)
                continue
            for tp, records in batch.items():
                for r in records:
                    self.last_record_at = time.time()
                    try:
                        if tp.topic in skill:
                            self._on_console(r)
                        elif tp.topic == self.split_topic:
                            self._on_split(r)
                        elif tp.topic == self.dlq_topic:
                            self._on_letter(r)
                        else:
                            self._on_outbound(r)
                    except (ValueError, TypeError, KeyError, AttributeError) as exc:
                        self.errors += 1
                        log.warning("observer: unreadable record at %s[%d]@%d: %r", tp.topic, tp.partition,
                                    r.offset, exc)

    def _on_console(self, r: Any) -> None:
        value = orjson.loads(r.value)
        key = r.key.decode("utf-8", "replace") if r.key else ""
        c = Console(value, r.topic, r.partition, r.offset, int(r.timestamp))
        self.console[key].append(c)
        cid = value.get("conversation_id")
        if cid:  # also by conversation: an event may be keyed otherwise (e.g. by the CSAT stage)
            self.by_conversation[str(cid)].append(c)
        self.console_count += 1
        self.console_by_partition.append((c.ts_ms, partition_of(key, self.partitions) if key else r.partition))
        for index in (key, f"{CID}{cid}") if cid else (key,):
            waiters = self._waiters.get(index)
            if not waiters:
                continue
            keep = []
            for pred, fut in waiters:
                if fut.done():
                    continue
                if pred(value):
                    fut.set_result(c)
                else:
                    keep.append((pred, fut))
            self._waiters[index] = keep

    def _on_split(self, r: Any) -> None:
        ev = orjson.loads(r.value)
        src = ev.get("source") or {}
        if src.get("topic") == self.raw_topic and src.get("partition") is not None:
            part, off = int(src["partition"]), int(src["offset"])
            self.split_sources[(part, off)].add(str(src.get("index")))
            self.split_first_after.append((int(r.timestamp), part))

    def _on_letter(self, r: Any) -> None:
        d = orjson.loads(r.value)
        payload = d.pop("payload", None)
        enc = d.get("payload_encoding", "utf-8")
        raw = b""
        if isinstance(payload, str):
            raw = base64.b64decode(payload) if enc == "base64" else payload.encode("utf-8")
        src = d.get("source") or {}
        inner: tuple[int, int] | None = None
        if src.get("topic") == self.split_topic and raw:
            with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
                isrc = orjson.loads(raw).get("source") or {}
                if isrc.get("topic") == self.raw_topic:
                    inner = (int(isrc["partition"]), int(isrc["offset"]))
        self.letters.append(Letter(
            reason=str(d.get("reason")),
            source_topic=src.get("topic"),
            source_partition=src.get("partition"),
            source_offset=src.get("offset"),
            item_index=d.get("item_index"),
            payload_len=len(raw),
            payload_sha256=hashlib.sha256(raw).hexdigest(),
            fields=d,
            inner_source=inner,
            ts_ms=int(r.timestamp),
        ))

    def _on_outbound(self, r: Any) -> None:
        d = orjson.loads(r.value)
        req = d.get("request") or {}
        self.outbound.append({
            "outbox_id": d.get("outbox_id"),
            "key": r.key.decode("utf-8", "replace") if r.key else "",
            "message": "message" in req,
            "sender_action": req.get("sender_action"),
            "ts_ms": int(r.timestamp),
        })

    # waiting on console events --------------------------------------------------------------

    def find(self, key: str, pred: Pred) -> Console | None:
        """`key`: a record key, or CID + a conversation id."""
        events = self.by_conversation.get(key[len(CID):], []) if key.startswith(CID) else self.console.get(key, [])
        for c in events:
            if pred(c.value):
                return c
        return None

    async def wait_for(self, key: str, pred: Pred, timeout: float) -> Console | None:
        """The first console event of `key` (a record key, or CID + a conversation id) matching `pred`,
        already read or still to come; None on timeout."""
        found = self.find(key, pred)
        if found is not None:
            return found
        fut: asyncio.Future[Console] = asyncio.get_running_loop().create_future()
        self._waiters[key].append((pred, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None

    def outputs_since(self, since_ms: int) -> int:
        """Console records written at or after `since_ms` (create time) read so far."""
        n = 0
        for ts, _ in reversed(self.console_by_partition):
            if ts < since_ms:
                break
            n += 1
        return n

    async def quiet(self, seconds: float, timeout: float) -> None:
        """Wait until nothing new was read for `seconds` (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and time.time() - self.last_record_at < seconds:
            await asyncio.sleep(0.2)


def graph_wall_time(req: GraphRequest) -> float:
    """Epoch seconds a fake Graph request arrived (FakeGraph stamps arrivals with the monotonic clock)."""
    return time.time() - (time.monotonic() - req.at)


def graph_recent(graph: FakeGraph, seconds: float) -> int:
    """Requests that arrived in the last `seconds`."""
    since = time.monotonic() - seconds
    return sum(1 for r in reversed(graph.requests) if r.at >= since)


def graph_page(req: GraphRequest) -> str:
    """The page of a request, from its page token (the suite's tokens are "token-<page_id>")."""
    return str(req.query.get("access_token", "")).removeprefix("token-")

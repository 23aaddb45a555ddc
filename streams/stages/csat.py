"""CSAT stage: `csat.facts` (keyed by skill) → the table `csat_cells`, `csat_received` on the skill
topics, and `GET /csat` plus the CSAT gauges for the whole cluster on every worker.

One batch of facts at a time (`take_events`), in small steps:
1. decode: a record that is not a `CsatFact` is dead-lettered (reason, original bytes);
2. route: a fact read on another partition than its skill's (an older producer keyed it by
   conversation) is forwarded to its skill's partition, without `src` (it is then deduplicated by
   fact id), and not counted here;
3. apply: `streams.rules.csat_cells.apply_batch` (pure: stored values in → writes, events, outcomes);
   a fact whose processing raises is dead-lettered, the others go on;
4. write the state first: each partition's dirty keys as ONE Kafka record batch to the table's
   changelog (appended all or nothing), await the acks, then update the local table;
5. then send the `csat_received` events (and forwarded facts) and await their acks.
Only then does the agent take the next batch, which is when faust acks this one's offsets. A failed
write ends the process at once (`crash_worker`), before faust could commit offsets past it.

Every worker follows the whole changelog with a `CellsMirror` (a `TopicMirror`), so `/csat` and the
gauges are the cluster's figures wherever they are asked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from mode.types.signals import BaseSignalT

from schemas.contract import CsatFact
from streams.core import metrics, serde
from streams.core.mirror import MirrorError, TopicMirror
from streams.rules.csat import SCORES, csat_percent, response_rate
from streams.rules.csat_cells import (
    DEFAULT_WINDOWS_SHOWN,
    MAX_WINDOWS,
    Batch,
    CellsView,
    Counts,
    FactRecord,
    apply_batch,
    csat_report,
)

if TYPE_CHECKING:
    from streams.stages.pipeline import Pipeline

log = logging.getLogger("messenger_streams.csat")

TABLE_NAME = "csat_cells"
BATCH_MAX = 256  # facts per batch: bounds the `pending` figures kept per partition
BATCH_WITHIN = 0.05  # seconds a batch waits to fill
CATCH_UP_SECONDS = 2.0  # how long GET /csat waits for the mirror to reach the changelog's end
GAUGE_REFRESH_SECONDS = 1.0
EXIT_WRITE_FAILED = 70  # a write to Kafka failed (EX_SOFTWARE; the same status as the runtime runner's)
REPORT_PREFIXES = ("T|", "W|", "S|")


def crash_worker(reason: str) -> NoReturn:
    """End the process now: a state or output write failed, and faust must not commit this batch's
    offsets (it would on a clean stop). The restarted worker re-reads the batch; see
    `streams.rules.csat_cells` for why that neither loses nor double-counts."""
    log.critical("CSAT stage: %s; exiting with status %d", reason, EXIT_WRITE_FAILED)
    logging.shutdown()
    os._exit(EXIT_WRITE_FAILED)


class WriteFailed(RuntimeError):
    """A changelog batch could not be built (too large for one record batch)."""


# ---------------------------------------------------------------------------------------------
# The whole table on every worker


class CellsMirror(TopicMirror[Any]):
    """The `csat_cells` changelog, every partition, folded into a `CellsView` (report keys only)."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        super().__init__(bootstrap_servers, topic, serde.loads)
        self.view = CellsView()

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            self.skipped += 1
            return
        self.records += 1
        k = key.decode("utf-8", "replace")
        if not k.startswith(REPORT_PREFIXES):
            return  # dedupe bookkeeping: not needed for reports
        try:
            self.view.update(k, None if value is None else serde.loads(value))
        except (ValueError, KeyError, TypeError) as exc:
            self.skipped += 1
            log.warning("csat cells mirror: skipped the value of key %r: %s", k, exc)


class Gauges:
    """Per-skill CSAT gauges from the cluster-wide view, for the skills the processor routes to
    (bounded labels: the configured ones and, issue 14, those of pages connected live; `skills` may
    grow); the figures of other skills stay in `/csat`."""

    def __init__(self, skills: Collection[str]) -> None:
        self.skills = skills

    def refresh(self, per_skill: Mapping[str, Counts]) -> None:
        for skill in sorted(self.skills):
            counts = per_skill.get(skill, [0, 0, 0, 0, 0, 0])
            answers = sum(counts[1:])
            pct = csat_percent(counts[4] + counts[5], answers)
            rate = response_rate(answers, counts[0])
            if pct is not None:
                metrics.CSAT_PERCENT.labels(skill).set(pct)
            if rate is not None:
                metrics.CSAT_RESPONSE_RATE.labels(skill).set(rate)
            metrics.CSAT_AGGREGATE_SURVEYS.labels(skill).set(counts[0])
            for s in SCORES:
                metrics.CSAT_AGGREGATE_ANSWERS.labels(skill, str(s)).set(counts[s])


# ---------------------------------------------------------------------------------------------
# Writing: state first, then outputs


class CellsWriter:
    """A producer of its own: one partition's writes as one record batch, and the stage's outputs."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Start the producer (in the worker's loop; again after `stop`)."""
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                acks="all",
                linger_ms=0,
                max_batch_size=512 * 1024,
                max_request_size=1024 * 1024,
            )
            await producer.start()
            self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise WriteFailed("the csat writer is not started")
        return self._producer

    async def write(self, topic: str, partition: int, writes: Mapping[str, Any]) -> asyncio.Future[Any]:
        """Queue one partition's writes (None: a tombstone) as one record batch; the future is its ack."""
        producer = self.producer
        batch = producer.create_batch()
        for key, value in writes.items():
            raw = None if value is None else serde.dumps(value)
            if batch.append(key=key.encode(), value=raw, timestamp=None) is None:
                raise WriteFailed(f"{len(writes)} writes do not fit one record batch")
        fut: asyncio.Future[Any] = await producer.send_batch(batch, topic, partition=partition)
        return fut

    async def send(self, topic: str, key: bytes, value: bytes, partition: int | None = None) -> asyncio.Future[Any]:
        """Queue one record; the future is its ack."""
        fut: asyncio.Future[Any] = await self.producer.send(topic, value, key=key, partition=partition)
        return fut


async def await_acks(futures: Sequence[asyncio.Future[Any]], what: str) -> None:
    """Wait for every ack; any failure ends the process (`crash_worker`)."""
    if not futures:
        return
    results = await asyncio.gather(*futures, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            crash_worker(f"writing {what} failed: {type(result).__name__}: {result}")


class SkillPartitions:
    """The `csat.facts` partition of each skill: Kafka's default partitioner (murmur2 of the key)."""

    def __init__(self, partitions: int, max_skills: int = 10_000) -> None:
        self.partitions = partitions
        self._cache: dict[str, int] = {}
        self._max = max_skills

    def __call__(self, skill: str) -> int:
        p = self._cache.get(skill)
        if p is None:
            p = (murmur2(skill.encode()) & 0x7FFFFFFF) % self.partitions
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[skill] = p
        return p


class CellsRunner:
    """Drives one batch of `csat.facts` events through decode → route → apply → write → send."""

    def __init__(self, pipe: Pipeline, table: Any, writer: CellsWriter) -> None:
        self.pipe = pipe
        self.table = table
        self.writer = writer
        self.window_seconds = pipe.config.csat.window_seconds
        self.facts_topic = pipe.settings.topics.name("csat_facts")
        self.changelog = f"{pipe.settings.app_id}-{TABLE_NAME}-changelog"
        self.skill_of = SkillPartitions(pipe.settings.partitions)
        # issue 14: skill → topic of the live page directory (grows when a page is connected to a new skill)
        self.skill_topics = pipe.pages.skill_topics
        self.default_skill = pipe.config.routing.default_skill
        self.console_events = metrics.BoundLabels(metrics.CONSOLE_EVENTS)
        self.latency = metrics.PROCESSING_LATENCY.labels("csat")
        self.lock = asyncio.Lock()  # held while a batch is written; shutdown waits for it

    def read(self, key: str) -> Any:
        raw = self.table.data.get(key.encode())
        return None if raw is None else serde.loads(raw)

    async def run(self, events: Sequence[Any]) -> None:
        async with self.lock:
            await self._run(events)

    async def _run(self, events: Sequence[Any]) -> None:
        records: list[FactRecord] = []
        msgs: list[Any] = []
        forwards: list[asyncio.Future[Any]] = []
        for event in events:
            msg = event.message
            try:
                if not isinstance(event.value, bytes | str):
                    raise ValueError("empty csat fact")
                fact = CsatFact.model_validate_json(event.value)
                home = self.skill_of(fact.skill)
            except Exception as exc:  # noqa: BLE001 - any bad record is dead-lettered, never fatal
                await self.dead_letter(msg, f"invalid csat fact: {exc}")
                continue
            if home != msg.partition:
                moved = fact.model_copy(update={"src": None})
                try:
                    forwards.append(
                        await self.writer.send(self.facts_topic, fact.skill.encode(), serde.dumps(moved), home)
                    )
                except Exception as exc:  # noqa: BLE001 - any failure to write is fatal
                    crash_worker(f"forwarding a csat fact failed: {type(exc).__name__}: {exc}")
                metrics.CSAT_FACTS_SKIPPED.labels("forwarded").inc()
                continue
            records.append(FactRecord(fact, msg.partition, msg.offset))
            msgs.append(msg)
        while records:
            batch = apply_batch(self.read, records, window_seconds=self.window_seconds)
            n = batch.consumed
            for rec, msg, outcome in zip(records[:n], msgs[:n], batch.outcomes, strict=True):
                if outcome.status == "failed":
                    await self.dead_letter(msg, f"csat fact not counted: {outcome.error}")
                elif outcome.status != "counted":
                    metrics.CSAT_FACTS_SKIPPED.labels(outcome.status).inc()
                elif rec.fact.fact == "survey_sent":
                    metrics.CSAT_SURVEYS.labels(rec.fact.skill).inc()
                else:
                    metrics.CSAT_ANSWERS.labels(rec.fact.skill, str(rec.fact.score)).inc()
            await self.commit(batch)
            records, msgs = records[n:], msgs[n:]
        await await_acks(forwards, "forwarded csat facts")
        now = time.time()
        for event in events:
            self.latency.observe(max(0.0, now - (event.message.timestamp or now)))

    async def dead_letter(self, msg: Any, error: str) -> None:
        """Dead-letter one record (reason `processing_error`, original bytes); failing that is fatal."""
        try:
            await self.pipe.dead_letter(msg, "processing_error", error)
        except Exception as exc:  # noqa: BLE001 - the record would be lost: stop before its offset is committed
            crash_worker(f"dead-lettering a csat fact failed: {type(exc).__name__}: {exc}")
        metrics.CSAT_FACTS_SKIPPED.labels("invalid").inc()

    async def commit(self, batch: Batch) -> None:
        """State first (one record batch per partition, acked), then the outputs (acked)."""
        writes: list[asyncio.Future[Any]] = []
        for partition, dirty in batch.writes.items():
            try:
                writes.append(await self.writer.write(self.changelog, partition, dirty))
            except Exception as exc:  # noqa: BLE001 - any failure to write is fatal
                crash_worker(f"writing csat cells failed: {type(exc).__name__}: {exc}")
        await await_acks(writes, "csat cells")
        data = self.table.data
        for dirty in batch.writes.values():
            for key, value in dirty.items():
                if value is None:
                    data.pop(key.encode(), None)
                else:
                    data[key.encode()] = serde.dumps(value)
        sends: list[asyncio.Future[Any]] = []
        for out in batch.outputs:
            skill = out.skill if out.skill in self.skill_topics else self.default_skill
            try:
                sends.append(await self.writer.send(self.skill_topics[skill], out.key.encode(), serde.dumps(out.value)))
            except Exception as exc:  # noqa: BLE001 - any failure to write is fatal
                crash_worker(f"sending csat_received failed: {type(exc).__name__}: {exc}")
            self.console_events.inc(skill, "csat_received")
        await await_acks(sends, "csat_received events")


def register(pipe: Pipeline) -> None:
    """Attach the `aggregate_csat` agent, the `csat_cells` table, its mirror, `/csat` and the gauges."""
    app = pipe.app
    settings = pipe.settings
    window_seconds = pipe.config.csat.window_seconds
    # keys and values are bytes (raw serializers): what the stage writes is what recovery reads back
    # Always in memory, whatever MESSENGER_STREAMS_STORE says: the stage writes the table's local copy
    # itself, per partition, and faust's rocksdb store files a direct write under the partition of "the
    # current event", which a batch does not have. The table is small (bounded cells per skill, page and
    # agent, docs/metrics.md) and is recovered from its changelog at start. The URL names a host:
    # faust keeps `store` only when `URL(store)` is truthy, and yarl's URL("memory://") is not, so a
    # bare "memory://" silently fell back to the app's rocksdb:// (every CSAT fact crashed the agent).
    table = app.Table(TABLE_NAME, default=None, partitions=settings.partitions, key_type=bytes, value_type=bytes,
                      store=f"memory://{TABLE_NAME}")
    writer = CellsWriter(settings.bootstrap_servers)
    runner = CellsRunner(pipe, table, writer)
    mirror = CellsMirror(settings.bootstrap_servers, runner.changelog)
    gauges = Gauges(pipe.pages.skill_topics)  # the live skill map: a skill connected live gets its gauges

    @app.agent(pipe.topic("csat_facts"), name="aggregate_csat", concurrency=1)
    async def aggregate_csat(stream: Any) -> None:
        await writer.start()
        async for events in stream.take_events(BATCH_MAX, BATCH_WITHIN):
            # A stop or rebalance cancels the agent: finish this batch first (state, then outputs),
            # since faust acks its events as soon as the agent lets go of them.
            task = asyncio.ensure_future(runner.run(events))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                await task
                raise

    @app.task  # type: ignore[untyped-decorator]  # faust is untyped
    async def follow_cells() -> None:
        while True:
            try:
                await mirror.start()
                return
            except MirrorError as exc:
                log.warning("csat cells mirror: %s; retrying", exc)
                await asyncio.sleep(2.0)

    async def close(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        async with runner.lock:
            await writer.stop()
        await mirror.stop()

    app.on_before_shutdown.connect(close)

    @app.timer(GAUGE_REFRESH_SECONDS, name="csat_gauges")  # type: ignore[untyped-decorator]  # faust is untyped
    async def refresh_csat_gauges() -> None:
        gauges.refresh(mirror.view.skill_counts())

    @app.page("/csat")
    async def csat_page(web: Any, request: Any) -> Any:
        query = request.query
        try:
            shown = int(query.get("windows", DEFAULT_WINDOWS_SHOWN))
            window = query.get("window") or None
            if window not in (None, "latest"):
                int(window)
            complete = await mirror.wait_caught_up(CATCH_UP_SECONDS)
            report = csat_report(
                mirror.view,
                window_seconds=window_seconds,
                partitions=mirror.partitions,
                total_partitions=settings.partitions,
                complete=complete and len(mirror.partitions) == settings.partitions,
                skill=query.get("skill") or None,
                page=query.get("page") or None,
                agent=query.get("agent") or None,
                window=window,
                windows=min(max(shown, 0), MAX_WINDOWS),
            )
        except ValueError as exc:
            return web.json({"error": f"bad query: {exc}"}, status=400)
        return web.json(report)

    pipe.extras["agents.aggregate_csat"] = aggregate_csat

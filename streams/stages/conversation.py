"""Conversation stage: the `converse` agent and the `conversations` table.

One agent consumes five co-partitioned topics keyed by `<page_id>:<psid>` (`messenger.events.split`,
`agent.actions`, `messenger.send.results`, `conversations.ticks`, and #15's `conversations.relay`:
records one conversation key sends another) in batches and runs them through
the state-first runner (`streams.stages.runtime`): decode, skip what was applied, decide with the
pure rules (`streams.rules.conversation`, behind `api.py`), write each touched key once, await the
changelog, send the outputs, await them. This module only turns records into rule inputs and rule
decisions into records, counts, and writes the ticks; docs/architecture.md has the guarantees.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from streams.core import metrics, serde
from streams.rules.conversation.api import Input
from streams.rules.conversation.decider import Decider
from streams.rules.normalize import Rejected
from streams.rules.wheel import parse_tick
from streams.stages.backlog import joined, queued
from streams.stages.ingest import split_record
from streams.stages.runtime import (
    MAX_INPUT_OUTPUT_BYTES,
    AppProducer,
    BadRecord,
    FactSeq,
    Keyed,
    Out,
    Record,
    Split,
    StateFirstRunner,
    Step,
    TableStore,
    TickIn,
    TickSource,
    WriteFailed,
    committed_offsets,
    crash_worker,
    letter_bytes,
    meta_key,
)

if TYPE_CHECKING:
    from mode.types.signals import BaseSignalT

    from streams.core.settings import Settings
    from streams.stages.pipeline import Pipeline

log = logging.getLogger("messenger_streams.conversations")

# Decision notes that move the durable per-partition counters (docs/lifecycle.md): `open+`/`open-`
# (skill) for open conversations, `queue+`/`queue-` (skill) for open and unassigned ones.
COUNTER_NOTES = {"open+": ("open", 1), "open-": ("open", -1), "queue+": ("queued", 1), "queue-": ("queued", -1)}
GAUGE_REFRESH_SECONDS = 1.0
FINISH_TIMEOUT_SECONDS = 10.0  # a stopping agent waits this long at most for its last outputs' acks


def counter_deltas(notes: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    """The counter changes a decision's notes announce, e.g. ("open+", "billing") → ("open", "billing", +1)."""
    deltas: list[tuple[str, str, int]] = []
    for name, label in notes:
        change = COUNTER_NOTES.get(name)
        if change is not None and label:
            deltas.append((change[0], label, change[1]))
    return deltas


class ConversationStage:
    """Records ↔ rule inputs and decisions, for the runner (`streams.stages.runtime.Stage`)."""

    def __init__(self, pipe: Pipeline, decider: Decider) -> None:
        settings = pipe.settings
        topics = settings.topics
        self.decider = decider
        self.names = {attr: topics.name(attr)
                      for attr in ("raw", "split", "events", "actions", "send_results", "ticks", "relay")}
        self.source_of = {self.names["split"]: "event", self.names["actions"]: "action",
                          self.names["send_results"]: "result", self.names["relay"]: "relay"}  # relay: #15
        self.dests = {
            "outbound": topics.name("outbound"),
            "history": topics.name("history"),
            "csat_responses": topics.name("csat_responses"),
            "csat_facts": topics.name("csat_facts"),
            "relay": topics.name("relay"),  # #15
            "orders_unmatched": topics.name("orders_unmatched"),
        }
        self.facts_topic: str | None = self.dests["csat_facts"]
        # issue 14: the live page directory gives each decision its Env (page, routing, skills) and the
        # skill → topic map, which grows when a page is connected live to a new skill (topic created first)
        self.pages = pipe.pages
        self.skill_topics = pipe.pages.skill_topics
        self.default_skill_topic = self.skill_topics[pipe.config.routing.default_skill]
        self.publish_events = settings.publish_events
        self.console_events = metrics.BoundLabels(metrics.CONSOLE_EVENTS)
        # one hop (issue 18): raw bodies are split here; their events of this record's partition are
        # decided in place, the others forwarded to the split topic (the repartition by conversation)
        self.max_body_bytes = settings.max_body_bytes
        self.dlq_name = topics.name("dlq")
        self.dead_letter_max_bytes = settings.dead_letter_max_bytes
        self.partitions = settings.partitions
        self.every_partition = list(range(settings.partitions))  # the partitioner's arguments, built once
        self.pipe = pipe  # its app's partitioner and consumer metadata, read when a raw body comes
        self.events_in = metrics.BoundLabels(metrics.EVENTS_IN)

    def check_copartitioned(self) -> None:
        """One hop needs raw partition p assigned with the table's partition p: the raw topic must
        have MESSENGER_STREAMS_PARTITIONS partitions (the worker refuses to start otherwise,
        `streams.stages.startup`). If someone adds partitions while it runs, faust assigns raw on its
        own and this worker could write another worker's partitions: end it instead; its restart
        refuses with the one-line reason."""
        count = self.pipe.app.consumer.topic_partitions(self.names["raw"])
        if count is not None and count != self.partitions:
            crash_worker(RuntimeError(
                f"{self.names['raw']} now has {count} partitions, not {self.partitions}: one hop cannot go on "
                "(give it the same count, or set MESSENGER_STREAMS_ONE_HOP=false)"))

    def partition_of(self, key: bytes) -> int:
        """The partition the producer writes `key` to (murmur2, as every keyed record of the app)."""
        conf: Any = self.pipe.app.conf  # faust's Settings types the partitioner as a method
        every = self.every_partition
        return int(conf.producer_partitioner(key, every, every))  # the app's CachedPartitioner

    # records → inputs -------------------------------------------------------------------------
    def parse(self, rec: Record) -> Keyed | Split | TickIn:
        """The rule input (or tick) of a record; raises BadRecord with the dead-letter reason."""
        topic = rec.topic
        if topic == self.names["raw"]:
            return self.split(rec)
        reason = "invalid_action" if topic == self.names["actions"] else "processing_error"
        if rec.value is None:
            raise BadRecord(reason, "record without a value")
        try:
            data = serde.loads(rec.value)
        except ValueError as exc:
            raise BadRecord(reason, f"invalid JSON: {exc}") from None
        if topic == self.names["ticks"]:
            try:
                return TickIn(parse_tick(data))
            except ValueError as exc:
                raise BadRecord("processing_error", f"invalid tick: {exc}") from None
        if not isinstance(data, dict):
            raise BadRecord(reason, f"expected a JSON object, got {type(data).__name__}")
        try:
            key = rec.key.decode("utf-8") if rec.key else ""
        except UnicodeDecodeError:
            raise BadRecord(reason, "record key is not UTF-8") from None
        source = self.source_of[topic]
        if source == "action":
            if not key:
                raise BadRecord("invalid_action", "agent action without a '<page_id>:<psid>' key")
            return Keyed(key, Input("action", f"action:{data.get('action_id')}", rec.timestamp_ms, data))
        if not key:
            raise BadRecord("processing_error", f"{source} record without a '<page_id>:<psid>' key")
        if source == "event":
            received = data.get("received_at")
            now = received if isinstance(received, int) and not isinstance(received, bool) else rec.timestamp_ms
            return Keyed(key, Input("event", str(data.get("idempotency_key")), now, data))
        if source == "relay":  # #15: its id is the relay_id its sender gave it (stable across re-sends)
            return Keyed(key, Input("relay", f"relay:{data.get('relay_id')}", rec.timestamp_ms, data))
        return Keyed(key, Input("result", f"result:{data.get('outbox_id')}", rec.timestamp_ms, data))

    def split(self, rec: Record) -> Split:
        """A raw webhook body split in place (one hop): the inputs of its events whose conversation
        key is the record's key (the producer put it on that conversation's partition: the webhook
        keys a body of one conversation so), the other events forwarded to the split topic, the bad
        items as dead letters. Raises only on a bug (the runner dead-letters the body).

        Only a body keyed by its conversation is decided in place, not every event that happens to
        belong to the record's partition: an ingester that does not key by conversation gets exactly
        the two-hop order it had (all of its bodies' events through the split topic), and one that
        does gets every body of a conversation on one raw partition, in order."""
        self.check_copartitioned()
        admitted, rejected = split_record(rec, self.max_body_bytes, self.pages)
        inputs: list[Keyed] = []
        outs: list[Out] = []
        for ev in admitted:
            key = ev.conversation_key
            where = ev.source.index if ev.source is not None else None
            try:
                value = serde.dumps(ev)
                key_bytes = key.encode()
                if len(value) > MAX_INPUT_OUTPUT_BYTES:
                    raise ValueError(f"event of {len(value)} bytes, over {MAX_INPUT_OUTPUT_BYTES}")
            except (TypeError, ValueError) as exc:
                rejected.append(Rejected("processing_error", f"event {where or ''} cannot be written: "
                                         f"{type(exc).__name__}: {exc}", where))
                continue
            self.events_in.inc(ev.kind)
            if key_bytes != rec.key or self.partition_of(key_bytes) != rec.partition:
                outs.append(Out(self.names["split"], key_bytes, value))
                continue
            data = serde.loads(value)  # exactly what the split path's consumer would read
            received = data.get("received_at")
            now = received if isinstance(received, int) and not isinstance(received, bool) else rec.timestamp_ms
            inputs.append(Keyed(key, Input("event", str(data.get("idempotency_key")), now, data)))
        for rej in rejected:
            letter = letter_bytes(rec, rej.reason, rej.error, max_bytes=self.dead_letter_max_bytes,
                                  item_index=rej.item_index)
            outs.append(Out(self.dlq_name, rec.key, letter))
            metrics.DEAD_LETTERS.labels(rej.reason).inc()
        return Split(inputs, outs)

    # decisions → records ----------------------------------------------------------------------
    def decide(self, state: dict[str, Any] | None, inp: Input, key: str, rec: Record, facts: FactSeq) -> Step:
        """Decide one input and turn the decision into records: skill topics by skill, CSAT facts
        stamped with the source record (`src`, decision C), counter deltas from the notes."""
        decision = self.decider.decide(state, inp, key, self.pages.env_for(key.partition(":")[0]))
        metrics.record_notes(decision.notes, decision.figures)
        if decision.duplicate:
            return Step(state, None, [], [], duplicate=True)
        outs: list[Out] = []
        if inp.source == "event" and self.publish_events and rec.value is not None:
            # a body split in place: the event itself, as the split path would have read it
            event_bytes = serde.dumps(inp.data) if rec.topic == self.names["raw"] else rec.value
            outs.append(Out(self.names["events"], key, event_bytes))
        for out in decision.outputs:
            if out.dest == "skill":
                skill = out.skill or ""
                # routing and transfers only pick skills whose topic exists; the default is a guard
                topic = self.skill_topics.get(skill, self.default_skill_topic)
                outs.append(Out(topic, out.key, serde.dumps(out.value), (skill, str(out.value.get("type")))))
                continue
            value = out.value
            if out.dest == "csat_facts":
                value = {**value, "src": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
                                          "index": facts.next()}}
            outs.append(Out(self.dests[out.dest], out.key, serde.dumps(value)))
        state_bytes = serde.dumps(decision.state) if decision.state is not None else None
        return Step(decision.state, state_bytes, outs, list(decision.arms), counter_deltas(decision.notes))

    def sent(self, out: Out) -> None:
        if out.label is not None:
            self.console_events.inc(*out.label)


class _Gauges:
    """Open conversations and queue depth per skill: the sum of the durable per-partition counters
    of the partitions this worker owns (P small reads, never a scan of the table)."""

    def __init__(self, skills: list[str]) -> None:
        self.skills = set(skills)
        self.shown: set[str] = set()

    def refresh(self, metas: list[dict[str, Any]]) -> None:
        totals: dict[str, Counter[str]] = {"open": Counter(), "queued": Counter()}
        for meta in metas:
            for name, by_skill in (meta.get("counts") or {}).items():
                if name in totals:
                    totals[name].update({skill: int(n) for skill, n in by_skill.items()})
        labels = self.skills | set(totals["open"]) | set(totals["queued"])
        for skill in labels:
            metrics.OPEN_CONVERSATIONS.labels(skill).set(max(0, totals["open"][skill]))
            metrics.QUEUE_DEPTH.labels(skill).set(max(0, totals["queued"][skill]))
        for skill in self.shown - labels:
            for gauge in (metrics.OPEN_CONVERSATIONS, metrics.QUEUE_DEPTH):
                try:
                    gauge.remove(skill)
                except KeyError:
                    pass
        self.shown = labels


def rocksdb_options(settings: Settings) -> dict[str, int] | None:
    """RocksDB's memory per table partition, bounded: two memtables and a block cache
    (`MESSENGER_STREAMS_ROCKSDB_*`). faust's defaults (64 MB memtables, three of them, and a 2 GB
    cache, per partition's database) keep a whole table of a few hundred MB in memory, so the
    RocksDB store held more than the memory store (docs/benchmarks.md, "Memory")."""
    if not settings.store.startswith("rocksdb"):
        return None
    mb = 1 << 20
    return {"write_buffer_size": settings.rocksdb_write_buffer_mb * mb, "max_write_buffer_number": 2,
            "block_cache_size": settings.rocksdb_block_cache_mb * mb}


def register(pipe: Pipeline) -> None:
    """Attach the `converse` agent, the `conversations` table, the tick writer and the gauges."""
    app = pipe.app
    settings = pipe.settings
    topics = settings.topics
    decider = Decider(
        pipe.config,
        dedupe_horizon_ms=settings.dedupe_horizon_seconds * 1000,
        dedupe_max_keys=settings.dedupe_max_keys,
    )
    stage = ConversationStage(pipe, decider)
    names = stage.names
    inputs = [names["split"], names["actions"], names["send_results"], names["relay"]]
    if pipe.one_hop:  # issue 18: raw bodies are split here, their own partition's events decided in place
        inputs.insert(0, names["raw"])
    channel = pipe.raw_topic(*inputs, names["ticks"])
    # values as JSON bytes in the local store, parsed on read (`TableStore`); keys stay JSON strings
    table = app.Table("conversations", default=None, partitions=settings.partitions, value_type=bytes,
                      options=rocksdb_options(settings))
    store = TableStore(table, app.producer, persistent=not settings.store.startswith("memory"))
    runner = StateFirstRunner(
        stage,
        store,
        AppProducer(app),
        dlq_topic=topics.name("dlq"),
        dead_letter_max_bytes=settings.dead_letter_max_bytes,
        committed=committed_offsets(app),
    )
    latency = metrics.PROCESSING_LATENCY.labels("conversation")
    within = settings.batch_within_ms / 1000.0

    # the batches whose last unit is in flight (the unit pipeline: at most PIPELINE_DEPTH units, and the
    # batches that wrote nothing, acked with the unit before them)
    finishing: set[asyncio.Task[None]] = set()

    async def finish(stream: Any, done: asyncio.Future[None], events: list[Any], records: list[Record]) -> None:
        """Ack a batch once Kafka acknowledged its outputs (faust commits acked offsets only)."""
        try:
            await done
        except asyncio.CancelledError:
            return  # shutting down: not acked, so redelivered (its outputs are pending on its keys)
        except Exception as exc:  # noqa: BLE001 - WriteFailed: an output was not acknowledged
            crash_worker(exc)
        for e in events:
            await stream.ack(e)
        now_ms = time.time() * 1000
        for rec in records:  # Kafka timestamp → outputs acknowledged
            latency.observe(max(0.0, (now_ms - rec.timestamp_ms) / 1000.0))

    @app.agent(channel, name="converse")
    async def converse(stream: Any) -> None:
        try:
            # under a backlog, faust's batches are joined (backlog.py): fewer, fuller units
            async for events in joined(stream.noack_take(settings.batch_max, within), queued(stream),
                                       settings.batch_max, settings.batch_backlog_ms / 1000.0):
                records = [Record.of_event(e) for e in events]
                try:
                    # the unit pipeline: the next batch is taken and decided while this one's
                    # changelog records and outputs wait for their acks (docs/architecture.md,
                    # "The unit pipeline")
                    done = await runner.start_batch(records)
                except WriteFailed as exc:
                    crash_worker(exc)
                except Exception as exc:  # noqa: BLE001 - a bug in the runner itself: same rule, never go on
                    crash_worker(exc)
                task = asyncio.ensure_future(finish(stream, done, list(events), records))
                finishing.add(task)
                task.add_done_callback(finishing.discard)
        finally:
            if finishing:  # a stop: the last batch is acked before faust's last commit, not redelivered
                await asyncio.wait(set(finishing), timeout=FINISH_TIMEOUT_SECONDS)

    ticks = TickSource(
        app,
        ticks_topic=names["ticks"],
        input_topics=inputs,
        upstream_topic=None,
        group_id=settings.app_id,
        bootstrap_servers=settings.bootstrap_servers,
        partitions=settings.partitions,
    )

    @app.timer(settings.tick_interval_seconds)  # type: ignore[untyped-decorator]  # faust is untyped
    async def tick() -> None:
        # raw bodies count as input when this app splits them (every stage registered by now): their
        # events of other partitions reach this stage through the split topic
        ticks.upstream_topic = topics.name("raw") if pipe.one_hop or "split_webhooks" in app.agents else None
        await ticks.run_once()
        runner.refresh_stream_lag({tp.partition for tp in app.consumer.assignment() if tp.topic == names["ticks"]})

    async def close_ticks(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        await ticks.close()

    app.on_before_shutdown.connect(close_ticks)

    gauges = _Gauges(pipe.config.all_skills())

    @app.timer(GAUGE_REFRESH_SECONDS, name="conversation_gauges")  # type: ignore[untyped-decorator]
    async def refresh_gauges() -> None:
        # after recovery and after every rebalance the gauges follow the partitions owned now
        try:
            actives = app.assignor.assigned_actives()
        except (AttributeError, KeyError):
            return
        owned = sorted({tp.partition for tp in actives if tp.topic == names["split"]})
        metas = [m for m in (store.get(meta_key(p)) for p in owned) if isinstance(m, dict)]
        gauges.refresh(metas)

    pipe.extras["agents.converse"] = converse


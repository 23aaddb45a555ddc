"""The state-first runner without Kafka: a simulated broker that acknowledges writes one at a time
(in order per partition, like Kafka), crashes at random points (unacknowledged writes may or may not
have landed, as a prefix per partition), recovers tables from their changelog and redelivers from
the committed offsets. Whatever the crash points, the delivery argument holds:

- no output without its state: every copy of an output id carries the same value, and per key
  the outputs number the inputs 1..N exactly as the final state counts them;
- no skipped input: every good input has its output, every bad one its dead letter;
- timers fire once, on stream time, and the per-partition counters equal what the state says;
- CSAT facts get distinct (source record, index) pairs, stable across re-sends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from streams.rules import wheel
from streams.rules.conversation.api import Input
from streams.stages import runtime
from streams.stages.runtime import (
    BadRecord,
    FactSeq,
    Keyed,
    Out,
    Record,
    Split,
    StateFirstRunner,
    Step,
    TickIn,
    WriteFailed,
    meta_key,
)

TOPICS = ("a", "b")
PARTITIONS = 2


def dumps(v: Any) -> bytes:
    return orjson.dumps(v)


def part_of(key: str) -> int:
    return zlib.crc32(key.encode()) % PARTITIONS


class FakeKafka:
    """Writes queue per (topic, partition) and are acknowledged one at a time, in order per
    partition, in a random order across partitions. `crash()` keeps what was acknowledged plus a
    random prefix of each queue (a write may land without its ack reaching us)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queues: dict[tuple[str, int], deque[tuple[asyncio.Future[None], Any]]] = defaultdict(deque)
        self.logs: dict[tuple[str, int], list[Any]] = defaultdict(list)
        self.acked = 0
        self.acks: dict[tuple[str, int], int] = {}
        self.fail_topic: str | None = None

    def write(self, topic: str, partition: int, payload: Any) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queues[(topic, partition)].append((fut, payload))
        return fut

    async def pump(self, crash_after: int | None) -> None:
        while True:
            ready = [k for k, q in self.queues.items() if q]
            if not ready:
                await asyncio.sleep(0)
                continue
            k = self.rng.choice(ready)
            fut, payload = self.queues[k].popleft()
            if self.fail_topic == k[0]:
                fut.set_exception(RuntimeError("NotEnoughReplicas"))
            else:
                self.logs[k].append(payload)
                self.acks[k] = len(self.logs[k])
                fut.set_result(None)
            self.acked += 1
            if crash_after is not None and self.acked >= crash_after:
                return
            await asyncio.sleep(0)

    def acked_count(self, topic: str, partition: int) -> int:
        """How many of the partition's records were acknowledged (a prefix of its log)."""
        return self.acks.get((topic, partition), 0)

    def crash(self) -> None:
        for k, q in self.queues.items():
            for _ in range(self.rng.randint(0, len(q))):
                self.logs[k].append(q.popleft()[1])
            for fut, _ in q:
                fut.cancel()
            q.clear()


class FakeStore:
    """A table: a dict plus its changelog in FakeKafka (topic "cl"). `persistent`: the local copy
    survives a crash, as RocksDB's does, and recovery replays only the changelog records after the
    last acknowledged one of each partition (faust's persisted offset); a local write whose record
    never landed stays, ahead of the changelog."""

    def __init__(self, kafka: FakeKafka, persistent: bool = False) -> None:
        self.kafka = kafka
        self.data: dict[str, Any] = {}
        self.persistent = persistent
        self.replayed: dict[int, int] = {}  # partition → changelog records already in the local copy

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def write(self, key: str, data: bytes | None, partition: int, event: Any) -> None:
        self._apply(self.data, key, data)

    async def send(self, key: str, data: bytes | None, partition: int) -> Awaitable[Any]:
        return self.kafka.write("cl", partition, (key, data))

    def recover(self) -> None:
        """What a restarted worker rebuilds from the changelog (values decoded from their bytes)."""
        if not self.persistent:
            self.data = self.from_changelog()
            return
        for (topic, p), log in self.kafka.logs.items():
            if topic != "cl":
                continue
            start = max(self.kafka.acked_count("cl", p), self.replayed.get(p, 0))
            for key, data in log[start:]:
                self._apply(self.data, key, data)
            self.replayed[p] = len(log)

    def from_changelog(self) -> dict[str, Any]:
        """The table as a worker that recovers from the changelog alone sees it."""
        data: dict[str, Any] = {}
        for (topic, _), log in self.kafka.logs.items():
            if topic == "cl":
                for key, value in log:
                    self._apply(data, key, value)
        return data

    @staticmethod
    def _apply(data: dict[str, Any], key: str, value: bytes | None) -> None:
        if value is None:
            data.pop(key, None)
        else:
            data[key] = orjson.loads(value)


class FakeProducer:
    def __init__(self, kafka: FakeKafka) -> None:
        self.kafka = kafka

    async def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None) -> Awaitable[Any]:
        return self.kafka.write(topic, zlib.crc32(key or b"") % PARTITIONS, value)

    def send_now(self) -> None:
        pass


class FakeStage:
    """Counts inputs per key; the first input arms a timer 1.5 s later; the timer emits a fact."""

    facts_topic = "facts"

    def parse(self, rec: Record) -> Keyed | Split | TickIn:
        assert rec.value is not None
        if rec.topic == "t":
            return TickIn(wheel.parse_tick(orjson.loads(rec.value)))
        if rec.value == b"bad":
            raise BadRecord("processing_error", "bad record")
        data = orjson.loads(rec.value)
        if "items" in data:  # a body of several items (one hop): this partition's decided, others forwarded
            inputs, outs = [], []
            for j, item in enumerate(data["items"]):
                if part_of(item["key"]) == rec.partition:
                    inputs.append(Keyed(item["key"], Input("event", f"in:{rec.src}#{j}", rec.timestamp_ms, item)))
                else:
                    outs.append(Out("fwd", item["key"], dumps({"id": f"fwd:{rec.src}#{j}"})))
            return Split(inputs, outs)
        assert rec.key is not None
        return Keyed(rec.key.decode(), Input("event", f"in:{rec.src}", rec.timestamp_ms, data))

    def decide(self, state: dict[str, Any] | None, inp: Input, key: str, rec: Record, facts: FactSeq) -> Step:
        st = dict(state or {"n": 0, "fired": 0, "due": None})
        if inp.source == "timer":
            st["fired"] += 1
            outs = [
                Out("out", key, dumps({"id": inp.id, "key": key, "n": st["n"], "timer": True})),
                Out("facts", key, dumps({"id": inp.id, "src": rec.src, "index": facts.next()})),
            ]
            return Step(st, dumps(st), outs, [], [("fired", "x", 1)])
        if inp.data.get("boom"):
            raise RuntimeError("a bug in the rules")
        st["n"] += 1
        arms: list[int] = []
        deltas: list[tuple[str, str, int]] = []
        if st["n"] == 1:
            st["due"] = inp.now + 1500
            arms.append(st["due"])
            deltas.append(("open", "x", 1))
        outs = [Out("out", key, dumps({"id": inp.id, "key": key, "n": st["n"]}))]
        return Step(st, dumps(st), outs, arms, deltas)

    def sent(self, out: Out) -> None:
        pass


def timeline(rng: random.Random, n: int, multi: bool = False) -> dict[tuple[str, int], list[Record]]:
    """Input records on topics a/b and ticks on t, per topic-partition, in offset order. `multi`:
    a third of the records are bodies of 2–4 items (keys of any partition, some the same key twice)."""
    tps: dict[tuple[str, int], list[Record]] = defaultdict(list)
    keys = [f"k{i}" for i in range(12)]
    ts = 1_000_000
    for i in range(n):
        ts += rng.randint(20, 200)
        key = rng.choice(keys)
        p = part_of(key)
        topic = rng.choice(TOPICS)
        roll = rng.random()
        value = b"bad" if roll < 0.04 else dumps({"i": i, "boom": roll > 0.97})
        if multi and value != b"bad" and rng.random() < 0.35:
            items = [key, *(rng.choice([key, *keys]) for _ in range(rng.randint(1, 3)))]
            value = dumps({"i": i, "items": [{"key": k, "j": j, "boom": rng.random() < 0.03}
                                             for j, k in enumerate(items)]})
        recs = tps[(topic, p)]
        recs.append(Record(topic, p, len(recs), key.encode(), value, ts))
        if i % 7 == 0:
            for q in range(PARTITIONS):
                ends = {t: len(tps[(t, q)]) for t in TOPICS}
                ticks = tps[("t", q)]
                ticks.append(Record("t", q, len(ticks), runtime.TICK_KEY, dumps(wheel.tick_value(ts, ends)), ts))
    return tps


async def consume(
    rng: random.Random,
    runner: StateFirstRunner,
    tps: dict[tuple[str, int], list[Record]],
    committed: dict[tuple[str, int], int],
    tails: list[asyncio.Future[None]] | None = None,
) -> None:
    """Batches merged from all topic-partitions (each in order) from the committed offsets; after
    each batch its offsets are acked, and committed with probability 1/2 (commits lag).

    `tails`: the unit pipeline, as the conversation agent runs it (`start_batch`): a batch's
    offsets are acked once its outputs are, while the next batch is already being decided; the
    futures are kept there, for the crash to end them with the process."""
    pos = {tp: committed.get(tp, 0) for tp in tps}
    acked = dict(pos)

    def ack(batch: list[Record], fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        for rec in batch:
            tp = (rec.topic, rec.partition)
            acked[tp] = max(acked[tp], rec.offset + 1)

    while any(pos[tp] < len(recs) for tp, recs in tps.items()):
        batch: list[Record] = []
        for _ in range(rng.randint(1, 25)):
            live = [tp for tp, recs in tps.items() if pos[tp] < len(recs)]
            if not live:
                break
            tp = rng.choice(live)
            batch.append(tps[tp][pos[tp]])
            pos[tp] += 1
        if tails is None:
            await runner.run_batch(batch)
            for rec in batch:
                acked[(rec.topic, rec.partition)] = rec.offset + 1
        else:
            tail = await runner.start_batch(batch)
            tail.add_done_callback(lambda fut, batch=batch: ack(batch, fut))  # type: ignore[misc]
            tails.append(tail)
        if rng.random() < 0.5:
            committed.update(acked)
    if tails:
        await tails[-1]
    committed.update(acked)


async def run_with_crashes(
    seed: int, n: int = 160, crashes: int = 3, multi: bool = False, persistent: bool = False,
    pipelined: bool = False,
) -> tuple[FakeKafka, FakeStore, dict[Any, Any]]:
    rng = random.Random(seed)
    tps = timeline(rng, n, multi)
    kafka = FakeKafka(rng)
    store = FakeStore(kafka, persistent)
    committed: dict[tuple[str, int], int] = {}
    for attempt in range(crashes + 1):
        crash_after = kafka.acked + rng.randint(1, 150) if attempt < crashes else None
        runner = StateFirstRunner(
            FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq",
            committed=lambda t, p: committed.get((t, p)),
        )
        pump = asyncio.create_task(kafka.pump(crash_after))
        tails: list[asyncio.Future[None]] | None = [] if pipelined else None
        work = asyncio.create_task(consume(rng, runner, tps, committed, tails))
        done, _ = await asyncio.wait({pump, work}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            pump.cancel()
            work.result()
            await asyncio.gather(pump, return_exceptions=True)
            if attempt < crashes:
                continue  # finished before the crash point: nothing more to test
            break
        work.cancel()  # SIGKILL: the worker is gone mid-batch, with its units' output acks
        for tail in tails or ():
            tail.cancel()
        await asyncio.gather(work, *(tails or ()), return_exceptions=True)
        kafka.crash()
        store.recover()
    return kafka, store, {"tps": tps}


def outputs(kafka: FakeKafka, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(v) for (t, _), log in kafka.logs.items() if t == topic for v in log]


def _items(r: Record) -> list[tuple[str, dict[str, Any]]]:
    """(input id, item) of every input of a good record, its own partition's items for a body."""
    data = orjson.loads(r.value or b"")
    if "items" not in data:
        return [(f"in:{r.src}", data)]
    return [(f"in:{r.src}#{j}", item) for j, item in enumerate(data["items"]) if part_of(item["key"]) == r.partition]


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-unit", "pipelined"])
@pytest.mark.parametrize("persistent", [False, True], ids=["memory", "rocksdb"])
@pytest.mark.parametrize("multi", [False, True], ids=["one-input", "bodies"])
@pytest.mark.parametrize("seed", range(40))
async def test_crashes_anywhere_keep_state_and_outputs_together(
    seed: int, multi: bool, persistent: bool, pipelined: bool
) -> None:
    """`bodies`: records that hold several inputs (a raw body split in place, one hop) share one
    offset in each key's guard; each item is still decided once and its outputs re-sent together.
    `rocksdb`: the local copy survives the crashes (`FakeStore.persistent`); what it holds must also
    be in the changelog by the end, or a worker taking the partition over would see outputs
    without their state. `pipelined`: batches through `start_batch`, the next decided while the
    last one's outputs wait for their acks (the conversation agent's way)."""
    kafka, store, ctx = await run_with_crashes(seed, multi=multi, persistent=persistent, pipelined=pipelined)
    if persistent:
        recovered = store.from_changelog()

        def durable(value: Any) -> Any:  # the local copy drops acknowledged pending outputs (`_settle`)
            return {k: v for k, v in value.items() if k != "p"} if isinstance(value, dict) and "p" in value else value

        for key, value in store.data.items():
            if not key.startswith(wheel.SLOT_PREFIX):  # a stale slot left locally is skipped when walked
                assert durable(recovered.get(key)) == durable(value), f"{key}: the local value is not the changelog's"
        # and the changelog's keys have their timers in the changelog's wheel
        slotted = {(int(name.split(":")[1]), int(name.split(":")[2]), k) for name, keys in recovered.items()
                   if name.startswith(wheel.SLOT_PREFIX) for k in keys}
        for key, value in recovered.items():
            if isinstance(value, dict) and value.get("v") == 2:
                for due in value["t"]:
                    assert any(p == part_of(key) and b >= wheel.bucket_of(due) and k == key for p, b, k in slotted), \
                        f"{key}: timer {due} not in the changelog's wheel"
    tps = ctx["tps"]
    out = outputs(kafka, "out")
    by_id: dict[str, dict[str, Any]] = {}
    for o in out:
        assert by_id.setdefault(o["id"], o) == o, f"output {o['id']} seen with two values: state was lost"
    records = [r for recs in tps.values() for r in recs if r.topic != "t" and r.value != b"bad"]
    good = {i for r in records for i, item in _items(r) if not item.get("boom")}
    inputs = {i for i in by_id if i.startswith("in:")}
    assert inputs == good, "an input lost its output (or an output has no input)"
    # the items of other partitions were forwarded (at least once: they follow from the bytes alone)
    forwarded = {orjson.loads(v)["id"] for (t, _), log in kafka.logs.items() if t == "fwd" for v in log}
    assert forwarded == {f"fwd:{r.src}#{j}" for r in records for j, item in enumerate(orjson.loads(r.value or b"")
                         .get("items", [])) if part_of(item["key"]) != r.partition}
    # per key the outputs number the inputs 1..N, N being the durable count
    per_key: dict[str, list[int]] = defaultdict(list)
    for o in by_id.values():
        if not o.get("timer"):
            per_key[o["key"]].append(o["n"])
    for key, ns in per_key.items():
        entry = runtime.Entry.load(store.data[key])
        assert entry is not None and entry.state is not None
        assert sorted(ns) == list(range(1, entry.state["n"] + 1)), key
    # dead letters: every bad record and every record the rules choked on
    bad = {r.src for recs in tps.values() for r in recs if r.topic != "t"
           and (r.value == b"bad" or any(item.get("boom") for _, item in _items(r)))}
    letters = {f"{d['source']['topic']}/{d['source']['partition']}/{d['source']['offset']}" for d in outputs(kafka, "dlq")}
    assert letters == bad
    # timers: fired once each, exactly for the keys whose due second the stream time passed
    metas = {p: store.data[meta_key(p)] for p in range(PARTITIONS)}
    waiting = {k for name, keys in store.data.items() if name.startswith(wheel.SLOT_PREFIX) for k in keys
               if int(name.split(":")[2]) > (metas[int(name.split(":")[1])]["cursor"] or 0)}
    for key in per_key:
        entry = runtime.Entry.load(store.data[key])
        assert entry is not None and entry.state is not None
        cursor, clock = metas[part_of(key)]["cursor"], metas[part_of(key)]["clock"]
        due, fired = entry.state["due"], entry.state["fired"]
        assert fired in (0, 1), (key, entry.state)
        # not before the stream time reached it; surely once its bucket was passed, unless a full
        # bucket made it spill into a later one
        assert not (fired and due > clock), (key, entry.state, clock)
        if cursor is not None and wheel.bucket_of(due) <= cursor:
            assert fired or key in waiting, (key, entry.state, cursor)
    # fired buckets leave no slots behind (deleted one unit after they were acknowledged)
    for p, meta in metas.items():
        f = meta["firing"]
        stale = [name for name in store.data if name.startswith(f"{wheel.SLOT_PREFIX}{p}:")
                 and f is not None and int(name.split(":")[2]) <= (meta["gc"] or -1)]
        assert stale == [], stale
    timer_ids = {i for i, o in by_id.items() if o.get("timer")}
    assert len(timer_ids) == sum(runtime.Entry.load(store.data[k]).state["fired"] for k in per_key)  # type: ignore[union-attr]
    # the durable counters agree with the state
    assert sum(m["counts"].get("open", {}).get("x", 0) for m in metas.values()) == len(per_key)
    assert sum(m["counts"].get("fired", {}).get("x", 0) for m in metas.values()) == len(timer_ids)
    # CSAT facts: one (source record, index) per fact, the same on every copy
    facts: dict[str, tuple[str, int]] = {}
    for f in outputs(kafka, "facts"):
        assert facts.setdefault(f["id"], (f["src"], f["index"])) == (f["src"], f["index"])
    assert len(set(facts.values())) == len(facts)
    assert set(facts) == timer_ids


async def test_stream_time_waits_for_queued_input() -> None:
    """A tick made after an input was written does not fire a timer until that input is consumed:
    the input re-arms the timer, so nothing fires."""
    kafka = FakeKafka(random.Random(1))
    store = FakeStore(kafka)
    stage = FakeStage()
    runner = StateFirstRunner(stage, store, FakeProducer(kafka), dlq_topic="dlq")
    pump = asyncio.create_task(kafka.pump(None))
    k = b"k1"
    first = Record("a", 0, 0, k, dumps({}), 10_000)
    await runner.run_batch([first])  # arms 11,500
    second = Record("a", 0, 1, k, dumps({}), 11_000)  # written at 11 s, still queued
    tick = Record("t", 0, 0, runtime.TICK_KEY, dumps(wheel.tick_value(20_000, {"a": 2})), 20_000)
    await runner.run_batch([tick])
    meta = store.data[meta_key(0)]
    assert meta["clock"] == 0 and meta["firing"] is None  # the tick waits for offset 1
    await runner.run_batch([second])
    tick2 = Record("t", 0, 1, runtime.TICK_KEY, dumps(wheel.tick_value(21_000, {"a": 2})), 21_000)
    await runner.run_batch([tick2])
    meta = store.data[meta_key(0)]
    assert meta["clock"] == 21_000
    entry = runtime.Entry.load(store.data["k1"])
    assert entry is not None and entry.state == {"n": 2, "fired": 1, "due": 11_500}
    pump.cancel()


@pytest.mark.parametrize(("tick_committed", "copies"), [(True, 1), (False, 2)], ids=["committed", "not-committed"])
async def test_a_firing_completed_before_a_clean_stop_is_not_sent_again(tick_committed: bool, copies: int) -> None:
    """A clean stop (or a rebalance) right after a timer firing, before the partition's meta was
    written again: the next incarnation finds the plan not marked sent. The record whose batch
    carried the firing is committed, so its outputs were all acknowledged: they are not sent again
    (a walk would send them twice, same ids). Uncommitted, the firing is walked again as after a crash."""
    kafka = FakeKafka(random.Random(3))
    store = FakeStore(kafka)
    pump = asyncio.create_task(kafka.pump(None))
    offsets = {"a": 1, "t": 1 if tick_committed else 0}

    def runner() -> StateFirstRunner:
        return StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq",
                                committed=lambda t, p: offsets.get(t))

    first = runner()
    await first.run_batch([Record("a", 0, 0, b"k", dumps({}), 10_000)])  # arms 11,500
    tick = Record("t", 0, 0, runtime.TICK_KEY, dumps(wheel.tick_value(20_000, {"a": 1})), 20_000)
    await first.run_batch([tick])  # fires k's timer; no later unit writes partition 0's meta
    plan = store.data[meta_key(0)]["firing"]
    assert plan["sent"] < plan["upto"] and plan["by"] == tick.src
    store.recover()  # a restart: the memory store rebuilt from the changelog
    await runner().run_batch([Record("a", 0, 1, b"other", dumps({}), 21_000)])
    assert [o["id"] for o in outputs(kafka, "out") if o.get("timer")] == ["timer:k:11500"] * copies
    meta = store.data[meta_key(0)]
    assert meta["firing"]["sent"] == meta["firing"]["upto"]
    pump.cancel()


async def test_redelivered_input_resends_pending_outputs_only() -> None:
    kafka = FakeKafka(random.Random(2))
    store = FakeStore(kafka)
    committed: dict[tuple[str, int], int] = {}

    def runner() -> StateFirstRunner:
        return StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq",
                                committed=lambda t, p: committed.get((t, p)))

    first = runner()
    pump = asyncio.create_task(kafka.pump(None))
    recs = [Record("a", 0, i, b"k", dumps({}), 1_000 + i) for i in range(3)]
    await first.run_batch(recs)
    assert len(outputs(kafka, "out")) == 3

    def writes_of_k() -> int:
        return sum(1 for key, _ in kafka.logs[("cl", 0)] if key == "k")

    writes = writes_of_k()
    # the same batch again in the same process (a rebalance before the commit): its outputs were
    # acknowledged, so the local value no longer holds them (`_settle`): nothing decided or sent
    await first.run_batch(recs)
    assert len(outputs(kafka, "out")) == 3 and writes_of_k() == writes
    assert runtime.Entry.load(store.data["k"]).pending == []  # type: ignore[union-attr]
    # a crash before the commit: the table comes back from the changelog, pending included;
    # the redelivery is decided once and its outputs are re-sent, with no writes
    store.recover()
    again = runner()
    await again.run_batch(recs)
    out = outputs(kafka, "out")
    assert len(out) == 6 and {o["n"] for o in out} == {1, 2, 3}
    assert writes_of_k() == writes  # (the new incarnation writes only the partition's meta)
    # once committed, a later unit drops them: redelivering the first batch now re-sends nothing
    committed[("a", 0)] = 3
    await again.run_batch([Record("a", 0, 3, b"k", dumps({}), 2_000)])
    await again.run_batch(recs)
    assert len(outputs(kafka, "out")) == 7
    pump.cancel()


async def test_one_write_per_key_per_unit() -> None:
    kafka = FakeKafka(random.Random(3))
    store = FakeStore(kafka)
    runner = StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq")
    pump = asyncio.create_task(kafka.pump(None))
    recs = [Record("a", 0, i, f"k{i % 2}".encode(), dumps({}), 1_000) for i in range(10)]
    await runner.run_batch(recs)
    written = [key for key, _ in kafka.logs[("cl", 0)]]
    # two conversation keys, their (shared) wheel slot, the meta: each once
    assert sorted(written) == sorted(["k0", "k1", wheel.slot_key(0, 2), meta_key(0)])
    entry = runtime.Entry.load(orjson.loads(dict(kafka.logs[("cl", 0)])["k0"]))
    assert entry is not None and [p[0] for p in entry.pending] == [f"a/0/{i}" for i in range(0, 10, 2)]
    pump.cancel()


def ack_queued(kafka: FakeKafka, topic: str) -> int:
    """Acknowledge every write queued on `topic` (in order per partition); how many there were."""
    n = 0
    for (t, p), q in kafka.queues.items():
        while t == topic and q:
            fut, payload = q.popleft()
            kafka.logs[(t, p)].append(payload)
            kafka.acks[(t, p)] = len(kafka.logs[(t, p)])
            fut.set_result(None)
            n += 1
    return n


def queued(kafka: FakeKafka, topic: str) -> list[Any]:
    return [payload for (t, _), q in kafka.queues.items() if t == topic for _, payload in q]


async def until(cond: Callable[[], Any], what: str) -> None:
    """Let the runner's tasks run until `cond()` holds (they only wait for the acks given here)."""
    for _ in range(100):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


async def test_pipelined_units_keep_the_changelog_order_and_their_pending_entries() -> None:
    """The unit pipeline: batch 2 is taken while batch 1's changelog acks are out, decided on batch
    1's values (the overlay) and not written anywhere until they come: then to the local store and
    the changelog; its outputs after batch 1's were acknowledged. Batch 2's value keeps batch 1's
    pending entry while batch 1's outputs are in flight. A third batch waits for the first one
    (PIPELINE_DEPTH)."""
    kafka = FakeKafka(random.Random(0))
    store = FakeStore(kafka, persistent=True)
    runner = StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq")
    key = "k0"
    p = part_of(key)
    recs = [Record("a", p, i, key.encode(), dumps({}), 1_000 + i) for i in range(3)]

    first = await runner.start_batch([recs[0]])
    # the local value when batch 1 is done (before anything waiting for it resumes)
    at_first_done: list[int] = []
    first.add_done_callback(lambda _: at_first_done.append(store.data[key]["s"]["n"]))
    await until(lambda: queued(kafka, "cl"), "batch 1's changelog records sent")
    logged_first = len(queued(kafka, "cl"))
    second = await runner.start_batch([recs[1]])
    await asyncio.sleep(0)
    assert len(queued(kafka, "cl")) == logged_first, "batch 2 wrote to the changelog before batch 1's acks"
    assert store.data[key]["s"]["n"] == 1, "batch 2 wrote the local store before batch 1's acks"
    assert runtime.Entry.load(runner._overlay.get(key)).state["n"] == 2  # type: ignore[union-attr]
    third = asyncio.ensure_future(runner.start_batch([recs[2]]))
    await asyncio.sleep(0)
    assert not third.done(), "three units in flight"

    assert ack_queued(kafka, "cl") == logged_first
    await until(lambda: queued(kafka, "cl"), "batch 2's changelog records sent")
    assert store.data[key]["s"]["n"] == 2
    pending = [q[0] for q in store.data[key]["p"]]
    assert pending == [f"a/{p}/0", f"a/{p}/1"], "batch 1's outputs are in flight: its pending entry must stay"
    ack_queued(kafka, "cl")
    await until(lambda: runner._logged is not None and runner._logged.done(), "batch 2's changelog acked")
    assert [orjson.loads(v)["n"] for v in queued(kafka, "out")] == [1], "batch 2's outputs before batch 1's acks"

    async def acked(fut: asyncio.Future[Any]) -> Any:
        while not fut.done():
            ack_queued(kafka, "cl")
            ack_queued(kafka, "out")
            await asyncio.sleep(0)
        return fut.result()

    await acked(await acked(third))
    assert first.done() and second.done()
    assert at_first_done == [2], "settling batch 1 replaced batch 2's value"
    assert [o["n"] for o in outputs(kafka, "out")] == [1, 2, 3]
    assert store.data[key]["p"] == [] and runner._overlay.values == {} and runner._unacked == {}
    assert store.from_changelog()[key]["s"]["n"] == 3


async def test_a_failed_write_raises_before_any_output() -> None:
    kafka = FakeKafka(random.Random(4))
    kafka.fail_topic = "cl"
    store = FakeStore(kafka)
    runner = StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq")
    pump = asyncio.create_task(kafka.pump(None))
    with pytest.raises(WriteFailed):
        await runner.run_batch([Record("a", 0, 0, b"k", dumps({}), 1_000)])
    assert outputs(kafka, "out") == []
    pump.cancel()


async def test_deleted_state_keeps_its_guard_until_purged() -> None:
    class Forgetting(FakeStage):
        def decide(self, state: dict[str, Any] | None, inp: Input, key: str, rec: Record, facts: FactSeq) -> Step:
            if inp.data.get("forget"):
                return Step(None, None, [Out("out", key, dumps({"id": inp.id, "forgot": True}))], [])
            return super().decide(state, inp, key, rec, facts)

    kafka = FakeKafka(random.Random(5))
    store = FakeStore(kafka)
    runner = StateFirstRunner(Forgetting(), store, FakeProducer(kafka), dlq_topic="dlq")
    pump = asyncio.create_task(kafka.pump(None))
    msg = Record("a", 0, 0, b"k", dumps({}), 1_000)
    forget = Record("a", 0, 1, b"k", dumps({"forget": True}), 2_000)
    await runner.run_batch([msg, forget])
    entry = runtime.Entry.load(store.data["k"])
    assert entry is not None and entry.state is None and entry.purge_at == 2_000 + runtime.PURGE_AFTER_MS
    store.recover()  # a crash before the commit: the table from the changelog, pending included
    runner = StateFirstRunner(Forgetting(), store, FakeProducer(kafka), dlq_topic="dlq")
    await runner.run_batch([msg, forget])  # a redelivery: not decided again (no new conversation) ...
    out = outputs(kafka, "out")
    assert [o.get("n") for o in out] == [1, None, 1, None] and out[2:] == out[:2]  # ... its pending outputs again
    t = 2_000 + runtime.PURGE_AFTER_MS + 1_000
    await runner.run_batch([Record("t", 0, 0, runtime.TICK_KEY, dumps(wheel.tick_value(t, {"a": 2})), t)])
    assert "k" not in store.data and kafka.logs[("cl", 0)][-2] == ("k", None) or ("k", None) in kafka.logs[("cl", 0)]
    pump.cancel()


async def test_legacy_state_is_read_and_its_timers_fire() -> None:
    """A value written before this runner (the rules' state itself, old wheel and cursor keys)."""
    kafka = FakeKafka(random.Random(6))
    store = FakeStore(kafka)
    store.data = {"k": {"n": 4, "fired": 0, "due": 3_000, "o": {"a": 9}}, "\x00cursor:0": 1, wheel.slot_key(0, 3): ["k"]}
    runner = StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq")
    pump = asyncio.create_task(kafka.pump(None))
    await runner.run_batch([Record("t", 0, 0, runtime.TICK_KEY, dumps(wheel.tick_value(5_000, {})), 5_000)])
    entry = runtime.Entry.load(store.data["k"])
    assert entry is not None and not entry.legacy and entry.state is not None and entry.state["fired"] == 1
    await runner.run_batch([Record("a", 0, 0, b"k", dumps({}), 6_000)])  # old per-topic offsets are not trusted
    assert runtime.Entry.load(store.data["k"]).state["n"] == 5  # type: ignore[union-attr]
    pump.cancel()


async def test_a_clean_restart_sends_nothing_again() -> None:
    """After a graceful stop (everything committed) a new incarnation touching the same keys, and
    re-walking nothing, sends no output twice; a crash (nothing committed) sends the last unit's
    outputs again even when another input of the key comes first."""
    kafka = FakeKafka(random.Random(7))
    store = FakeStore(kafka)
    committed: dict[tuple[str, int], int] = {}
    pump = asyncio.create_task(kafka.pump(None))

    def runner() -> StateFirstRunner:
        return StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq",
                                committed=lambda t, p: committed.get((t, p)))

    first = [Record("a", 0, 0, b"k", dumps({}), 1_000), Record("b", 0, 0, b"k", dumps({}), 1_100)]
    await runner().run_batch(first)
    committed.update({("a", 0): 1, ("b", 0): 1})
    await runner().run_batch([Record("a", 0, 1, b"k", dumps({}), 1_200)])
    assert [o["n"] for o in outputs(kafka, "out")] == [1, 2, 3]
    # crash: b/0/1 was decided and written, its commit never happened; the restarted worker
    # rebuilds the table from the changelog; an input of another topic-partition comes first,
    # then the redelivery
    await runner().run_batch([Record("b", 0, 1, b"k", dumps({}), 1_300)])
    store.recover()
    again = runner()
    await again.run_batch([Record("a", 0, 2, b"k", dumps({}), 1_400)])
    await again.run_batch([Record("b", 0, 1, b"k", dumps({}), 1_300)])
    assert [o["n"] for o in outputs(kafka, "out")] == [1, 2, 3, 4, 5, 4]
    pump.cancel()


@pytest.mark.parametrize("first_in", ["redelivery", "another input"])
async def test_a_value_left_ahead_of_the_changelog_is_written_again_with_its_wheel_slot(first_in: str) -> None:
    """RocksDB keeps a local write whose changelog record was lost with the process. The
    redelivered input is not decided again (the local value includes it), but its value and the
    wheel slot of its timer are written again before its outputs: otherwise its offset would be
    committed while the changelog, which another worker recovers from, lacks it. When another
    input of the key comes first, the key's new value goes out with that slot too."""
    kafka = FakeKafka(random.Random(9))
    store = FakeStore(kafka, persistent=True)
    first = StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq")
    msg = Record("a", 0, 0, b"k", dumps({}), 1_000)
    work = asyncio.create_task(first.run_batch([msg]))  # no pump: nothing is acknowledged
    for _ in range(1_000):
        if kafka.queues[("cl", 0)]:
            break
        await asyncio.sleep(0)
    work.cancel()  # SIGKILL; none of its records landed
    await asyncio.gather(work, return_exceptions=True)
    for q in kafka.queues.values():
        for fut, _ in q:
            fut.cancel()
        q.clear()
    store.recover()
    assert "k" in store.data and store.from_changelog() == {}  # the local copy is ahead
    pump = asyncio.create_task(kafka.pump(None))
    again = StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq")
    n = 1
    if first_in == "another input":
        await again.run_batch([Record("b", 0, 0, b"k", dumps({}), 1_100)])
        n = 2
    await again.run_batch([msg])
    recovered = store.from_changelog()
    entry = runtime.Entry.load(recovered["k"])
    assert entry is not None and entry.state == {"n": n, "fired": 0, "due": 2_500} and entry.timers == [2_500]
    assert ["k"] in [keys for name, keys in recovered.items() if name.startswith(wheel.SLOT_PREFIX)]
    assert sorted(o["n"] for o in outputs(kafka, "out")) == list(range(1, n + 1))  # each once
    pump.cancel()


def test_held_stream_time_is_logged_with_what_it_waits_for(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Stream time held back for over `HELD_WARN_SECONDS` is logged (once a minute at most, per
    partition) with what it waits for; timers wait meanwhile, so an operator needs to know why."""
    clock = [1000.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    held = runtime.HeldWarning("stream time of partition {p} waits for its input")
    tick = wheel.Tick(5, {"split": 40, "actions": 3})
    progress = {"split": 12, "actions": 3}.__getitem__
    caplog.set_level(logging.WARNING, logger="messenger_streams.runtime")

    def check(at: float) -> list[str]:
        clock[0] = at
        caplog.clear()
        held.check(1, lambda: runtime._lagging(tick, progress))
        return [r.getMessage() for r in caplog.records]

    assert check(1000.0) == [] and check(1000.0 + runtime.HELD_WARN_SECONDS - 1) == []
    assert check(1000.0 + runtime.HELD_WARN_SECONDS) == [
        "stream time of partition 1 waits for its input for 30 s (timers wait): split at 12 of 40"]
    assert check(1059.0) == []  # once a minute at most
    assert check(1091.0) != []
    held.clear(1)  # the tick was proven: a new hold counts from its own start
    assert check(1200.0) == [] and check(1229.0) == [] and check(1231.0) != []


def test_stream_time_lag_grows_while_stream_time_stands_still(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lag gauge is refreshed between advances (a stuck stream time shows as a growing lag),
    and a partition no longer owned is dropped from it."""
    from prometheus_client import REGISTRY

    wall = [1_000.0]
    monkeypatch.setattr(runtime.time, "time", lambda: wall[0])
    kafka = FakeKafka(random.Random(1))
    runner = runtime.StateFirstRunner(FakeStage(), FakeStore(kafka), FakeProducer(kafka), dlq_topic="dlq")
    runner.stream_times.update({0: 990_000, 1: 999_000})

    def lag(p: int) -> float | None:
        return REGISTRY.get_sample_value("messenger_stream_time_lag_seconds", {"partition": str(p)})

    runner.refresh_stream_lag({0, 1})
    assert (lag(0), lag(1)) == (10.0, 1.0)
    wall[0] = 1_060.0
    runner.refresh_stream_lag({0})
    assert (lag(0), lag(1)) == (70.0, None) and set(runner.stream_times) == {0}


async def test_changelog_values_stay_small_in_a_burst() -> None:
    """A burst of input for one key, and counter changes on many keys of one partition, in one
    batch: the unit is cut, so a key's value holds at most `KEY_VALUE_TARGET_BYTES` of state and
    pending outputs (plus one input's outputs), a partition's meta at most `UNIT_MAX_JOURNAL`
    journaled keys, a wheel slot at most `wheel.CHUNK_KEYS` keys: no value over 16 KB.
    Every output still arrives, once and in order."""
    kafka = FakeKafka(random.Random(5))
    store = FakeStore(kafka)
    runner = StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq")
    pump = asyncio.create_task(kafka.pump(None))
    burst = [Record("a", 0, i, b"k0", dumps({"i": i}), 1_000 + i) for i in range(400)]  # ~40 KB of pending
    # 600 conversations open on partition 1 (keys as long as a page's and a person's ids): counter shares
    keys = [k for k in (f"1691462197845448:{7_000_000_000_000_000 + i}" for i in range(2_000)) if part_of(k) == 1][:600]
    many = [Record("b", 1, i, k.encode(), dumps({}), 2_000 + i) for i, k in enumerate(keys)]
    await runner.run_batch(burst + many)
    pump.cancel()
    values = {p: [(key, data) for key, data in kafka.logs[("cl", p)]] for p in (0, 1)}
    k0 = [len(data) for key, data in values[0] if key == "k0"]
    assert len(k0) >= 3 and max(k0) <= runtime.KEY_VALUE_TARGET_BYTES + 1_024
    metas = [len(data) for key, data in values[1] if key == meta_key(1)]
    assert len(metas) >= 600 // runtime.UNIT_MAX_JOURNAL and max(metas) <= 16_384
    assert max(len(data) for p in (0, 1) for _, data in values[p] if data is not None) <= 16_384
    out = outputs(kafka, "out")
    assert [o["n"] for o in out if o["key"] == "k0"] == list(range(1, 401))
    assert sorted(o["key"] for o in out if o["key"] != "k0") == sorted(keys)


async def test_a_tick_waiting_for_its_data_is_logged_by_the_runner(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The runner's wiring of the held-time log: a tick whose input is not consumed for over
    `HELD_WARN_SECONDS` is logged with the topic and offsets it waits for; once proven, the hold
    ends. And the upstream form names the raw partitions the group has not committed."""
    clock = [1000.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="messenger_streams.runtime")
    kafka = FakeKafka(random.Random(3))
    store = FakeStore(kafka)
    runner = StateFirstRunner(FakeStage(), store, FakeProducer(kafka), dlq_topic="dlq")
    pump = asyncio.create_task(kafka.pump(None))
    tick = Record("t", 0, 0, runtime.TICK_KEY, dumps(wheel.tick_value(20_000, {"a": 3})), 20_000)
    await runner.run_batch([tick, Record("a", 0, 0, b"k1", dumps({}), 10_000)])
    clock[0] += runtime.HELD_WARN_SECONDS
    await runner.run_batch([Record("a", 0, 1, b"k1", dumps({}), 10_001)])
    assert [r.getMessage() for r in caplog.records] == [
        "stream time of partition 0 waits for its input for 30 s (timers wait): a at 2 of 3"]
    await runner.run_batch([Record("a", 0, 2, b"k1", dumps({}), 10_002)])  # the tick's data is in
    assert store.data[meta_key(0)]["clock"] == 20_000
    caplog.clear()
    clock[0] += 120
    tick2 = Record("t", 0, 1, runtime.TICK_KEY, dumps(wheel.tick_value(21_000, {"a": 4})), 21_000)
    await runner.run_batch([tick2])  # a new hold starts now: nothing logged
    assert caplog.records == []
    pump.cancel()
    assert runtime._uncommitted("raw", {0: 10, 1: 4227, 2: 0}, {0: 10, 1: 62}) == "raw partition 1 committed 62 of 4227"


"""The conversation stage's record ↔ rules plumbing, without Kafka: decoding and its dead-letter
reasons, CSAT facts stamped with their source (decision C), counter deltas from notes, skill topics,
and the ingest splitter's catch-all per record."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka.errors import MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from faust.stores.memory import Store as MemoryStore

from streams.core.config import ConnectorConfig
from streams.core.pages import PageDirectory
from streams.core.settings import Settings
from streams.rules import wheel
from streams.rules.conversation.api import Decision, Input, Output
from streams.stages import conversation, ingest
from streams.stages.app import CachedPartitioner, create_pipeline
from streams.stages.conversation import ConversationStage, counter_deltas
from streams.stages.pages import LivePages
from streams.stages.runtime import BadRecord, FactSeq, Keyed, Record, Split, TickIn

CONFIG = ConnectorConfig.model_validate(
    {"account": {"app_id": "1"}, "routing": {"default_skill": "general"}, "pages": [{"page_id": "P1", "skill": "billing"}]}
)


def pipe(raw_partitions: int | None = 8, **settings: Any) -> Any:
    """A pipeline as the stages see it; its app only answers the partitioner and the raw topic's
    partition count (what the consumer's metadata says)."""
    s = Settings(**settings)
    consumer = SimpleNamespace(topic_partitions=lambda topic: raw_partitions)
    app = SimpleNamespace(conf=SimpleNamespace(producer_partitioner=CachedPartitioner()), consumer=consumer)
    return SimpleNamespace(settings=s, config=CONFIG, skill_topics={k: None for k in CONFIG.all_skills()},
                           pages=LivePages(PageDirectory(CONFIG), s), app=app)  # the TOML's pages (not started)


class FakeDecider:
    """Returns a prepared decision and records what it was asked."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.calls: list[tuple[Any, Input, str]] = []

    def env_for(self, page_id: str) -> Any:
        return page_id

    def decide(self, state: Any, inp: Input, key: str, env: Any) -> Decision:
        self.calls.append((state, inp, key))
        return self.decision


def rec(topic: str, value: Any, key: bytes | None = b"P1:u1", offset: int = 7) -> Record:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return Record(topic, 1, offset, key, raw, 1_000)


def test_parse_inputs_ticks_and_bad_records() -> None:
    stage = ConversationStage(pipe(), FakeDecider(Decision({})))  # type: ignore[arg-type]
    n = stage.names
    ev = stage.parse(rec(n["split"], {"idempotency_key": "ik", "received_at": 5}))
    assert ev == Keyed("P1:u1", Input("event", "ik", 5, {"idempotency_key": "ik", "received_at": 5}))
    act = stage.parse(rec(n["actions"], {"action_id": "a1"}))
    assert isinstance(act, Keyed) and act.inp.id == "action:a1" and act.inp.now == 1_000
    res = stage.parse(rec(n["send_results"], {"outbox_id": "ob"}))
    assert isinstance(res, Keyed) and res.inp.id == "result:ob"
    tick = stage.parse(rec(n["ticks"], wheel.tick_value(9, {"x": 1}), key=b"\x00tick"))
    assert isinstance(tick, TickIn) and tick.tick.now == 9
    for r, reason in (
        (rec(n["actions"], b"not json"), "invalid_action"),
        (rec(n["actions"], [1, 2]), "invalid_action"),
        (rec(n["actions"], {"action_id": "a"}, key=None), "invalid_action"),
        (rec(n["split"], {"idempotency_key": "x"}, key=b"\xff\xfe"), "processing_error"),
        (rec(n["ticks"], {"now": 5}), "processing_error"),  # a tick of old (no end offsets): proves nothing
        (rec(n["split"], b"{"), "processing_error"),
    ):
        with pytest.raises(BadRecord) as info:
            stage.parse(r)
        assert info.value.reason == reason, r


def test_facts_stamped_with_their_source_and_outputs_routed() -> None:
    decision = Decision(
        {"n": 1},
        outputs=[
            Output("skill", "P1:u1", {"type": "csat_requested"}, "billing"),
            Output("csat_facts", "P1:u1", {"fact": "survey_sent", "fact_id": "c:survey"}),
            Output("outbound", "P1:u1", {"outbox_id": "ob-1"}),
            Output("csat_facts", "P1:u1", {"fact": "answer", "fact_id": "c:answer"}),
            Output("skill", "P1:u1", {"type": "x"}, "nonexistent"),
        ],
        arms=[5_000],
        notes=[("open+", "billing"), ("queue+", "billing"), ("outbound", "system"), ("open", "bad")],
    )
    stage = ConversationStage(pipe(publish_events=True), FakeDecider(decision))  # type: ignore[arg-type]
    r = rec(stage.names["split"], {"idempotency_key": "ik"})
    step = stage.decide(None, Input("event", "ik", 1, {}), "P1:u1", r, FactSeq())
    topics = [o.topic for o in step.outputs]
    t = Settings().topics
    assert topics == [t.name("events"), t.skill("billing"), t.name("csat_facts"), t.name("outbound"),
                      t.name("csat_facts"), t.skill("general")]
    assert step.outputs[0].value == r.value  # the event as consumed, first
    facts = [orjson.loads(o.value) for o in step.outputs if o.topic == t.name("csat_facts")]
    assert [f["src"] for f in facts] == [
        {"topic": r.topic, "partition": 1, "offset": 7, "index": 0},
        {"topic": r.topic, "partition": 1, "offset": 7, "index": 1},
    ]
    assert step.arms == [5_000] and step.state == {"n": 1} and orjson.loads(step.state_bytes or b"") == {"n": 1}
    assert step.deltas == [("open", "billing", 1), ("queued", "billing", 1)]
    assert step.outputs[1].label == ("billing", "csat_requested")


def test_fact_index_continues_across_the_inputs_of_one_record() -> None:
    decision = Decision({}, outputs=[Output("csat_facts", "k", {"fact": "answer"})])
    stage = ConversationStage(pipe(), FakeDecider(decision))  # type: ignore[arg-type]
    r = rec(stage.names["ticks"], {}, key=b"\x00tick")
    facts = FactSeq(3)  # timers fired by one tick share its record: indexes continue
    for _ in range(2):
        stage.decide({}, Input("timer", "t", 1, {}), "k", r, facts)
    assert facts.n == 5


def test_duplicates_write_nothing() -> None:
    stage = ConversationStage(pipe(), FakeDecider(Decision(None, duplicate=True, notes=[("duplicate", "message")])))  # type: ignore[arg-type]
    step = stage.decide({"a": 1}, Input("event", "ik", 1, {}), "k", rec("x", {}), FactSeq())
    assert step.duplicate and step.outputs == [] and step.state == {"a": 1}


def test_counter_deltas() -> None:
    assert counter_deltas([("open+", "s"), ("open-", "s"), ("queue-", "t"), ("other", "s"), ("open+", "")]) == [
        ("open", "s", 1), ("open", "s", -1), ("queued", "t", -1)]


class FakeProducer:
    def __init__(self, too_large: set[bytes] = frozenset()) -> None:  # type: ignore[assignment]
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.too_large = too_large

    async def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None) -> Any:
        if key in self.too_large:
            raise ProducerSendError("Error while sending") from MessageSizeTooLargeError()
        self.sent.append((topic, key, value))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def send_now(self) -> None:
        pass


def body(*psids: str) -> bytes:
    return orjson.dumps({"object": "page", "entry": [{"id": "P1", "time": 1, "messaging": [
        {"sender": {"id": p}, "recipient": {"id": "P1"}, "timestamp": 5, "message": {"mid": f"m-{p}"}}
        for p in psids]}]})


async def test_splitter_catch_all_per_record(monkeypatch: pytest.MonkeyPatch) -> None:
    producer = FakeProducer(too_large={b"P1:huge"})
    splitter = ingest.Splitter(pipe(), producer)  # type: ignore[arg-type]
    t = Settings().topics
    real_split = ingest.split_body

    def split_or_fail(raw: bytes, **kw: Any) -> Any:
        if raw == b"boom":
            raise AttributeError("'NoneType' object has no attribute 'get'")  # a malformed nested field
        return real_split(raw, **kw)

    monkeypatch.setattr(ingest, "split_body", split_or_fail)
    records = [Record(t.name("raw"), 0, i, None, v, 1_000) for i, v in enumerate([body("a"), b"boom", body("b", "huge")])]
    await splitter.run_batch(records)
    split = [orjson.loads(v)["psid"] for topic, _, v in producer.sent if topic == t.name("split")]
    letters = [orjson.loads(v) for topic, _, v in producer.sent if topic == t.name("dlq")]
    assert split == ["a", "b"]
    assert [(d["reason"], d["source"]["offset"], d["item_index"]) for d in letters] == [
        ("processing_error", 1, None), ("processing_error", 2, "entry[0].messaging[1]")]
    assert "AttributeError" in letters[0]["error"] and letters[0]["payload"] == "boom"


def test_received_at_header() -> None:
    assert ingest.received_at([("received-at", b"123")], 9) == 123
    assert ingest.received_at([("received-at", b"x")], 9) == 9
    assert ingest.received_at([], 9) == 9


def partition_of(key: str, n: int = 8) -> int:
    every = list(range(n))
    return CachedPartitioner()(key.encode(), every, every)


def test_a_raw_body_is_split_in_place_for_its_own_partition() -> None:
    """One hop (issue 18): the events of the record's own partition become inputs, in the body's
    order, exactly as the split topic's consumer would read them; the others are forwarded to the
    split topic; bad items become dead letters with the raw body."""
    stage = ConversationStage(pipe(), FakeDecider(Decision({})))  # type: ignore[arg-type]
    t = Settings().topics
    here = partition_of("P1:a")
    other = next(p for p in ("b", "c", "d", "e", "f") if partition_of(f"P1:{p}") != here)
    doc = orjson.loads(body("a", other, "a"))
    doc["entry"][0]["messaging"].append(42)  # a bad item
    raw = orjson.dumps(doc)
    r = Record(t.name("raw"), here, 11, b"P1:a", raw, 1_000, [("received-at", b"900")])
    parsed = stage.parse(r)
    assert isinstance(parsed, Split)
    assert [(k.key, k.inp.data["mid"], k.inp.now) for k in parsed.inputs] == [("P1:a", "m-a", 900)] * 2
    assert [k.inp.data["source"]["index"] for k in parsed.inputs] == ["entry[0].messaging[0]", "entry[0].messaging[2]"]
    forwarded = [(o.topic, o.key, orjson.loads(o.value)) for o in parsed.outs if o.topic == t.name("split")]
    assert [(topic, key) for topic, key, _ in forwarded] == [(t.name("split"), f"P1:{other}".encode())]
    assert forwarded[0][2]["source"] == {"topic": t.name("raw"), "partition": here, "offset": 11,
                                         "index": "entry[0].messaging[1]"}
    letters = [orjson.loads(o.value) for o in parsed.outs if o.topic == t.name("dlq")]
    assert [(d["reason"], d["item_index"]) for d in letters] == [("invalid_item", "entry[0].messaging[3]")]
    # the same body unkeyed, or keyed otherwise, on the same partition: every event takes two hops
    for key in (None, b"k1", f"P1:{other}".encode()):
        again = stage.parse(Record(t.name("raw"), here, 12, key, raw, 1_000))
        assert isinstance(again, Split) and again.inputs == []
        assert sorted(orjson.loads(o.value)["psid"] for o in again.outs if o.topic == t.name("split")) == sorted(
            ["a", other, "a"])
    assert letters[0]["payload"] == raw.decode()
    # the input is what the two-hop path decides: the split event's JSON, read back
    split_value = next(o.value for o in parsed.outs if o.topic == t.name("split"))
    two_hop = stage.parse(Record(t.name("split"), here, 0, f"P1:{other}".encode(), split_value, 1_000))
    assert isinstance(two_hop, Keyed) and two_hop.inp.data["source"]["index"] == "entry[0].messaging[1]"
    assert parsed.inputs[0].inp.data.keys() == two_hop.inp.data.keys()


def test_a_raw_topic_whose_partition_count_changed_ends_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions added to raw while workers run: faust now assigns raw apart from the table, so
    deciding in place could write another worker's partitions. The worker ends (its restart refuses
    with the reason) rather than go on."""
    from streams.stages import conversation

    def crash(exc: BaseException) -> None:
        raise SystemExit(str(exc))

    monkeypatch.setattr(conversation, "crash_worker", crash)
    stage = ConversationStage(pipe(raw_partitions=12), FakeDecider(Decision({})))  # type: ignore[arg-type]
    t = Settings().topics
    with pytest.raises(SystemExit, match="now has 12 partitions, not 8: one hop cannot go on"):
        stage.parse(Record(t.name("raw"), partition_of("P1:a"), 0, b"P1:a", body("a"), 1_000))


def test_publish_events_writes_the_event_of_a_body_split_in_place() -> None:
    stage = ConversationStage(pipe(publish_events=True), FakeDecider(Decision({})))  # type: ignore[arg-type]
    t = Settings().topics
    r = Record(t.name("raw"), partition_of("P1:a"), 0, b"P1:a", body("a"), 1_000)
    parsed = stage.parse(r)
    assert isinstance(parsed, Split)
    step = stage.decide(None, parsed.inputs[0].inp, "P1:a", r, FactSeq())
    assert step.outputs[0].topic == t.name("events")
    assert orjson.loads(step.outputs[0].value) == parsed.inputs[0].inp.data


def test_rocksdb_memory_is_bounded_per_table_partition(tmp_path: Path) -> None:
    """faust's defaults (64 MB memtables x3, a 2 GB block cache per partition) are replaced in the
    store faust builds for the conversations table."""
    assert conversation.rocksdb_options(Settings()) is None  # memory://: nothing to bound
    settings = Settings(store="rocksdb://", datadir=str(tmp_path), rocksdb_write_buffer_mb=3, rocksdb_block_cache_mb=5)
    tables = create_pipeline(settings, CONFIG).app.tables
    built = tables["conversations"].data.rocksdb_options
    assert (built.write_buffer_size, built.max_write_buffer_number, built.block_cache_size) == (3 << 20, 2, 5 << 20)
    # the CSAT stage's table stays in memory whatever the store setting (it writes without an event)
    assert isinstance(tables["csat_cells"].data, MemoryStore)

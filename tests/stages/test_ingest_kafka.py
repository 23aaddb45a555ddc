"""Ingest on real Kafka: raw bodies in → exactly the expected normalized events, and dead letters."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from streams.rules.normalize import conversation_key_of, split_body
from tests.kafkatools import KafkaIO, Worker
from tests.rules.test_normalize import WEBHOOK_SAMPLES, body_of

pytestmark = pytest.mark.kafka


def msg_body(page: str, psid: str, mid: str, text: str = "hi") -> bytes:
    return orjson.dumps({"object": "page", "entry": [{"id": page, "time": 1, "messaging": [
        {"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": 1700000000000,
         "message": {"mid": mid, "text": text}}]}]})


@pytest.mark.parametrize("one_hop", [True, False], ids=["one-hop", "two-hops"])
async def test_raw_bodies_to_normalized_events_and_dead_letters(
    make_worker: Callable[..., Worker], kafka: KafkaIO, one_hop: bool
) -> None:
    """Both paths of a raw body: split in place by the conversation stage (one hop, the default:
    only events of another partition go through the split topic), or by `split_webhooks`."""
    w = make_worker(MESSENGER_STREAMS_MAX_BODY_BYTES="20000", MESSENGER_STREAMS_PUBLISH_EVENTS="true",
                    MESSENGER_STREAMS_ONE_HOP=str(one_hop).lower())
    good: list[bytes] = [body_of(p) for p in WEBHOOK_SAMPLES]
    good += [msg_body("1691462197845448", f"u{i}", f"m-{i}") for i in range(20)]
    duplicates = [good[0], good[5], msg_body("1691462197845448", "u3", "m-3", text="redelivered")]
    bad = [
        b'{"object":"page","entry":[{"id":"1","messaging":[{"sender":',
        b"\xff\xfe binary junk",
        b'{"object":"instagram","entry":[]}',
        orjson.dumps({"object": "page", "entry": [{"id": "1", "messaging": [{}]}], "pad": "x" * 30000}),
    ]
    mixed = orjson.dumps({"object": "page", "entry": [{"id": "p9", "time": 1, "messaging": [
        {"sender": {"id": "u1"}, "recipient": {"id": "p9"}, "timestamp": 5, "message": {"mid": "mixed-ok"}},
        {"sender": {"id": False}, "recipient": {"id": "p9"}, "timestamp": 5, "message": {"mid": "mixed-bad"}},
    ]}]})
    inputs = good + duplicates + bad + [mixed]
    # keyed by conversation as the webhook keys them (decided in place with one hop), unkeyed, or otherwise
    keys = [[conversation_key_of(raw, 20000), None, f"k{i}"][i % 3] for i, raw in enumerate(inputs)]
    # received now: a redelivery counts as a duplicate within the dedupe horizon of the stream time, and
    # the stream time is the worker's clock (a receive time years ago is pruned from the state by the
    # first timer that compacts it, and its redelivery is then new: the test flaked so)
    received = str(int(time.time() * 1000)).encode()
    for raw, key in zip(inputs, keys, strict=True):
        await kafka.send(w.topic("messenger.webhook.raw"), raw, key=key, headers=[("received-at", received)])

    expected_keys: set[str] = set()
    for raw in good + [mixed]:
        expected_keys.update(e.idempotency_key for e in split_body(raw).events)
    expected_items = sum(split_body(raw, max_bytes=20000).items for raw in inputs)

    events = await kafka.read_json(w.topic("messenger.events"), min_count=len(expected_keys), timeout=60)
    dlq_records = await kafka.read_all(w.topic("messenger.dlq"), min_count=5, timeout=30)
    expected_split = sum(len(split_body(raw, max_bytes=20000).events) for raw in inputs)
    split_records = await kafka.read_all(w.topic("messenger.events.split"), min_count=0 if one_hop else expected_split,
                                         timeout=60)
    split = [orjson.loads(r.value) for r in split_records]
    if one_hop:  # only the events of bodies not keyed by their conversation went through the split topic
        in_place = sum(len(split_body(raw, max_bytes=20000).events) for raw, key in zip(inputs, keys, strict=True)
                       if key is not None and key == conversation_key_of(raw, 20000))
        assert in_place > 10 and len(split) == expected_split - in_place
    else:
        assert len(split) == expected_split

    # exactly the expected events, each once, duplicates dropped
    assert sorted(e["idempotency_key"] for e in events) == sorted(expected_keys)
    for rec in await kafka.read_all(w.topic("messenger.events")):
        ev = orjson.loads(rec.value)
        assert rec.key.decode() == ev["conversation_key"]
        assert ev["source"]["topic"] == w.topic("messenger.webhook.raw")

    # every bad one is in the DLQ with its reason, source and original bytes
    letters = [orjson.loads(r.value) for r in dlq_records]
    reasons = sorted(d["reason"] for d in letters)
    assert reasons == sorted(["invalid_json", "invalid_json", "not_page_object", "body_too_large", "invalid_item"])
    originals = []
    for d in letters:
        raw = base64.b64decode(d["payload"]) if d["payload_encoding"] == "base64" else d["payload"].encode()
        originals.append(raw)
        assert d["source"]["topic"] == w.topic("messenger.webhook.raw")
        assert isinstance(d["source"]["offset"], int) and isinstance(d["source"]["partition"], int)
        assert d["error"]
    for raw in bad + [mixed]:
        assert raw in originals
    item_letter = next(d for d in letters if d["reason"] == "invalid_item")
    assert item_letter["item_index"] == "entry[0].messaging[1]"

    # accounting: every input item ends processed (split, in place or through the split topic) or dead-lettered
    item_letters = sum(1 for d in letters if d["item_index"] is not None)
    metrics = w.metrics()
    taken = sum(v for k, v in metrics.items() if k.startswith("messenger_events_in_total"))
    assert taken == expected_split and taken + item_letters == expected_items

    assert metrics.get('messenger_dead_letters_total{reason="invalid_json"}') == 2.0
    assert metrics.get('messenger_raw_bodies_total') == float(len(inputs))


async def test_duplicates_survive_a_restart(make_worker: Callable[..., Worker], kafka: KafkaIO, tmp_path: Path) -> None:
    """The dedupe keys (in the conversation's state) are recovered from its changelog: a redelivery
    after a restart is dropped."""
    w = make_worker(MESSENGER_STREAMS_PUBLISH_EVENTS="true")
    raw_topic = w.topic("messenger.webhook.raw")
    await kafka.send(raw_topic, msg_body("p1", "u1", "first"))
    await kafka.read_all(w.topic("messenger.events"), min_count=1)
    w.restart()
    await kafka.send(raw_topic, msg_body("p1", "u1", "first"))
    await kafka.send(raw_topic, msg_body("p1", "u1", "second"))
    events = await kafka.read_json(w.topic("messenger.events"), min_count=2, settle=2.0)
    assert [e["mid"] for e in events] == ["first", "second"]


async def test_a_2mb_body_is_dead_lettered_with_prefix_size_and_hash(
    make_worker: Callable[..., Worker], kafka: KafkaIO
) -> None:
    """A raw topic that takes bigger records than the body limit (an upstream ingester of its own):
    a 2 MB body goes to the DLQ as a bounded prefix with its size and SHA-256, and the bodies
    around it are split as usual (the agent neither crashes nor stalls)."""
    import hashlib

    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    w = make_worker(MESSENGER_STREAMS_PUBLISH_EVENTS="true")
    raw = w.topic("messenger.webhook.raw")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        # created for the webhook's limit: 1 MiB bodies plus 64 KiB of record overhead
        (described,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, raw, None)])
        configs = {entry[0]: entry[1] for entry in described.resources[0][4]}
        assert configs["max.message.bytes"] == str(1_048_576 + 65_536)
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, raw, {"max.message.bytes": "4000000"})])
    finally:
        await admin.close()
    big = orjson.dumps({"object": "page", "entry": [{"id": "p1", "time": 1, "messaging": []}], "pad": "é" * 1_000_000})
    assert len(big) > 2_000_000
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, max_request_size=4_000_000, acks="all")
    await producer.start()
    try:
        for value in (msg_body("p1", "u1", "before"), big, msg_body("p1", "u2", "after")):
            await producer.send_and_wait(raw, value)
    finally:
        await producer.stop()

    events = await kafka.read_json(w.topic("messenger.events"), min_count=2, timeout=60)
    assert sorted(e["mid"] for e in events) == ["after", "before"]
    (record,) = await kafka.read_all(w.topic("messenger.dlq"), min_count=1, timeout=30)
    assert len(record.value) <= 900_000
    letter = orjson.loads(record.value)
    assert letter["reason"] == "body_too_large" and letter["truncated"] is True
    assert letter["original_size"] == len(big)
    assert letter["original_sha256"] == hashlib.sha256(big).hexdigest()
    kept = letter["payload"].encode()
    assert big.startswith(kept) and len(kept) > 400_000
    assert w.metrics().get('messenger_dead_letters_total{reason="body_too_large"}') == 1.0

"""One hop on real Kafka (issue 18): a raw body keyed by its conversation is decided on its own
partition, in place; other bodies (unkeyed, several conversations) are split and their events
repartitioned through `messenger.events.split`. One conversation whose events come by both paths:
each event is decided once, in the order the test sends them, and a body redelivered by the other
path is a duplicate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import murmur2

from tests.conftest import BASE_CONFIG
from tests.kafkatools import KafkaIO, Worker
from tests.stages.test_conversations_kafka import BILLING_PAGE, NO_CSAT, Console, body, consumer_msg, of_type

pytestmark = pytest.mark.kafka

PARTITIONS = 2


def partition_of(key: str) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS


def alice_messages(evs: list[dict[str, Any]]) -> list[str]:
    return [e["mid"] for e in of_type(evs, "consumer_message") if e["psid"] == "alice"]


async def test_one_conversation_by_both_paths(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    w = make_worker(BASE_CONFIG + NO_CSAT, partitions=PARTITIONS)
    con = Console(kafka, w)
    raw = w.topic("messenger.webhook.raw")
    alice = f"{BILLING_PAGE}:alice"
    home = partition_of(alice)
    away = 1 - home  # a raw partition whose bodies reach alice's conversation through the split topic
    bob = next(f"bob{i}" for i in range(100) if partition_of(f"{BILLING_PAGE}:bob{i}") == away)

    first = body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "m-1", "one"))
    await kafka.send(raw, first, key=alice)  # keyed as the webhook keys it: in place
    await con.wait_for("billing", lambda e: alice_messages(e) == ["m-1"])
    # a body of two conversations (unkeyed, as the webhook writes it), here on the other partition:
    # both events go through the split topic, even bob's, whose conversation is on that partition
    await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "m-2", "two"),
                               consumer_msg(BILLING_PAGE, bob, "m-bob", "hi")), partition=away)
    await con.wait_for("billing", lambda e: alice_messages(e) == ["m-1", "m-2"])
    # Meta redelivers the first body, and this time it lands on the other partition: a duplicate
    await kafka.send(raw, first, partition=away)
    await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "m-3", "three")), key=alice)
    billing = await con.wait_for("billing", lambda e: "m-3" in alice_messages(e))
    billing = await con.events("billing", min_count=len(billing), settle=2.0)  # nothing more comes

    assert alice_messages(billing) == ["m-1", "m-2", "m-3"]  # each once, in the order sent
    mine = [e for e in billing if e.get("psid") == "alice"]
    assert len(of_type(mine, "conversation_opened")) == 1
    assert len({e["conversation_id"] for e in mine}) == 1
    assert [e["psid"] for e in of_type(billing, "consumer_message")].count(bob) == 1

    # the split topic carries only the events of bodies not keyed by their conversation
    split = [orjson.loads(r.value) | {"_p": r.partition}
             for r in await kafka.read_all(w.topic("messenger.events.split"), min_count=3)]
    assert sorted((e["psid"], e["mid"], e["source"]["partition"], e["_p"]) for e in split) == [
        ("alice", "m-1", away, home), ("alice", "m-2", away, home), (bob, "m-bob", away, away)]
    # and the duplicate was dropped by the conversation, not by luck of timing
    metrics = w.metrics()
    assert sum(v for k, v in metrics.items() if k.startswith("messenger_duplicates_dropped_total")) >= 1, metrics


async def test_two_hops_when_switched_off(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    """MESSENGER_STREAMS_ONE_HOP=false: every body goes through split_webhooks and the split topic."""
    w = make_worker(BASE_CONFIG + NO_CSAT, partitions=PARTITIONS, MESSENGER_STREAMS_ONE_HOP="false")
    con = Console(kafka, w)
    alice = f"{BILLING_PAGE}:alice"
    await kafka.send(w.topic("messenger.webhook.raw"),
                     body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "m-1", "one")), key=alice)
    await con.wait_for("billing", lambda e: alice_messages(e) == ["m-1"])
    split = await kafka.read_json(w.topic("messenger.events.split"), min_count=1)
    assert [(e["psid"], e["mid"]) for e in split] == [("alice", "m-1")]

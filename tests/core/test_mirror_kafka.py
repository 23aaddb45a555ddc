"""TopicMirror against a real broker: start-up contents, live changes, tombstones, bad values."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from streams.core.mirror import MirrorError, TopicMirror
from streams.core.topics import ensure_topics
from tests.kafkatools import KafkaIO

pytestmark = pytest.mark.kafka


def decode(value: bytes) -> dict[str, object]:
    doc = orjson.loads(value)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    return doc


async def until(cond: object, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_mirror_reads_what_was_there_then_follows(kafka_bootstrap: str, kafka: KafkaIO) -> None:
    topic = f"mirror-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, {topic: True}, 3, 1)
    for i in range(30):
        await kafka.send(topic, {"n": i}, key=f"k{i % 10}")
    await kafka.send(topic, b"[1]", key="k1")  # not an object: skipped, k1 keeps its value

    changes: list[tuple[str, object]] = []
    mirror: TopicMirror[dict[str, object]] = TopicMirror(
        kafka_bootstrap, topic, decode, on_change=lambda k, v: changes.append((k, v))
    )
    await mirror.start()
    try:
        assert await mirror.wait_ready(20)
        assert len(mirror) == 10
        assert mirror.get("k3") == {"n": 23}
        assert mirror.get("k1") == {"n": 21}
        assert mirror.skipped == 1
        assert mirror.partitions == [0, 1, 2]

        await kafka.send(topic, {"n": 99}, key="new")
        await (await kafka.producer()).send_and_wait(topic, None, key=b"k3")  # tombstone
        await until(lambda: mirror.get("new") == {"n": 99} and "k3" not in mirror)
        assert ("k3", None) in changes
    finally:
        await mirror.stop()


async def test_an_empty_topic_is_ready_at_once(kafka_bootstrap: str) -> None:
    topic = f"mirror-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, {topic: True}, 2, 1)
    mirror: TopicMirror[dict[str, object]] = TopicMirror(kafka_bootstrap, topic, decode)
    await mirror.start()
    try:
        assert mirror.ready
    finally:
        await mirror.stop()


async def test_unreachable_kafka_is_one_clear_error() -> None:
    mirror: TopicMirror[dict[str, object]] = TopicMirror("127.0.0.1:1", "t", decode)
    with pytest.raises(MirrorError, match="cannot read topic t at 127.0.0.1:1"):
        await mirror.start(timeout=2)

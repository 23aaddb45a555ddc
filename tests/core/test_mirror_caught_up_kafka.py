"""TopicMirror.wait_caught_up (used by GET /csat): once it says True, the mirror holds every record
the topic held when it was called; it says False for a mirror that is not running."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from streams.core.mirror import TopicMirror
from streams.core.topics import ensure_topics
from tests.kafkatools import KafkaIO

pytestmark = pytest.mark.kafka


async def test_caught_up_means_everything_written_before_is_applied(kafka_bootstrap: str, kafka: KafkaIO) -> None:
    topic = f"mirror-cu-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, {topic: True}, 3, 1)
    mirror: TopicMirror[int] = TopicMirror(kafka_bootstrap, topic, lambda v: int(orjson.loads(v)))
    assert not await mirror.wait_caught_up(1.0)  # not started
    await mirror.start()
    try:
        assert await mirror.wait_caught_up(10.0)  # empty topic
        producer = await kafka.producer()
        for round_ in range(3):
            acks = [await producer.send(topic, orjson.dumps(round_ * 1000 + i), key=f"k{i}".encode()) for i in range(400)]
            await asyncio.gather(*acks)
            assert await mirror.wait_caught_up(20.0)
            assert len(mirror) == 400
            assert all(mirror.get(f"k{i}") == round_ * 1000 + i for i in range(400)), round_
    finally:
        await mirror.stop()
    assert not await mirror.wait_caught_up(1.0)  # stopped

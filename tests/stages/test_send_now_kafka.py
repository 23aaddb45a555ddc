"""`AppProducer.send_now`: a unit's writes leave at once, whatever the producer's linger.

The stages await their acks right after enqueuing a unit; the linger would only delay them
(docs/benchmarks.md, "Send now"). With a linger of a minute a record waits for it unless
`send_now` closed its batch."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.core.settings import Settings
from streams.stages.app import create_app
from streams.stages.runtime import AppProducer
from tests.kafkatools import KafkaIO

pytestmark = pytest.mark.kafka

LINGER_MS = 60_000


async def test_send_now_sends_what_lingers(kafka: KafkaIO) -> None:
    settings = Settings(bootstrap_servers=kafka.bootstrap, producer_linger_ms=LINGER_MS,
                        app_id=f"send-now-{uuid.uuid4().hex[:8]}")
    app = create_app(settings)
    topic = f"send-now-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    await app.producer.start()
    producer = AppProducer(app)
    try:
        first = await producer.send(topic, b"k", b"lingering", 0)
        # the linger is in effect: nothing acknowledges the record within 3 s
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(first), 3)
        second = await producer.send(topic, b"k", b"now", 0)
        producer.send_now()
        # both records of the partition's open batch leave now, not a minute later
        meta = await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert [m.offset for m in meta] == [0, 1]
    finally:
        await app.producer.stop()
    values = [r.value for r in await kafka.read_all(topic, min_count=2, timeout=30)]
    assert values == [b"lingering", b"now"]


async def test_send_now_before_the_producer_started_is_a_no_op() -> None:
    app = create_app(Settings(app_id=f"send-now-{uuid.uuid4().hex[:8]}"))
    AppProducer(app).send_now()  # nothing enqueued, nothing to send; must not raise

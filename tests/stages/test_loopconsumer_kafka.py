"""faust's Kafka consumer on the worker's loop (streams/stages/loopconsumer.py), against a real broker.

The worker's app builds faust's aiokafka consumer service so that it runs as a task of the worker's
own event loop, not in a thread with a loop of its own: no thread is started, the consumer's calls
(fetches, positions, commits) run on the caller's loop, and stopping it leaves the worker's other
tasks alone (faust's thread cancels every task left on *its* loop, which is now the worker's).
`consumer_thread=True` keeps faust's thread. A partition faust pauses is paused in aiokafka too, so
it is not fetched (a table's changelog partitions: their first records used to hold back every
fetch for 100 ms)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

from aiokafka.structs import TopicPartition
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP

from streams.core.settings import Settings
from streams.stages import loopconsumer
from streams.stages.app import create_app
from tests.kafkatools import KafkaIO


async def topic_with_records(kafka: KafkaIO, count: int) -> str:
    topic = await kafka.create_topic("loopconsumer", 1)
    p = await kafka.producer()
    for i in range(count):
        await p.send_and_wait(topic, f"r{i}".encode(), partition=0)
    return topic


async def fetch_all(service: Any, tp: TopicPartition, count: int) -> list[bytes]:
    got: list[bytes] = []
    async with asyncio.timeout(30):
        while len(got) < count:
            batch = await service.getmany({tp}, timeout=1.0)
            got += [r.value for r in batch.get(tp, [])]
    return got


async def test_the_consumer_runs_on_the_workers_loop_and_stops_without_touching_its_tasks(
    kafka: KafkaIO, kafka_bootstrap: str,
) -> None:
    topic = await topic_with_records(kafka, 20)
    app = create_app(Settings(bootstrap_servers=kafka_bootstrap, app_id=f"loop-{uuid.uuid4().hex[:8]}"))
    service: Any = app.consumer._thread  # type: ignore[attr-defined]  # faust types it as ConsumerT
    assert isinstance(service, loopconsumer.LoopConsumerThread)
    threads_before = set(threading.enumerate())
    bystander = asyncio.create_task(asyncio.sleep(3600))  # one of the worker's own tasks
    await service.start()
    try:
        assert set(threading.enumerate()) == threads_before, "the consumer started a thread"
        assert service.thread_loop is asyncio.get_running_loop()
        tp = TopicPartition(topic, 0)
        consumer = service._ensure_consumer()
        consumer.assign([tp])
        await service.seek_to_beginning(tp)
        got = await fetch_all(service, tp, 20)  # faust's getmany, through call_thread, on this loop
        assert got == [f"r{i}".encode() for i in range(20)]
        assert await service.position(tp) == 20
    finally:
        await service.stop()
    assert service._thread is not None and not service._thread.is_alive()
    assert not bystander.done(), "stopping the consumer cancelled a task of the worker's loop"
    bystander.cancel()


async def test_a_partition_faust_pauses_is_not_fetched_until_faust_resumes_it(
    kafka: KafkaIO, kafka_bootstrap: str,
) -> None:
    topic = await kafka.create_topic("loopconsumer-pause", 2)
    paused, witness = TopicPartition(topic, 0), TopicPartition(topic, 1)
    app = create_app(Settings(bootstrap_servers=kafka_bootstrap, app_id=f"loop-{uuid.uuid4().hex[:8]}"))
    service: Any = app.consumer._thread  # type: ignore[attr-defined]  # faust types it as ConsumerT
    await service.start()
    try:
        consumer = service._ensure_consumer()
        consumer.assign([paused, witness])
        # as faust's recovery does with a changelog partition; before the loop turns, so that no
        # fetch is in flight for it (one already sent would still bring its records)
        app.consumer.pause_partitions({TP(topic, 0)})
        assert consumer.paused() == {paused}
        await service.seek_to_beginning(paused, witness)
        for i in range(5):
            await kafka.send(topic, f"p{i}".encode(), partition=0)
        await kafka.send(topic, b"w", partition=1)  # written after partition 0's records
        # every fetch that brings the witness's record was sent after partition 0 had its five:
        # had aiokafka fetched partition 0, its records would now sit in the fetcher's buffer
        assert await fetch_all(service, witness, 1) == [b"w"]
        assert paused not in consumer._fetcher._records
        assert await service.position(paused) == 0

        app.consumer.resume_partitions({TP(topic, 0)})
        assert consumer.paused() == set()
        assert await fetch_all(service, paused, 5) == [f"p{i}".encode() for i in range(5)]
    finally:
        await service.stop()


async def test_consumer_thread_true_keeps_fausts_thread(kafka: KafkaIO, kafka_bootstrap: str) -> None:
    topic = await topic_with_records(kafka, 5)
    app = create_app(Settings(bootstrap_servers=kafka_bootstrap, app_id=f"loop-{uuid.uuid4().hex[:8]}",
                              consumer_thread=True))
    service: Any = app.consumer._thread  # type: ignore[attr-defined]  # faust types it as ConsumerT
    assert type(service) is AIOKafkaConsumerThread
    threads_before = set(threading.enumerate())
    await service.start()
    try:
        assert len(set(threading.enumerate()) - threads_before) == 1  # faust's consumer thread
        assert service.thread_loop is not asyncio.get_running_loop()
        tp = TopicPartition(topic, 0)
        await service.call_thread(_assign, service, tp)
        await service.seek_to_beginning(tp)
        assert await fetch_all(service, tp, 5) == [f"r{i}".encode() for i in range(5)]
    finally:
        await service.stop()


async def _assign(service: Any, tp: TopicPartition) -> None:
    service._ensure_consumer().assign([tp])

"""The faust fixes (streams/stages/faustfix.py).

Against a real broker: faust's own fetch hands out the records of paused partitions when its set of
active partitions is empty (the failover stall of issue 12); the guarded fetch hands out only active
partitions' records, only while faust's flow runs, and leaves the others where they are. And
without a broker: mode's flow control cleared the streams' queues on every resume, also one that
ended no suspension (the CSAT facts lost after a restart); now only a resume after a suspension
clears them. And faust's commit, which crawled one offset per commit once a gap recorded at start-up
doubled the acked offsets, now commits the whole run at once. And the worker's consumer fetches with
the app's fetch settings, which faust has no setting for."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from streams.core.settings import Settings
from streams.stages import faustfix
from streams.stages.app import create_app
from tests.kafkatools import KafkaIO


async def two_partitions_with_records(kafka: KafkaIO) -> str:
    topic = await kafka.create_topic("fetchguard", 2)
    p = await kafka.producer()
    for i in range(5):
        for part in (0, 1):
            await p.send_and_wait(topic, f"r{i}".encode(), partition=part)
    return topic


async def assigned_consumer(bootstrap: str, topic: str) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    for tp in tps:
        await consumer.position(tp)
    return consumer, tps


def faust_side(flow_active: bool) -> Any:
    """What `_fetch_records` reads of faust's consumer thread: `self.consumer.flow_active`."""
    return SimpleNamespace(consumer=SimpleNamespace(flow_active=flow_active))


async def fetch(fn: Any, side: Any, consumer: AIOKafkaConsumer, live: set[Any]) -> dict[Any, Any]:
    got: dict[Any, Any] = await fn(side, consumer, live, timeout=1.0, max_records=100)
    return got


async def test_every_partition_paused_hands_out_nothing(kafka: KafkaIO, kafka_bootstrap: str) -> None:
    topic = await two_partitions_with_records(kafka)
    consumer, tps = await assigned_consumer(kafka_bootstrap, topic)
    try:
        # faust's own fetch: an empty active set (every partition paused) hands out every record
        unguarded = await fetch(faustfix.UNGUARDED_FETCH, faust_side(True), consumer, set())
        assert {tp.partition for tp in unguarded} == {0, 1}, "faust no longer drains paused partitions?"
        for tp in tps:
            consumer.seek(tp, 0)
        faustfix.install()
        from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

        guarded = await fetch(AIOKafkaConsumerThread._fetch_records, faust_side(True), consumer, set())
        assert guarded == {}
        assert [await consumer.position(tp) for tp in tps] == [0, 0], "records were consumed and dropped"
        # one partition resumed: only its records, from where it stood
        only0 = await fetch(AIOKafkaConsumerThread._fetch_records, faust_side(True), consumer, {tps[0]})
        assert list(only0) == [tps[0]] and [r.offset for r in only0[tps[0]]] == [0, 1, 2, 3, 4]
        assert await consumer.position(tps[1]) == 0
    finally:
        await consumer.stop()


async def test_a_stopped_flow_hands_out_nothing(kafka: KafkaIO, kafka_bootstrap: str) -> None:
    """faust stops the flow at a rebalance; a fetch already waiting must not drain then."""
    topic = await two_partitions_with_records(kafka)
    consumer, tps = await assigned_consumer(kafka_bootstrap, topic)
    try:
        faustfix.install()
        side = faust_side(True)
        live = set(tps)
        view = faustfix.FetchablePartitions(side.consumer, live)
        assert tps[0] in view and bool(view)
        side.consumer.flow_active = False
        assert tps[0] not in view and bool(view)
        from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

        # flow stopped while the fetch waits (faust's own check sits only at the start of the call)
        got = await fetch(AIOKafkaConsumerThread._fetch_records, SimpleNamespace(consumer=_StopsAfterStart()),
                          consumer, live)
        assert got == {}
        assert [await consumer.position(tp) for tp in tps] == [0, 0]
    finally:
        await consumer.stop()


class _StopsAfterStart:
    """`flow_active` is True for faust's check at the start of the fetch, False afterwards."""

    def __init__(self) -> None:
        self.reads = 0

    @property
    def flow_active(self) -> bool:
        self.reads += 1
        return self.reads == 1


def test_flow_control_clears_queues_only_when_a_suspension_ends() -> None:
    import asyncio

    from mode.utils.queues import FlowControlEvent, FlowControlQueue

    async def scenario(resume: Any) -> list[int]:
        flow = FlowControlEvent(initially_suspended=True)
        queue: FlowControlQueue[int] = FlowControlQueue(maxsize=10, flow_control=flow, clear_on_resume=True)
        queue.put_nowait(1)  # queued before the rebalance
        resume(flow)  # the rebalance ends: stale input is dropped
        queue.put_nowait(2)  # fetched for the new assignment
        resume(flow)  # faust resumes again at the end of a table recovery
        kept = []
        while not queue.empty():
            kept.append(queue.get_nowait())
        return kept

    # mode's own resume drops the record of the current assignment too
    assert asyncio.run(scenario(faustfix.CLEARING_RESUME)) == []
    assert asyncio.run(scenario(faustfix.resume_flow_control)) == [2]
    faustfix.install()
    assert asyncio.run(scenario(FlowControlEvent.resume)) == [2]


def _consumer_state(committed: int) -> tuple[Any, Any]:
    """The parts of a faust `Consumer` its commit bookkeeping uses, as faust builds them."""
    from collections import defaultdict

    from faust.types import TP
    from intervaltree import IntervalTree

    tp = TP("raw", 0)
    state = SimpleNamespace(_acked=defaultdict(list), _acked_index=defaultdict(set), _gap=defaultdict(IntervalTree),
                            _committed_offset=defaultdict(lambda: None))
    state._committed_offset[tp] = committed
    return state, tp


def _commits_until(new_offset: Any, last: int) -> list[int]:
    """Run faust's commit bookkeeping as a start-up after a restart sees it, and commit (as faust's
    `_commit_offsets` does) until offset `last` is covered; the offsets committed, in order."""
    import asyncio

    from faust.transport.consumer import Consumer

    state, tp = _consumer_state(committed=1)
    # faust resumes the fetcher before it seeks to the committed offsets: records 1..298 are
    # delivered, the seek moves the read offset back to 1, and record 299 (of a fetch under way)
    # looks like a jump from 1: faust records 2..298 as a gap
    asyncio.run(Consumer._add_gap(state, tp, 2, 298))
    for offset in range(1, last):  # every record is processed and acked, each once (`Consumer.ack`)
        state._acked_index[tp].add(offset)
        state._acked[tp].append(offset)
    commits: list[int] = []
    while state._committed_offset[tp] < last:
        offset = new_offset(state, tp)
        assert offset is not None and offset > state._committed_offset[tp], commits[-3:]
        commits.append(offset)
        state._committed_offset[tp] = offset
        assert len(commits) < 10_000
    return commits


def test_commit_covers_offsets_acked_twice_at_once() -> None:
    """faust added the gap's offsets to the acked ones, each of 2..298 was then listed twice, and
    every commit took one run of two offsets: 4,167 offsets took over 2,000 commits (one a second
    at the default commit interval). With the list deduplicated one commit covers them all."""
    crawl = _commits_until(faustfix.CRAWLING_NEW_OFFSET, 4168)
    assert len(crawl) > 100 and crawl[:3] == [3, 4, 5]
    assert _commits_until(faustfix.dedupe_acked, 4168) == [4168]


def test_commit_still_stops_below_an_offset_not_acked() -> None:
    """The deduplicated commit keeps faust's rule: it never passes an offset that is neither acked
    nor a gap (a record still being processed)."""
    for new_offset in (faustfix.CRAWLING_NEW_OFFSET, faustfix.dedupe_acked):
        state, tp = _consumer_state(committed=10)
        state._acked[tp].extend([10, 11, 12, 15, 16, 16])  # 13 and 14 are still being processed
        assert new_offset(state, tp) == 13
        state._committed_offset[tp] = 13
        assert new_offset(state, tp) is None
        state._acked[tp].extend([13, 14])
        assert new_offset(state, tp) == 17


async def started_fetch_settings(app: Any) -> tuple[int, int]:
    """What the started Fetcher of the app's worker consumer (built as faust builds it) uses."""
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    await consumer.start()
    try:
        return consumer._fetcher._fetch_min_bytes, consumer._fetcher._fetch_max_wait_ms
    finally:
        await consumer.stop()


async def test_the_worker_consumer_fetches_with_the_apps_settings(kafka_bootstrap: str) -> None:
    """faust builds its consumer with `fetch_max_wait_ms=1500` and aiokafka's `fetch_min_bytes=1`
    and has no setting for either; the worker's consumer fetches with what the settings say."""
    app_id = f"fetch-{uuid.uuid4().hex[:8]}"
    default = create_app(Settings(bootstrap_servers=kafka_bootstrap, app_id=app_id))
    assert await started_fetch_settings(default) == (1, 1500)
    chosen = create_app(Settings(bootstrap_servers=kafka_bootstrap, app_id=app_id,
                                 fetch_min_bytes=16_384, fetch_max_wait_ms=5))
    assert await started_fetch_settings(chosen) == (16_384, 5)
    delattr(chosen, faustfix.FETCH_SETTINGS)  # an app create_app did not make keeps faust's own
    assert await started_fetch_settings(chosen) == (1, 1500)

"""The Faust app: settings → one `Pipeline` holding the app, its topics, and every stage's agents.

Each stage module has `register(pipeline)` (streams/stages/ingest.py and friends); `create_pipeline`
calls them in order, so tests and the CLI can build a pipeline with fresh topic names from the
environment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import faust
from aiokafka.partitioner import DefaultPartitioner

from streams.core.config import ConnectorConfig
from streams.core.pages import PageDirectory
from streams.core.settings import Settings
from streams.core.topics import TOPIC_SPECS
from streams.stages import conversation, csat, faustfix, history, ingest, loopconsumer, orders, pages, runtime, web
from streams.stages.pipeline import Pipeline
from streams.stages.supervision import supervise

log = logging.getLogger("messenger_streams")



class CachedPartitioner:
    """Kafka's default partitioner (murmur2 of the key) with the answer remembered per key.

    aiokafka's murmur2 is pure Python and ran for every keyed record we write; conversation keys
    repeat, so a bounded dict answers almost every call. Keyless records keep the default's
    random choice."""

    def __init__(self, max_keys: int = 200_000) -> None:
        self._default = DefaultPartitioner()
        self._cache: dict[tuple[bytes, int], int] = {}
        self._max_keys = max_keys

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(self._default(key, all_partitions, available))
        slot = (key, len(all_partitions))
        partition = self._cache.get(slot)
        if partition is None:
            partition = int(self._default(key, all_partitions, available))
            if len(self._cache) >= self._max_keys:
                self._cache.clear()
            self._cache[slot] = partition
        return partition


def create_app(settings: Settings) -> faust.App:
    """A Faust app tuned for this processor: ordering and at-least-once first."""
    faustfix.install()  # faust/mode fixes (records lost around a rebalance, commits crawling) and fetch settings
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{hp.strip()}" for hp in settings.bootstrap_servers.split(",") if hp.strip()],
        store=settings.store,
        datadir=settings.datadir,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_enabled=True,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=settings.commit_interval_seconds,
        producer_linger=settings.producer_linger_ms / 1000.0,
        producer_max_batch_size=262_144,
        producer_acks=-1,
        producer_partitioner=CachedPartitioner(),
        cython_optimizations=True,
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
        table_cleanup_interval=60.0,
        processing_guarantee="at_least_once",
        # failover (issue 12): a killed worker's partitions move after the session timeout
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=min(settings.heartbeat_interval_seconds, settings.session_timeout_seconds / 3),
        consumer_group_instance_id=settings.group_instance_id or None,
    )
    # Table changelog records queue in faust's producer buffer; at its default of 100 the conductor
    # stalls on every table-heavy burst ("producer buffer full"). Commits still flush it first.
    app.producer.buffer.max_messages = settings.producer_buffer_max
    # the consumer's fetch settings (faust has none for them: faustfix applies these)
    setattr(app, faustfix.FETCH_SETTINGS, (settings.fetch_min_bytes, settings.fetch_max_wait_ms))
    if not settings.consumer_thread:
        loopconsumer.install(app)  # the consumer on the worker's loop, not in faust's thread
    supervise(app)  # a crashed agent stops the worker (exit 1); a stop never takes over 8 s
    return app


def create_pipeline(
    settings: Settings,
    config: ConnectorConfig,
    stages: Iterable[str] | None = None,
) -> Pipeline:
    """Build the app, declare every topic, and register the stages (all by default)."""
    registry: dict[str, Callable[[Pipeline], None]] = {
        "ingest": ingest.register,
        "conversations": conversation.register,
        "csat": csat.register,
        "orders": orders.register,  # #15: merchant orders to their conversation key
        "web": web.register,
        "history": history.register,
    }
    app = create_app(settings)
    directory = PageDirectory(config, settings, ensure_skills=True, track_activity=True)
    pipe = Pipeline(settings=settings, config=config, app=app, pages=pages.attach(app, settings, directory))
    def raw_topic(*names: str) -> Any:
        return app.topic(
            *names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
            partitions=settings.partitions,
        )

    pipe.raw_topic = raw_topic
    for attr in TOPIC_SPECS:
        pipe.topics[attr] = raw_topic(settings.topics.name(attr))
    for skill in config.all_skills():
        pipe.skill_topics[skill] = raw_topic(settings.topics.skill(skill))
    names = list(stages) if stages is not None else list(registry)
    pipe.one_hop = settings.one_hop and "ingest" in names and "conversations" in names
    for name in names:
        registry[name](pipe)
    # faust skips records fetched across a rebalance; make sure they are fetched again (issue 12)
    runtime.reseek_uncommitted(app, group_id=settings.app_id, bootstrap_servers=settings.bootstrap_servers)
    return pipe

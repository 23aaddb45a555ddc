"""Create every topic the processor uses (idempotent): `messenger-streams topics create`."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from streams.config import ConnectorConfig
from streams.settings import Settings


class TopicError(RuntimeError):
    """Topics could not be created (broker unreachable, bad settings)."""


def wanted_topics(settings: Settings, config: ConnectorConfig) -> dict[str, bool]:
    """Topic name → compacted?, for every topic of CONTRACT.md plus the internal ones."""
    from streams.app import TOPIC_SPECS

    names = {settings.topics.name(attr): spec[0] for attr, spec in TOPIC_SPECS.items()}
    names.update({settings.topics.skill(s): False for s in config.all_skills()})
    return names


async def create_topics(settings: Settings, config: ConnectorConfig, timeout: float = 30.0) -> list[str]:
    """Create the missing topics; returns the names created (existing ones are left alone)."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=int(timeout * 1000))
    try:
        try:
            await asyncio.wait_for(admin.start(), timeout)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise TopicError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc!r}") from None
        existing = set(await admin.list_topics())
        wanted = wanted_topics(settings, config)
        new = [
            NewTopic(
                name,
                settings.partitions,
                settings.replication_factor,
                topic_configs={"cleanup.policy": "compact"} if compacted else {},
            )
            for name, compacted in sorted(wanted.items())
            if name not in existing
        ]
        if new:
            resp = await admin.create_topics(new, timeout_ms=int(timeout * 1000))
            for name, code, message in getattr(resp, "topic_errors", []):
                if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (a racing creator)
                    raise TopicError(f"cannot create topic {name}: error {code} {message or ''}".strip())
        return [t.name for t in new]
    finally:
        try:
            await admin.close()
        except Exception:  # noqa: BLE001,S110 - closing a client that never connected
            pass

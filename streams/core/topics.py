"""Create every topic the processor uses (idempotent): `messenger-streams topics create`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from streams.core.config import ConnectorConfig
from streams.core.settings import Settings

# topic attribute → (compacted?, internal to the processor?)
TOPIC_SPECS: dict[str, tuple[bool, bool]] = {
    "raw": (False, False),
    "dlq": (False, False),
    "split": (False, True),
    "events": (False, True),
    "actions": (False, False),
    "ticks": (False, True),
    "outbound": (False, False),
    "send_results": (False, True),
    "csat_responses": (False, False),
    "csat_facts": (False, True),
    "history": (True, False),
    "relay": (False, True),  # #15
    "orders": (False, False),  # #15: written by merchants, any key
    "orders_unmatched": (True, False),  # #15: key order_id
}


class TopicError(ConnectionError):
    """Topics could not be created (broker unreachable, bad settings)."""


def wanted_topics(settings: Settings, config: ConnectorConfig) -> dict[str, bool]:
    """Topic name → compacted?, for every topic of CONTRACT.md plus the internal ones."""
    names = {
        settings.topics.name(attr): spec[0]
        for attr, spec in TOPIC_SPECS.items()
        if attr != "events" or settings.publish_events
    }
    names.update({settings.topics.skill(s): False for s in config.all_skills()})
    return names


async def ensure_topics(
    bootstrap: str,
    wanted: Mapping[str, bool],
    partitions: int,
    replication_factor: int,
    timeout: float = 30.0,
) -> list[str]:
    """Create the missing topics of `wanted` (name → compacted?); returns the names created.

    Raises TopicError (a ConnectionError) when Kafka cannot be reached or refuses a topic."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        try:
            await asyncio.wait_for(admin.start(), timeout)
            existing = set(await admin.list_topics())
        except (TimeoutError, KafkaError, OSError) as exc:
            raise TopicError(f"cannot reach Kafka at {bootstrap}: {type(exc).__name__}") from None
        new = [
            NewTopic(
                name,
                partitions,
                replication_factor,
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
        with contextlib.suppress(Exception):
            await admin.close()


async def create_topics(settings: Settings, config: ConnectorConfig, timeout: float = 30.0) -> list[str]:
    """Create every missing topic of the processor; returns the names created."""
    return await ensure_topics(
        settings.bootstrap_servers,
        wanted_topics(settings, config),
        settings.partitions,
        settings.replication_factor,
        timeout,
    )

"""`Pipeline`: what every stage's `register(pipeline)` receives — the Faust app, its topics by name,
the live page directory and the shared helpers (send, dead letter). Built by `streams.stages.app`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust

from streams.core import metrics
from streams.core.config import ConnectorConfig
from streams.core.settings import Settings
from streams.stages import pages
from streams.stages.runtime import letter_bytes


@dataclass
class Pipeline:
    """A configured app: the Faust app, every topic by name, and shared state of the stages."""

    settings: Settings
    config: ConnectorConfig
    app: faust.App
    pages: pages.LivePages  # the live page directory (#14): env_for, gate, skill_topics
    topics: dict[str, Any] = field(default_factory=dict)
    skill_topics: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    raw_topic: Callable[..., Any] = field(default=lambda *names: None)
    # issue 18: the conversation stage splits raw bodies itself (`streams.stages.conversation`), and
    # `split_webhooks` is not registered; set by `create_pipeline` when both stages run in this app
    one_hop: bool = False

    def topic(self, attr: str) -> Any:
        """The faust topic for one of TOPIC_SPECS."""
        return self.topics[attr]

    async def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None) -> None:
        """Hand one record to the app's producer (no per-record faust Topic machinery).

        The faust consumer flushes this producer before it commits offsets, so at-least-once holds."""
        await self.app.producer.send(topic, key, value, partition, None, None)

    async def dead_letter(self, msg: Any, reason: str, error: str, item_index: str | None = None) -> None:
        """Send one consumed record to the dead-letter topic (reason, error, its source and its
        original bytes, bounded by `dead_letter_max_bytes`; `item_index` names one bad item of a body)
        and count it."""
        letter = letter_bytes(msg, reason, error, max_bytes=self.settings.dead_letter_max_bytes, item_index=item_index)
        await self.send(self.settings.topics.name("dlq"), msg.key, letter)
        metrics.DEAD_LETTERS.labels(reason).inc()

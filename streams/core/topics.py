"""Create every topic the processor uses (idempotent): `messenger-streams topics create`.

The worker and `topics create` create every topic before Faust starts, the tables' changelog
topics included (streams/stages/startup.py derives them from the pipeline), and refuse an
existing topic whose partition count differs from what the processor needs: a table's changelog
and the topics that feed it must have the same number of partitions, and Faust only notices when
the first record is processed. Missing topics are never looked up by name (on a broker with
`auto.create.topics.enable=true` a metadata request for a missing topic creates it with the
broker's default partition count); the list of all topics is read instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from streams.core.config import ConnectorConfig
from streams.core.process import quiet_kafka_startup
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

# Topics whose partition count does not matter to the processor: the raw topic belongs to the
# upstream ingester (the ingest stage keys nothing by its partition) and nothing here reads the DLQ.
ANY_PARTITION_COUNT = frozenset({"raw", "dlq", "orders", "orders_unmatched"})  # #15: merchants' orders, a report
# issue 14: the page directory (`connector.pages`) and the pages' last event / last send
# (`connector.pages.activity`): small compacted topics of one partition (every change of a page in
# order), read whole by every worker, dispatcher and admin process. Created with the others.
PAGE_TOPICS = ("pages", "pages_activity")
PAGES_TOPIC_PARTITIONS = 1
# The raw topic's `max.message.bytes` is MESSENGER_STREAMS_MAX_BODY_BYTES plus this (key, headers,
# record batch overhead), as the webhook's producer allows (docs/architecture.md, size limits).
RAW_RECORD_OVERHEAD_BYTES = 65_536


class TopicError(ConnectionError):
    """Topics could not be created (broker unreachable, bad settings, wrong partition count)."""


@dataclass(frozen=True)
class TopicSpec:
    """What the processor needs of one topic."""

    partitions: int
    compacted: bool = False
    exact: bool = True  # refuse an existing topic with another partition count
    config: Mapping[str, str] = field(default_factory=dict)  # more topic configs (retention.ms, …)
    hint: str = ""  # what to do about another partition count, when not the default advice

    def topic_configs(self) -> dict[str, str]:
        configs = {"cleanup.policy": "compact"} if self.compacted else {}
        configs.update(self.config)
        return configs


def wanted_topics(settings: Settings, config: ConnectorConfig) -> dict[str, bool]:
    """Topic name → compacted?, for every topic of CONTRACT.md plus the internal ones."""
    names = {
        settings.topics.name(attr): spec[0]
        for attr, spec in TOPIC_SPECS.items()
        if attr != "events" or settings.publish_events
    }
    names.update({settings.topics.skill(s): False for s in config.all_skills()})
    return names


def page_topic_specs(settings: Settings, *attrs: str) -> dict[str, TopicSpec]:
    """The specs of the page topics (`attrs` of PAGE_TOPICS, default both): compacted, one partition."""
    return {
        settings.topics.name(attr): TopicSpec(PAGES_TOPIC_PARTITIONS, compacted=True)
        for attr in attrs or PAGE_TOPICS
    }


def contract_specs(settings: Settings, config: ConnectorConfig) -> dict[str, TopicSpec]:
    """`wanted_topics` as specs: MESSENGER_STREAMS_PARTITIONS partitions, exact except the raw, DLQ and order
    topics; plus the page topics (`page_topic_specs`)."""
    lenient = {settings.topics.name(attr) for attr in ANY_PARTITION_COUNT}
    specs = {
        name: TopicSpec(settings.partitions, compacted, exact=name not in lenient)
        for name, compacted in wanted_topics(settings, config).items()
    }
    specs.update(page_topic_specs(settings))
    # issue 12 (runtime): the raw topic takes every body the webhook accepts, record overhead included
    raw = settings.topics.name("raw")
    if raw in specs:
        limit = str(settings.max_body_bytes + RAW_RECORD_OVERHEAD_BYTES)
        specs[raw] = TopicSpec(specs[raw].partitions, specs[raw].compacted, specs[raw].exact,
                               {**specs[raw].config, "max.message.bytes": limit})
    return specs


def _unreachable(bootstrap: str, exc: BaseException) -> TopicError:
    detail = " ".join(str(exc).split()).removeprefix(f"{type(exc).__name__}: ")
    return TopicError(f"cannot reach Kafka at {bootstrap}: {type(exc).__name__}{': ' + detail if detail else ''}")


async def ensure_topic_specs(
    bootstrap: str,
    specs: Mapping[str, TopicSpec],
    replication_factor: int,
    timeout: float = 30.0,
) -> list[str]:
    """Create the missing topics of `specs`, check the partition count of the existing ones, and
    wait until the broker serves metadata for every created topic; returns the names created.

    Raises TopicError (a ConnectionError) when Kafka cannot be reached, refuses a topic, or an
    existing topic has another partition count than an `exact` spec asks for."""
    with quiet_kafka_startup():
        return await _ensure(bootstrap, specs, replication_factor, timeout)


async def _ensure(bootstrap: str, specs: Mapping[str, TopicSpec], replication_factor: int, timeout: float) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        try:
            await asyncio.wait_for(admin.start(), timeout)
            existing = set(await admin.list_topics())
            present = sorted(name for name in specs if name in existing)
            counts = await _partition_counts(admin, present) if present else {}
        except (TimeoutError, KafkaError, OSError) as exc:
            raise _unreachable(bootstrap, exc) from None
        for name in present:
            spec = specs[name]
            if spec.exact and counts.get(name) != spec.partitions:
                hint = spec.hint or f"delete the topic or set MESSENGER_STREAMS_PARTITIONS={counts.get(name)}"
                raise TopicError(
                    f"topic {name} has {counts.get(name)} partitions, the processor needs {spec.partitions} "
                    f"(MESSENGER_STREAMS_PARTITIONS): {hint}"
                )
        new = [
            NewTopic(name, spec.partitions, replication_factor, topic_configs=spec.topic_configs())
            for name, spec in sorted(specs.items())
            if name not in existing
        ]
        if new:
            try:
                resp = await admin.create_topics(new, timeout_ms=int(timeout * 1000))
            except (TimeoutError, KafkaError, OSError) as exc:
                raise _unreachable(bootstrap, exc) from None
            for name, code, message in getattr(resp, "topic_errors", []):
                if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (a racing creator)
                    raise TopicError(f"cannot create topic {name}: error {code} {message or ''}".strip())
            want = {t.name: specs[t.name].partitions for t in new}

            async def unserved() -> list[str]:
                counts = await _partition_counts(admin, sorted(want), led=True)
                return sorted(name for name, n in want.items() if counts.get(name) != n)

            await _wait_until(admin, unserved, timeout, bootstrap, "topics created but not served by Kafka")
        return [t.name for t in new]
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str], *, led: bool = False) -> dict[str, int]:
    """Partitions per topic (with `led`, only those with a leader). Only ask for topics that exist:
    see the module doc."""
    out: dict[str, int] = {}
    for meta in await admin.describe_topics(names):
        if meta.get("error_code", 0) == 0:
            parts = meta["partitions"]
            out[meta["topic"]] = sum(1 for p in parts if p.get("leader", -1) >= 0) if led else len(parts)
    return out


async def _wait_until(
    admin: AIOKafkaAdminClient, done: Callable[[], Awaitable[list[str]]], timeout: float, bootstrap: str, what: str
) -> None:
    """Poll the broker until `done()` returns no names left waiting (or fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            waiting = await done()
        except (TimeoutError, KafkaError, OSError) as exc:
            raise _unreachable(bootstrap, exc) from None
        if not waiting:
            return
        if time.monotonic() >= deadline:
            raise TopicError(f"{what} within {timeout:.0f}s: {', '.join(waiting)}")
        await asyncio.sleep(0.1)  # the broker's metadata is re-read each round: a polled condition


async def ensure_topics(
    bootstrap: str,
    wanted: Mapping[str, bool],
    partitions: int,
    replication_factor: int,
    timeout: float = 30.0,
) -> list[str]:
    """Create the missing topics of `wanted` (name → compacted?); returns the names created.

    Existing topics are kept whatever their partition count (edge processes that only write to a
    topic). Raises TopicError (a ConnectionError) when Kafka cannot be reached or refuses a topic."""
    specs = {name: TopicSpec(partitions, compacted, exact=False) for name, compacted in wanted.items()}
    return await ensure_topic_specs(bootstrap, specs, replication_factor, timeout)


async def create_topics(settings: Settings, config: ConnectorConfig, timeout: float = 30.0) -> list[str]:
    """Create every missing contract and internal topic (not the tables' changelogs: see
    streams/stages/startup.py for the worker's full set); returns the names created."""
    return await ensure_topic_specs(
        settings.bootstrap_servers, contract_specs(settings, config), settings.replication_factor, timeout
    )


async def delete_topics(bootstrap: str, names: list[str], timeout: float = 30.0) -> list[str]:
    """Delete those of `names` that exist and wait until the broker no longer lists them; returns the
    topics deleted. Kafka drops the consumer groups' offsets of deleted topics with them.
    Raises TopicError when Kafka cannot be reached."""
    with quiet_kafka_startup():
        return await _delete(bootstrap, names, timeout)


async def _delete(bootstrap: str, names: list[str], timeout: float) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        try:
            await asyncio.wait_for(admin.start(), timeout)
            doomed = sorted(set(names) & set(await admin.list_topics()))
            if doomed:
                await admin.delete_topics(doomed, timeout_ms=int(timeout * 1000))
        except (TimeoutError, KafkaError, OSError) as exc:
            raise _unreachable(bootstrap, exc) from None

        async def still_listed() -> list[str]:
            return sorted(set(doomed) & set(await admin.list_topics()))

        await _wait_until(admin, still_listed, timeout, bootstrap, "topics not deleted")
        return doomed
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def ensure_contract_topics(settings: Settings, *attrs: str, timeout: float = 30.0) -> list[str]:
    """Create the named topics of TOPIC_SPECS if they are missing (a command that only writes to
    them: `simulate`, `history forget`); the broker never creates a topic on its own."""
    wanted = {settings.topics.name(attr): TOPIC_SPECS[attr][0] for attr in attrs}
    return await ensure_topics(
        settings.bootstrap_servers, wanted, settings.partitions, settings.replication_factor, timeout
    )

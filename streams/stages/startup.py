"""Starting a worker: every topic it uses exists, with the right partition count, before Faust starts.

Why before: Faust declares a table's changelog topic in `Table.on_start`, concurrently with the
consumer joining its group. When the topic is new, the consumer's metadata snapshot (which Faust
reads in `Table._verify_source_topic_partitions`) can still say 0 partitions when the first event
is processed, and the agent raises PartitionsMismatch on every record until the metadata is
refreshed (minutes). Creating every topic first, changelogs included, and waiting until the broker
serves their metadata removes the race; refusing an existing topic with another partition count
turns a mismatch Faust would only find on the first record into one line at start-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sys
from typing import Any

from mode.utils.times import want_seconds

from streams.core.process import CliError
from streams.core.topics import (
    TOPIC_SPECS,
    TopicError,
    TopicSpec,
    contract_specs,
    delete_topics,
    ensure_topic_specs,
)
from streams.stages.pipeline import Pipeline


def _faust_spec(topic: Any, default_partitions: int) -> TopicSpec:
    config = {str(k): str(v) for k, v in (topic.config or {}).items()}
    if topic.deleting:
        config["cleanup.policy"] = "compact,delete" if topic.compacting else "delete"
    if topic.retention:
        config["retention.ms"] = str(int(want_seconds(topic.retention) * 1000))
    return TopicSpec(topic.partitions or default_partitions, compacted=bool(topic.compacting), config=config)


def required_topics(pipe: Pipeline) -> dict[str, TopicSpec]:
    """Every topic the pipeline's worker uses: the contract's and internal topics, every topic an
    agent reads or the pipeline declared, and every table's changelog (compacted, with the table's
    partition count)."""
    app = pipe.app
    default = int(app.conf.topic_partitions)
    specs = contract_specs(pipe.settings, pipe.config)
    declared = [topic for attr, topic in pipe.topics.items() if attr not in TOPIC_SPECS]  # those: contract_specs
    declared += list(pipe.skill_topics.values())
    declared += [agent.channel for agent in app.agents.values()]
    declared += [table.changelog_topic for table in app.tables.values()]
    for topic in declared:
        for name in getattr(topic, "topics", None) or ():  # channels that are not Kafka topics have none
            specs.setdefault(name, _faust_spec(topic, default))
    raw = pipe.settings.topics.name("raw")
    if pipe.one_hop and raw in specs:
        # one hop: raw partition p must be assigned with the table's partition p (one co-partitioned
        # group in faust's assignor), so the raw topic's count is no longer the ingester's choice
        specs[raw] = dataclasses.replace(
            specs[raw], exact=True,
            hint=f"give it {pipe.settings.partitions} partitions, or set MESSENGER_STREAMS_ONE_HOP=false "
            "(every body then goes through messenger.events.split)",
        )
    return specs


async def prepare_topics(pipe: Pipeline, timeout: float = 30.0) -> list[str]:
    """Create the missing topics of `required_topics`, refuse wrong partition counts; the names created."""
    settings = pipe.settings
    return await ensure_topic_specs(
        settings.bootstrap_servers, required_topics(pipe), settings.replication_factor, timeout
    )


async def remove_topics(pipe: Pipeline, timeout: float = 30.0) -> list[str]:
    """Delete every topic of `required_topics` and every other named topic of the settings (the
    dispatcher's sent log, …) that exists (`topics delete`); the names deleted."""
    topics = pipe.settings.topics
    named = {topics.name(attr) for attr in type(topics).model_fields if attr not in ("prefix", "skill_prefix")}
    return await delete_topics(pipe.settings.bootstrap_servers, sorted(set(required_topics(pipe)) | named), timeout)


def check_web_port(host: str, port: int) -> None:
    """Refuse, with one line, a web port another process listens on: Faust would crash on it
    after joining the group. (A process taking the port in between still crashes the worker.)"""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port} (MESSENGER_STREAMS_WEB_PORT): {exc.strerror}") from None


def run_worker(pipe: Pipeline, *, loop: str, extra_args: list[str]) -> int:
    """Prepare the topics, then run the Faust worker until it stops; returns its exit status.

    `loop` is Faust's `-L` (aio or uvloop); `extra_args` are more Faust worker options."""
    check_web_port(pipe.settings.web_host, pipe.settings.web_port)
    try:
        asyncio.run(prepare_topics(pipe))
    except TopicError as exc:
        raise CliError(str(exc)) from None
    sys.argv = ["messenger-streams", "-L", loop, "worker", "-l", pipe.settings.log_level, *extra_args]
    try:
        pipe.app.main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0

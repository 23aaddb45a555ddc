"""`messenger-streams dlq`: look at the dead-letter topic and replay what was fixed.

    messenger-streams dlq show                      # counts by reason and source topic
    messenger-streams dlq replay --reason invalid_item --dry-run
    messenger-streams dlq replay --reason body_too_large

`replay` writes each selected letter's original bytes back to the topic it came from (raw bodies to
`messenger.webhook.raw`, agent actions to `agent.actions` with their key). Replaying is safe: the
ingest stage drops items it already processed (dedupe by idempotency key) and the conversation
stage ignores repeated action ids. Letters are read from the beginning of the topic; `--since`
limits them to those dead-lettered after a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from typing import Any

import orjson

from streams.core.process import CliError, start_client
from streams.core.serde import decode_payload
from streams.core.settings import load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dlq_command", metavar="ACTION")
    sub.required = True
    sub.add_parser("show", help="count the dead letters by reason and source topic")
    p = sub.add_parser("replay", help="write the original bytes of dead letters back to their source topic")
    p.add_argument("--reason", action="append", default=[], help="only letters with this reason (repeatable)")
    p.add_argument("--since", type=int, default=0, help="only letters dead-lettered at or after this epoch ms")
    p.add_argument("--dry-run", action="store_true", help="print what would be replayed, write nothing")


async def read_letters(bootstrap: str, topic: str, timeout: float = 10.0) -> list[tuple[bytes | None, dict[str, Any]]]:
    """Every letter of the dead-letter topic, from the beginning: (record key, letter)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await start_client(consumer)
    letters: list[tuple[bytes | None, dict[str, Any]]] = []
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public call for it
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return letters
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            batch = await consumer.getmany(*tps, timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    try:
                        letter = orjson.loads(rec.value)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(letter, dict):
                        letters.append((rec.key, letter))
    finally:
        # aiokafka may cancel its own committed-offsets task while stopping a group-less consumer
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()
    return letters


async def _run(args: argparse.Namespace) -> int:
    settings = load_settings()
    dlq_topic = settings.topics.name("dlq")
    letters = await read_letters(settings.bootstrap_servers, dlq_topic)
    if args.dlq_command == "show":
        counts = Counter(
            (str(letter.get("reason")), str((letter.get("source") or {}).get("topic"))) for _, letter in letters
        )
        for (reason, source), n in sorted(counts.items()):
            print(f"{n:8d}  {reason:20s} from {source}")
        print(f"{len(letters):8d}  dead letters in {dlq_topic}")
        return 0
    replayable = {settings.topics.name("raw"), settings.topics.name("actions")}
    chosen = [
        (key, letter)
        for key, letter in letters
        if (not args.reason or letter.get("reason") in args.reason)
        and int(letter.get("dead_lettered_at") or 0) >= args.since
        and (letter.get("source") or {}).get("topic") in replayable
    ]
    truncated = [letter for _, letter in chosen if letter.get("truncated")]
    if truncated:  # only a prefix of the original was kept (a letter too large for Kafka)
        print(f"{len(truncated)} truncated dead letters cannot be replayed (see original_size, original_sha256)")
        chosen = [(key, letter) for key, letter in chosen if not letter.get("truncated")]
    seen: set[tuple[str, int, int]] = set()
    plan: list[tuple[str, bytes | None, bytes]] = []
    for key, letter in chosen:
        src = letter["source"]
        ident = (src["topic"], int(src.get("partition") or 0), int(src.get("offset") or 0))
        if ident in seen:  # several bad items of one body: replay the body once
            continue
        seen.add(ident)
        plan.append((src["topic"], key, decode_payload(letter["payload"], letter.get("payload_encoding", "utf-8"))))
    if args.dry_run:
        for topic, _, payload in plan:
            print(f"would replay {len(payload)} bytes to {topic}")
        print(f"{len(plan)} records would be replayed (dry run)")
        return 0
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await start_client(producer)
    try:
        now = str(int(time.time() * 1000)).encode()
        for topic, key, payload in plan:
            await producer.send_and_wait(topic, payload, key=key, headers=[("received-at", now), ("replayed", b"1")])
    finally:
        await producer.stop()
    print(f"replayed {len(plan)} records")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of `messenger-streams dlq`."""
    try:
        return asyncio.run(_run(args))
    except OSError as exc:
        raise CliError(f"cannot reach Kafka: {exc}") from None
    finally:
        sys.stdout.flush()

"""Our own CPU per input record, without Kafka: the conversation stage and the state-first runner.

`python -m bench.cpu [--events 40000] [--batch 100] [--profile [N]]`. The same traffic as
`make bench` (`bench.common.make_dataset`: the Simulator's mix of raw bodies and agent actions,
0.1% invalid, 2% redelivered), keyed and partitioned as the webhook writes it, goes through the
worker's own `ConversationStage` (split in place, decide, records) and `StateFirstRunner` (guards,
state, timers, pending outputs, flushes) on the worker's `TableStore` over a dict. Kafka is left
out: every write is acknowledged at once. So the figure is the part of a worker's CPU per input
that is ours, to set beside `make bench`'s drain rates: C's CPU per input minus B's (faust's floor)
is ours plus aiokafka's cost of our extra writes.

`--profile` runs it under cProfile and prints the N functions with the most own time (cProfile
roughly doubles the time; the shares are what counts). One process, one core, no I/O: run it on a
quiet machine, a few times.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from bench.common import load_config, make_dataset

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "deploy" / "connector.example.toml"
T0_MS = 1_790_000_000_000


class _Data(dict[str, Any]):
    """The local store as `TableStore` uses it (faust's store: a mapping with a persisted offset)."""

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        pass


class _Ack:
    __slots__ = ("offset", "partition", "topic")

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset


class _Producer:
    """Acknowledges every write at once and counts them per topic (faust's and the app's producer)."""

    def __init__(self) -> None:
        self.writes: Counter[str] = Counter()
        self.bytes = 0
        self.largest: Counter[str] = Counter()  # topic → its largest value (bytes)

    async def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
                   timestamp: Any = None, headers: Any = None) -> asyncio.Future[Any]:
        self.writes[topic] += 1
        self.bytes += len(value or b"")
        self.largest[topic] = max(self.largest[topic], len(value or b""))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(_Ack(topic, partition or 0, self.writes[topic]))
        return fut

    def send_now(self) -> None:
        pass


def build(config: Any, partitions: int) -> tuple[Any, Any, _Producer]:
    """The worker's conversation stage and runner, on a dict store and an instant producer."""
    from streams.core.pages import PageDirectory
    from streams.core.settings import Settings
    from streams.rules.conversation.decider import Decider
    from streams.stages.app import CachedPartitioner
    from streams.stages.conversation import ConversationStage
    from streams.stages.pages import LivePages
    from streams.stages.runtime import StateFirstRunner, TableStore

    settings = Settings(partitions=partitions)
    app = SimpleNamespace(conf=SimpleNamespace(producer_partitioner=CachedPartitioner()),
                          consumer=SimpleNamespace(topic_partitions=lambda topic: partitions))
    pipe = SimpleNamespace(settings=settings, config=config, skill_topics={k: None for k in config.all_skills()},
                           pages=LivePages(PageDirectory(config), settings), app=app, one_hop=True)
    stage = ConversationStage(cast(Any, pipe), Decider(config, dedupe_horizon_ms=settings.dedupe_horizon_seconds * 1000,
                                            dedupe_max_keys=settings.dedupe_max_keys))
    producer = _Producer()
    table = SimpleNamespace(data=_Data(), key_serializer="json",
                            changelog_topic=SimpleNamespace(get_topic_name=lambda: "conversations-changelog"))
    runner = StateFirstRunner(stage, TableStore(table, producer), producer, dlq_topic=settings.topics.name("dlq"))
    return stage, runner, producer


def records(stage: Any, config: Any, events: int, partitions: int) -> list[Any]:
    from streams.stages.runtime import Record

    ds = make_dataset(config, events, partitions, ("raw", "actions"))
    offsets: Counter[tuple[str, int]] = Counter()
    out = []
    for i, r in enumerate(ds.records):
        topic = stage.names["raw"] if r.attr == "raw" else stage.names["actions"]
        offset = offsets[(topic, r.partition)]
        offsets[(topic, r.partition)] += 1
        out.append(Record(topic, r.partition, offset, r.key, r.value, T0_MS + i))
    return out


async def _run(runner: Any, recs: list[Any], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(recs), batch):
        await runner.run_batch(recs[i:i + batch])
    return time.perf_counter() - start


def run(config_path: Path, events: int, partitions: int, batch: int, profile: int | None) -> dict[str, Any]:
    config = load_config(config_path)
    stage, runner, producer = build(config, partitions)
    recs = records(stage, config, events, partitions)
    top = ""
    if profile is None:
        elapsed = asyncio.run(_run(runner, recs, batch))
    else:
        prof = cProfile.Profile()
        prof.enable()
        elapsed = asyncio.run(_run(runner, recs, batch))
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(profile)
        top = buf.getvalue()
    n = len(recs)
    return {
        "records": n,
        "seconds": round(elapsed, 3),
        "us_per_record": round(elapsed / n * 1e6, 1),
        "writes_per_record": round(sum(producer.writes.values()) / n, 2),
        "bytes_written_per_record": round(producer.bytes / n),
        "writes": dict(producer.writes.most_common()),
        "largest_value_bytes": dict(producer.largest.most_common()),
        "profiled": profile is not None,
        "profile": top,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=40_000, help="input records (default 40,000)")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--batch", type=int, default=100, help="records per runner batch (default 100)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--profile", type=int, nargs="?", const=30, default=None, metavar="N",
                   help="run under cProfile and print the N functions with the most own time (default 30)")
    args = p.parse_args(argv)
    if args.events < 1 or args.batch < 1 or args.partitions < 1:
        p.error("--events, --batch and --partitions must be at least 1")
    res = run(args.config, args.events, args.partitions, args.batch, args.profile)
    if res["profile"]:
        print(res["profile"])
    print(f"{res['records']} records in {res['seconds']} s: {res['us_per_record']} µs per record"
          f"{' (under cProfile)' if res['profiled'] else ''}, {res['writes_per_record']} writes and "
          f"{res['bytes_written_per_record']} bytes written per record")
    print("writes: " + ", ".join(f"{t} {n}" for t, n in res["writes"].items()))
    print("largest value: " + ", ".join(f"{t} {n:,} B" for t, n in res["largest_value_bytes"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Arm A: a raw aiokafka consume → produce passthrough, one output per input, no parsing.
With `--fanout K` (arm A×K) every input is written K times: the pipeline's extra I/O without its work.

Run as `python -m bench.passthrough --group G --out TOPIC --partitions N IN_TOPIC...`. It copies
every record (key, value, headers, and the input partition for keyless records) to `--out`, with the
same producer settings as the faust worker (acks=all, linger, 256 KiB batches) and the same commit
discipline (commit after the producer has flushed, every `--commit-interval` seconds or 10,000
records, like faust's broker_commit_interval / broker_commit_every). Prints `READY` once consuming.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from typing import Any


async def run(args: argparse.Namespace) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_min_bytes=args.fetch_min_bytes,  # the worker's (faustfix sets them on faust's consumer)
        fetch_max_wait_ms=args.fetch_max_wait_ms,
        max_partition_fetch_bytes=1_048_576,  # faust consumer_max_fetch_size
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap,
        acks="all",
        linger_ms=args.linger_ms,
        max_batch_size=262_144,
    )
    await producer.start()
    await consumer.start()
    tps = [TopicPartition(t, p) for t in args.inputs for p in range(args.partitions)]
    consumer.assign(tps)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)

    pending: list[asyncio.Future[Any]] = []
    positions: dict[TopicPartition, int] = {}
    since_commit = 0
    last_commit = time.monotonic()

    async def commit() -> None:
        nonlocal since_commit, last_commit
        if pending:
            await asyncio.gather(*pending)
            pending.clear()
        if positions:
            await consumer.commit(dict(positions))
            positions.clear()
        since_commit = 0
        last_commit = time.monotonic()

    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=args.max_records)
            for tp, recs in batch.items():
                for r in recs:
                    for _ in range(args.fanout):
                        pending.append(
                            await producer.send(
                                args.out,
                                r.value,
                                key=r.key,
                                partition=tp.partition if r.key is None else None,
                                headers=list(r.headers or ()),
                            )
                        )
                positions[tp] = recs[-1].offset + 1
                since_commit += len(recs)
            if since_commit >= 10_000 or (positions and time.monotonic() - last_commit >= args.commit_interval):
                await commit()
        await commit()
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.passthrough", description=__doc__)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    p.add_argument("--group", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--partitions", type=int, required=True)
    p.add_argument("--linger-ms", type=int, default=5)
    p.add_argument("--fetch-min-bytes", type=int, default=1)
    p.add_argument("--fetch-max-wait-ms", type=int, default=1500)
    p.add_argument("--commit-interval", type=float, default=1.0)
    p.add_argument("--max-records", type=int, default=None)
    p.add_argument("--fanout", type=int, default=1, help="outputs per input (default 1)")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    if args.no_uvloop:
        asyncio.run(run(args))
    else:
        import uvloop

        uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Open-loop load generator: sends pre-generated records on a fixed schedule.

`python -m bench.loadgen --records FILE --topic raw=NAME [--topic actions=NAME] --rate R --seconds S`.
Record i is *intended* at `t0 + i/R` (wall clock, ns); it is sent as soon as that time has come,
never waiting for earlier sends to be delivered (no coordinated omission: a stalled pipeline or
producer does not slow the schedule down, and the latency is measured from the intended time).
Each raw record carries `received-at` = intended ms and `bench-intended-ns`. Prints one JSON line
at the end: t0_ns, rate, sent, errors, max_behind_ms (how far the generator itself fell behind).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import read_records

MIN_SLEEP_S = 0.001


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    recs = list(read_records(Path(args.records)))
    topics = dict(t.split("=", 1) for t in args.topic)
    recs = [r for r in recs if r.attr in topics]
    count = int(args.rate * args.seconds)
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, acks="all", linger_ms=args.linger_ms, max_batch_size=262_144
    )
    await producer.start()
    errors = 0

    def done(fut: asyncio.Future[Any]) -> None:
        nonlocal errors
        if fut.cancelled() or fut.exception() is not None:
            errors += 1

    interval = 1e9 / args.rate
    t0 = time.time_ns() + 200_000_000
    i = 0
    behind = 0
    try:
        while i < count:
            now = time.time_ns()
            due = min(count, int((now - t0) // interval) + 1) if now >= t0 else 0
            while i < due:
                intended = t0 + int(i * interval)
                r = recs[i % len(recs)]
                fut = await producer.send(
                    topics[r.attr],
                    r.value,
                    key=r.key,
                    partition=r.partition,
                    headers=[("received-at", str(intended // 1_000_000).encode()),
                             ("bench-intended-ns", str(intended).encode())],
                )
                fut.add_done_callback(done)
                behind = max(behind, time.time_ns() - intended)
                i += 1
            # the event loop's timers have a resolution of 1 ms (libuv): a shorter sleep returns at
            # once, so above 1,000 records/s the generator spun a whole core away from the 2-core
            # box (0.6-0.8 cores at 2,263/s). It now wakes at most once a millisecond and sends what
            # has come due; latency still counts from each record's own intended time.
            wait = (t0 + int(i * interval) - time.time_ns()) / 1e9
            await asyncio.sleep(max(wait, MIN_SLEEP_S))
        await producer.flush()
    finally:
        await producer.stop()
    return {"t0_ns": t0, "rate": args.rate, "sent": i, "errors": errors, "max_behind_ms": round(behind / 1e6, 2),
            "wrapped": count > len(recs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.loadgen", description=__doc__)
    p.add_argument("--records", required=True)
    p.add_argument("--topic", action="append", required=True, help="attr=topic, e.g. raw=x.messenger.webhook.raw")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    p.add_argument("--linger-ms", type=int, default=5)
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    if args.no_uvloop:
        result = asyncio.run(run(args))
    else:
        import uvloop

        result = uvloop.run(run(args))
    result["cpu_s"] = round(time.process_time(), 3)  # the generator's own CPU, for the bench's CPU budget
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

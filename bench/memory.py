"""Memory per open conversation: one worker, N consumers each opening one conversation.

`python -m bench.memory [--conversations 10000] [--stores memory,rocksdb]` (the broker of
KAFKA_BOOTSTRAP_SERVERS). For each store: a fresh app id and topic prefix, one worker
(`MESSENGER_STREAMS_STORE=<store>://`), its RSS once ready; then N raw bodies, one consumer message
from N distinct people over the configured pages, preloaded; once the worker's
`messenger_open_conversations` gauges sum to N, its RSS again, and the `conversations` changelog
read back (latest value per key: what a compacted changelog keeps). Reported per open
conversation: RSS growth, changelog bytes (key + value), and the largest value. Writes a JSON to
`--results-dir` (default bench/results) as `<stamp>-memory-<run id>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from aiokafka.partitioner import murmur2

from bench.common import (
    DEFAULT_CONFIG,
    ROOT,
    Rec,
    create_topics,
    delete_topics,
    load_config,
    preload,
    proc_status,
    quiet_kafka_logs,
)
from bench.run import Names, log, parse_args, start_workers, wait_ready


def bodies(config: Any, n: int, partitions: int) -> list[Rec]:
    """N raw bodies, one consumer message each from N distinct people, round-robin over pages, keyed
    by their conversation as the `webhook` command keys them."""
    pages = [p.page_id for p in config.pages]
    now = int(time.time() * 1000)
    out = []
    for i in range(n):
        page = pages[i % len(pages)]
        item = {"sender": {"id": f"7{i:014d}"}, "recipient": {"id": page}, "timestamp": now + i,
                "message": {"mid": f"m_mem{i:012d}", "text": "Hello, I need help with my order"}}
        body = orjson.dumps({"object": "page", "entry": [{"id": page, "time": now + i, "messaging": [item]}]})
        key = f"{page}:{item['sender']['id']}".encode()  # keyed as the webhook keys it (one hop)
        out.append(Rec("raw", key, body, (murmur2(key) & 0x7FFFFFFF) % partitions))
    return out


def open_conversations(port: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310 - local
            text = resp.read().decode()
    except OSError:
        return -1
    return int(sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith("messenger_open_conversations{")))


async def changelog_view(bootstrap: str, topic: str, partitions: int) -> dict[bytes, int]:
    """Latest value size per key of a changelog (tombstones drop the key)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    sizes: dict[bytes, int] = {}
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            behind = False
            for tp in tps:
                behind = behind or await consumer.position(tp) < ends[tp]
            if not behind:
                break
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                for r in recs:
                    if r.key is None:
                        continue
                    if r.value is None:
                        sizes.pop(r.key, None)
                    else:
                        sizes[r.key] = len(r.value)
    finally:
        await consumer.stop()
    return sizes


async def measure(store: str, n: int, config_path: Path, partitions: int, rid: str, workdir: Path,
                  worker_env: Sequence[str] = ()) -> dict[str, Any]:
    config = load_config(config_path)
    opts, _ = parse_args(["--config", str(config_path), "--partitions", str(partitions),
                          "--worker-env", f"MESSENGER_STREAMS_STORE={store}://",
                          *(a for kv in worker_env for a in ("--worker-env", kv))])
    app_id = f"benchmem{rid}{store[:1]}"
    names = Names(f"{app_id}.", partitions, config)
    await create_topics(opts.bootstrap, names.all_topics(), partitions)
    procs = start_workers(opts, names, app_id, workdir, 1)
    proc = procs[0]
    try:
        await wait_ready(procs)
        await asyncio.sleep(3)
        rss0 = proc_status(proc.pid)["VmRSS"]
        t = time.monotonic()
        await preload(opts.bootstrap, bodies(config, n, partitions), {"raw": names.attr("raw")})
        port = proc.env["MESSENGER_STREAMS_WEB_PORT"]
        deadline = time.monotonic() + 600
        seen = 0
        while time.monotonic() < deadline:
            proc.check_alive()
            seen = open_conversations(port)
            if seen >= n:
                break
            await asyncio.sleep(1)
        took = time.monotonic() - t
        await asyncio.sleep(3)  # settle: last units flushed, gauges refreshed
        st = proc_status(proc.pid)
    finally:
        proc.stop()
    sizes = await changelog_view(opts.bootstrap, f"{app_id}-conversations-changelog", partitions)
    # keys are JSON strings (the table's key serializer); metas and wheel slots start with NUL
    conv = {k: v for k, v in sizes.items() if not orjson.loads(k).startswith("\x00")}
    conv_bytes = sum(len(k) + v for k, v in conv.items())
    all_bytes = sum(len(k) + v for k, v in sizes.items())
    await delete_topics(opts.bootstrap, names.prefix)
    await delete_topics(opts.bootstrap, app_id)
    res = {
        "store": store, "conversations": n, "open_seen": seen, "seconds": round(took, 1),
        "rss_ready_mib": round(rss0 / 1024, 1), "rss_loaded_mib": round(st["VmRSS"] / 1024, 1),
        "rss_bytes_per_conversation": round((st["VmRSS"] - rss0) * 1024 / n),
        "changelog_keys": len(sizes), "conversation_keys": len(conv),
        "changelog_bytes_per_conversation": round(conv_bytes / max(1, len(conv))),
        "changelog_bytes_per_conversation_all_keys": round(all_bytes / max(1, len(conv))),
        "max_value_bytes": max(conv.values(), default=0),
    }
    log(f"{store}: {n} open conversations, RSS {res['rss_ready_mib']} → {res['rss_loaded_mib']} MiB "
        f"({res['rss_bytes_per_conversation']} B each), changelog {res['changelog_bytes_per_conversation']} B each, "
        f"largest value {res['max_value_bytes']} B")
    return res


async def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet_kafka_logs()
    rid = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="ms-bench-mem-"))
    out: dict[str, Any] = {"mode": "memory", "run_id": rid,
                           "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "results": []}
    for store in [s.strip() for s in args.stores.split(",") if s.strip()]:
        out["results"].append(await measure(store, args.conversations, args.config.resolve(), args.partitions,
                                            rid, workdir, args.worker_env))
    out["worker_env"] = args.worker_env
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=10_000)
    p.add_argument("--stores", default="memory,rocksdb")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra worker setting (repeatable), e.g. MESSENGER_STREAMS_ROCKSDB_BLOCK_CACHE_MB=64")
    args = p.parse_args(argv)
    res = asyncio.run(run(args))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"{stamp}-memory-{res['run_id']}.json"
    path.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The history sink's benchmark: `python -m bench.history` (or `make bench-history`).

On an embedded PostgreSQL 16 (pgserver, in a temp dir) and the broker of KAFKA_BOOTSTRAP_SERVERS:
- store:  pre-built records → `Batch` → `HistoryStore.write`, one transaction per batch (no Kafka):
          the database side alone;
- replay: the same records written again (what a re-read from the start costs: every row conflicts);
- sink:   the records produced to fresh topics, then one `HistorySink` (aiokafka consumer group,
          commit after each transaction) drains them: the whole path;
- reads:  `GET /conversations?q=` (search) and a transcript, median latency over the stored data;
- size:   bytes on disk (tables + indexes) per stored message and per conversation.

Rates are records/s (every consumed record) and messages/s (message rows: consumer, agent, system,
external). Results: bench/results/history-<timestamp>.json and history-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import orjson
import psycopg
from aiokafka import AIOKafkaProducer
from psycopg import sql
from psycopg.conninfo import make_conninfo

from streams.core.config import parse_config
from streams.core.settings import load_settings
from streams.core.topics import ensure_topics
from streams.edges.history import HistorySink
from streams.history.embedded import start_embedded, stop_embedded
from streams.history.store import HistoryStore
from streams.rules.history import Batch, Src, parse_search
from tests.historysamples import Rec, conversation_records

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
[account]
app_id = "1"
[history]
retain_days = 0
"""


def consumed(records: list[Rec], partitions: int) -> list[tuple[Any, dict[str, Any], Src]]:
    offsets: dict[tuple[str, int], int] = {}
    out: list[tuple[Any, dict[str, Any], Src]] = []
    for rec in records:
        topic = rec.kind.replace("skill:", "skill.")
        part = zlib.crc32(rec.key.encode()) % partitions
        off = offsets.get((topic, part), 0)
        offsets[(topic, part)] = off + 1
        out.append(("skill" if rec.kind.startswith("skill:") else rec.kind, rec.value, Src(topic, part, off)))
    return out


async def write_store(dsn: str, items: list[tuple[Any, dict[str, Any], Src]], batch_size: int) -> float:
    async with HistoryStore(dsn) as store:
        start = time.perf_counter()
        for i in range(0, len(items), batch_size):
            batch = Batch()
            for kind, value, src in items[i : i + batch_size]:
                batch.add(kind, value, src)
            await store.write(batch)
        return time.perf_counter() - start


def message_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
    return int(row[0]) if row else 0


async def run_sink(bootstrap: str, dsn: str, records: list[Rec], batch_size: int, partitions: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    os.environ["MESSENGER_STREAMS_TOPIC_PREFIX"] = f"hb{tag}."
    os.environ["MESSENGER_STREAMS_APP_ID"] = f"hbench-{tag}"
    settings = load_settings()
    config = parse_config(CONFIG)
    skills = sorted({r.kind.split(":", 1)[1] for r in records if r.kind.startswith("skill:")})
    wanted = {settings.topics.skill(s): False for s in skills}
    wanted.update({settings.topics.name(a): False for a in ("history", "csat_responses", "dlq")})
    await ensure_topics(bootstrap, wanted, partitions, 1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=262_144)
    await producer.start()
    try:
        futures = []
        for rec in records:
            topic = (settings.topics.skill(rec.kind.split(":", 1)[1]) if rec.kind.startswith("skill:")
                     else settings.topics.name("history" if rec.kind == "history" else "csat_responses"))
            futures.append(await producer.send(topic, orjson.dumps(rec.value), key=rec.key.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    store = HistoryStore(dsn)
    await store.open()
    sink = HistorySink(settings, config, store, batch_size=batch_size)
    start = time.perf_counter()
    await sink.start()
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    try:
        while sink.stats.records < len(records):
            await asyncio.sleep(0.1)
            if task.done():
                task.result()
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await sink.stop()
        await store.close()
    return {"seconds": round(elapsed, 2), "batches": sink.stats.batches}


async def reads(dsn: str, rounds: int = 20) -> dict[str, float]:
    async with HistoryStore(dsn) as store:
        timings: dict[str, list[float]] = {"search_q": [], "search_filters": [], "transcript": []}
        first = await store.search(parse_search({"limit": "1"}))
        cid = first["conversations"][0]["conversation_id"]
        for _ in range(rounds):
            for name, call in (
                ("search_q", lambda: store.search(parse_search({"q": "refund", "limit": "50"}))),
                ("search_filters", lambda: store.search(parse_search({"skill": "billing", "csat_min": "4",
                                                                      "limit": "50"}))),
                ("transcript", lambda: store.transcript(cid)),
            ):
                t = time.perf_counter()
                await call()
                timings[name].append((time.perf_counter() - t) * 1000)
    return {f"{k}_ms_p50": round(statistics.median(v), 2) for k, v in timings.items()}


def sizes(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        out: dict[str, Any] = {}
        for table in ("conversations", "messages", "events", "csat_responses"):
            row = conn.execute(
                sql.SQL("SELECT pg_total_relation_size(%s), pg_relation_size(%s), (SELECT count(*) FROM {})")
                .format(sql.Identifier(table)), [table, table]).fetchone()
            assert row is not None
            out[table] = {"rows": int(row[2]), "total_bytes": int(row[0]), "heap_bytes": int(row[1])}
    total = sum(v["total_bytes"] for v in out.values())
    out["bytes_per_message_all_tables"] = round(total / max(out["messages"]["rows"], 1))
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    records = conversation_records(args.conversations, seed=5, skills=("billing", "support", "sales"),
                                   chatter=args.chatter)
    items = consumed(records, args.partitions)
    base = Path(tempfile.mkdtemp(prefix="ms-pg-bench-"))
    try:
        uri = start_embedded(base / "data", delete_on_exit=True)
        dbs = []
        for name in ("store", "sink"):
            with psycopg.connect(uri, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE bench_{name}")
            dbs.append(make_conninfo(uri, dbname=f"bench_{name}"))
        store_dsn, sink_dsn = dbs
        result: dict[str, Any] = {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "postgres": "16 (pgserver)"},
            "conversations": args.conversations, "chatter": args.chatter, "records": len(records),
            "batch_size": args.batch_size,
        }
        seconds = await write_store(store_dsn, items, args.batch_size)
        messages = message_count(store_dsn)
        result["messages"] = messages
        result["store"] = {"seconds": round(seconds, 2), "records_per_s": round(len(items) / seconds),
                           "messages_per_s": round(messages / seconds)}
        seconds = await write_store(store_dsn, items, args.batch_size)
        result["replay"] = {"seconds": round(seconds, 2), "records_per_s": round(len(items) / seconds),
                            "messages_per_s": round(messages / seconds)}
        result["reads"] = await reads(store_dsn)
        result["size"] = sizes(store_dsn)
        if not args.no_kafka:
            bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
            sink = await run_sink(bootstrap, sink_dsn, records, args.batch_size, args.partitions)
            sink["records_per_s"] = round(len(records) / sink["seconds"])
            sink["messages_per_s"] = round(message_count(sink_dsn) / sink["seconds"])
            result["sink"] = sink
        stop_embedded(base / "data")
        return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--chatter", type=int, default=0, help="extra consumer+agent message pairs per conversation")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--no-kafka", action="store_true", help="the store arms only")
    parser.add_argument("--smoke", action="store_true", help="200 conversations: does it run")
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if args.smoke:
        args.conversations = 200
    result = asyncio.run(main(args))
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    print(text)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"history-{stamp}.json").write_text(text + "\n")
    (out / "history-latest.json").write_text(text + "\n")


if __name__ == "__main__":
    cli()

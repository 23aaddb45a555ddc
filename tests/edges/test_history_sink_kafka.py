"""The history sink on a real broker and the embedded PostgreSQL: topics by pattern (a new skill
without a restart), dead letters, a SIGKILL mid-stream and two sinks racing leave the same rows."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from streams.core.config import ConnectorConfig, parse_config
from streams.core.settings import Settings, load_settings
from streams.core.topics import ensure_topics
from streams.edges.history import INVALID_REASON, HistorySink
from streams.history.store import HistoryStore
from tests.conftest import BASE_CONFIG
from tests.historysamples import Rec, conversation_records
from tests.kafkatools import ROOT, KafkaIO, worker_env
from tests.pgtools import dump, new_database

pytestmark = pytest.mark.kafka

CONFIG = BASE_CONFIG + "\n[history]\nretain_days = 0\n"


def topic_of(settings: Settings, rec: Rec) -> str:
    if rec.kind.startswith("skill:"):
        return settings.topics.skill(rec.kind.split(":", 1)[1])
    return settings.topics.name("history" if rec.kind == "history" else "csat_responses")


async def produce(kafka: KafkaIO, settings: Settings, records: list[Rec]) -> None:
    p = await kafka.producer()
    futures = [await p.send(topic_of(settings, r), orjson.dumps(r.value), key=r.key.encode()) for r in records]
    await asyncio.gather(*futures)


async def create(settings: Settings, *skills: str) -> None:
    wanted = {settings.topics.skill(s): False for s in skills}
    wanted.update({settings.topics.name(a): False for a in ("history", "csat_responses", "dlq", "actions")})
    await ensure_topics(settings.bootstrap_servers, wanted, partitions=2, replication_factor=1)


@pytest.fixture
def sink_settings(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    tag = uuid.uuid4().hex[:10]
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("MESSENGER_STREAMS_TOPIC_PREFIX", f"h{tag}.")
    monkeypatch.setenv("MESSENGER_STREAMS_APP_ID", f"ms-history-{tag}")
    monkeypatch.setenv("MESSENGER_STREAMS_HISTORY_TOPIC_REFRESH_MS", "1000")
    return load_settings()


@pytest.fixture
async def run_sink() -> AsyncIterator[Callable[..., Any]]:
    """Start in-process sinks (each with its own store and group); all stopped at teardown."""
    running: list[tuple[asyncio.Event, asyncio.Task[None], HistorySink]] = []

    async def start(settings: Settings, config: ConnectorConfig, dsn: str, group: str, **kw: Any) -> HistorySink:
        store = HistoryStore(dsn)
        await store.open()
        sink = HistorySink(settings, config, store, group=group, **kw)
        await sink.start()
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(sink.run(stop)), sink))
        return sink

    yield start
    for stop, task, sink in running:
        stop.set()
        await asyncio.wait_for(task, 30)
        await sink.stop()
        await sink.store.close()


async def wait_for(condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except psycopg.errors.UndefinedTable:
            pass  # the sink has not created its tables yet
        await asyncio.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def counts(dsn: str) -> dict[str, int]:
    return {table: len(rows) for table, rows in dump(dsn).items()}


async def test_sink_writes_every_topic_and_picks_up_a_new_skill(
    sink_settings: Settings, kafka: KafkaIO, history_dsn: str, run_sink: Callable[..., Any]
) -> None:
    config = parse_config(CONFIG)
    await create(sink_settings, "billing", "support")
    first = conversation_records(10, seed=11)
    await produce(kafka, sink_settings, first)
    sink = await run_sink(sink_settings, config, history_dsn, "g1", batch_size=40)
    await wait_for(lambda: counts(history_dsn)["conversations"] == 10, 90, "the first 10 conversations")

    # a skill created while the sink runs, and a record that is not JSON
    await create(sink_settings, "vip")
    later = conversation_records(3, seed=12, skills=("vip", "billing"))
    await produce(kafka, sink_settings, later)
    await kafka.send(sink_settings.topics.skill("vip"), b"not json", key="x:y")
    await wait_for(lambda: counts(history_dsn)["conversations"] == 13, 90, "the conversations of the new skill")
    await wait_for(lambda: sink.stats.invalid == 1, 30, "the dead letter")
    letters = await kafka.read_json(sink_settings.topics.name("dlq"), min_count=1)
    assert [(d["reason"], d["payload"]) for d in letters] == [(INVALID_REASON, "not json")]
    async with HistoryStore(history_dsn) as store:
        vip = await store.transcript("c-12-00000")
        assert vip is not None and vip["conversation"]["skills"] == ["vip"]
        assert any(i["type"] == "consumer_message" for i in vip["transcript"])


async def test_a_killed_sink_and_two_racing_sinks_leave_the_same_rows(
    sink_settings: Settings, kafka: KafkaIO, pg_server: str, run_sink: Callable[..., Any], tmp_path: Path,
    kafka_bootstrap: str,
) -> None:
    config = parse_config(CONFIG)
    await create(sink_settings, "billing", "support")
    records = conversation_records(150, seed=21)
    await produce(kafka, sink_settings, records)

    reference = new_database(pg_server)
    ref = await run_sink(sink_settings, config, reference, "ref", batch_size=500)
    await wait_for(lambda: ref.stats.records == len(records), 120, "the reference sink")
    expected = dump(reference)

    raced = new_database(pg_server)
    env = worker_env(kafka_bootstrap, tmp_path, CONFIG,
                     MESSENGER_STREAMS_TOPIC_PREFIX=sink_settings.topics.prefix,
                     MESSENGER_STREAMS_APP_ID=sink_settings.app_id,
                     MESSENGER_STREAMS_HISTORY_DSN=raced,
                     MESSENGER_STREAMS_HISTORY_BATCH_SIZE="10",
                     MESSENGER_STREAMS_LOG_LEVEL="warn")
    exe = str(ROOT / ".venv" / "bin" / "messenger-streams")
    log = open(tmp_path / "sink.log", "ab")  # noqa: SIM115 - handed to the children
    procs: list[subprocess.Popen[bytes]] = []
    try:
        first = subprocess.Popen([exe, "history", "sink", "--group", "killed"], env=env, stdout=log, stderr=log)
        procs.append(first)
        await wait_for(lambda: counts(raced)["messages"] > 20, 120, "the first sink to write some rows", poll=0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        assert counts(raced) != {t: len(r) for t, r in expected.items()}  # killed mid-stream
        # the killed sink comes back, and a second sink of another group writes the same records at once
        for group in ("killed", "racer"):
            procs.append(subprocess.Popen([exe, "history", "sink", "--group", group], env=env, stdout=log,
                                          stderr=log))
        await wait_for(lambda: dump(raced) == expected, 180, "the sinks to catch up")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
    assert all(p.returncode in (0, -signal.SIGKILL) for p in procs), (tmp_path / "sink.log").read_text()[-3000:]
    assert dump(raced) == expected

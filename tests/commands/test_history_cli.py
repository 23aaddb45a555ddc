"""`messenger-streams history export|forget|migrate|retain` as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import uuid
from typing import Any

import pytest

from streams.history.store import SCHEMA_VERSION, HistoryStore
from streams.rules.history import Batch, Src
from tests.historysamples import conversation_records
from tests.kafkatools import ROOT, KafkaIO
from tests.pgtools import all_text

EXE = str(ROOT / ".venv" / "bin" / "messenger-streams")
RECORDS = conversation_records(12, seed=31)
START = RECORDS[0].value["timestamp"]


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_")}
    return subprocess.run([EXE, "history", *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture
async def filled(history_dsn: str) -> str:
    async with HistoryStore(history_dsn) as store:
        batch = Batch()
        for n, rec in enumerate(RECORDS):
            kind: Any = "skill" if rec.kind.startswith("skill:") else rec.kind
            batch.add(kind, rec.value, Src(rec.kind, 0, n))
        await store.write(batch)
    return history_dsn


async def test_export_csv_and_jsonl(filled: str) -> None:
    window = ["--from", str(START - 1), "--to", "2030-01-01T00:00:00Z"]
    done = run("export", *window, "--format", "csv", MESSENGER_STREAMS_HISTORY_DSN=filled)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert len(rows) == 12 and rows[0]["conversation_id"] == "c-31-00000"
    assert rows[0]["opened_at"].endswith("Z") and rows[0]["skills"] == '["billing"]'
    assert "done: 12/12 conversations" in done.stderr

    only = run("export", *window, "--skill", "vip", "--skill", "support", "--format", "jsonl",
               MESSENGER_STREAMS_HISTORY_DSN=filled)
    lines = [json.loads(line) for line in only.stdout.splitlines()]
    assert only.returncode == 0 and lines and all("support" in c["skills"] for c in lines)
    assert len(lines) == sum(1 for i in range(12) if i % 2 == 1 or i % 3 == 1)

    msgs = run("export", "--from", "2026-01-01", "--to", "2030-01-01", "--messages", "--format", "jsonl",
               MESSENGER_STREAMS_HISTORY_DSN=filled)
    texts = [json.loads(line) for line in msgs.stdout.splitlines()]
    assert msgs.returncode == 0 and len(texts) == 12 * 4 + 4
    first = [m for m in texts if m["conversation_id"] == "c-31-00000"]
    assert [m["author"] for m in first] == ["consumer", "system", "agent", "external"]
    assert first[2]["read_at"] == first[2]["sent_at"] + 9_000


@pytest.mark.parametrize("args, needle", [
    (["export", "--from", "last week", "--to", "2030-01-01"], "--from"),
    (["export", "--from", "2030-01-01", "--to", "2026-01-01"], "--to"),
    (["export", "--from", "2026-01-01"], "--to"),
    (["retain", "--days", "0"], "--days"),
])
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], needle: str, history_dsn: str) -> None:
    done = run(*args, MESSENGER_STREAMS_HISTORY_DSN=history_dsn,
               MESSENGER_STREAMS_CONFIG=str(ROOT / "deploy" / "connector.example.toml"))
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 or "usage:" in done.stderr


def test_no_store_configured_and_unreachable_store() -> None:
    done = run("migrate")
    assert done.returncode == 2 and "MESSENGER_STREAMS_HISTORY_DSN" in done.stderr
    gone = run("migrate", MESSENGER_STREAMS_HISTORY_DSN="host=/nonexistent dbname=x connect_timeout=2")
    assert gone.returncode == 2 and "cannot reach the history database" in gone.stderr
    assert "Traceback" not in gone.stderr


def test_migrate_prints_the_version(history_dsn: str) -> None:
    done = run("migrate", MESSENGER_STREAMS_HISTORY_DSN=history_dsn)
    assert done.returncode == 0 and done.stdout.strip() == f"history schema at version {SCHEMA_VERSION}"


@pytest.mark.kafka
async def test_forget_says_what_it_erased_and_asks_the_processor(
    filled: str, kafka: KafkaIO, kafka_bootstrap: str
) -> None:
    victim = RECORDS[0].value
    prefix = f"f{uuid.uuid4().hex[:8]}."
    done = run("forget", "--page", victim["page_id"], "--psid", victim["psid"], MESSENGER_STREAMS_HISTORY_DSN=filled,
               KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, MESSENGER_STREAMS_TOPIC_PREFIX=prefix)
    assert done.returncode == 0, done.stderr
    assert "erased from the history store: 1 conversations (c-31-00000), 4 messages" in done.stdout
    assert f"to {prefix}agent.actions" in done.stdout
    actions = await kafka.read_json(prefix + "agent.actions", min_count=1)
    assert [(a["type"], a["page_id"], a["psid"], a["role"]) for a in actions] == [
        ("forget", victim["page_id"], victim["psid"], "admin")]
    assert victim["psid"] not in all_text(filled)
    again = run("forget", "--page", victim["page_id"], "--psid", victim["psid"], "--json",
                MESSENGER_STREAMS_HISTORY_DSN=filled, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
                MESSENGER_STREAMS_TOPIC_PREFIX=prefix)
    assert again.returncode == 0 and json.loads(again.stdout)["erased"]["conversations"] == 0

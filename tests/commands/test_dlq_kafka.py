"""`messenger-streams dlq show|replay` on real Kafka: a fixed limit lets a dead letter through."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import orjson
import pytest

from tests.kafkatools import ROOT, KafkaIO, Worker

pytestmark = pytest.mark.kafka


def cli(w: Worker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".venv/bin/messenger-streams"), "dlq", *args], env=w.env,
                          capture_output=True, text=True, timeout=60, check=False)


async def test_show_and_replay(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    w = make_worker(MESSENGER_STREAMS_MAX_BODY_BYTES="400")
    big = orjson.dumps({"object": "page", "entry": [{"id": "p1", "time": 1, "messaging": [
        {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1, "message": {"mid": "big", "text": "x" * 500}}]}]})
    await kafka.send(w.topic("messenger.webhook.raw"), big)
    await kafka.send(w.topic("messenger.webhook.raw"), b"{broken")
    await kafka.read_all(w.topic("messenger.dlq"), min_count=2)
    shown = cli(w, "show")
    assert shown.returncode == 0, shown.stderr
    assert "body_too_large" in shown.stdout and "invalid_json" in shown.stdout and "2  dead letters" in shown.stdout

    dry = cli(w, "replay", "--reason", "body_too_large", "--dry-run")
    assert "1 records would be replayed" in dry.stdout

    # the operator raises the limit and replays: the message now gets through, once
    w.stop()
    w.env["MESSENGER_STREAMS_MAX_BODY_BYTES"] = "100000"
    w.start()
    done = cli(w, "replay", "--reason", "body_too_large")
    assert done.returncode == 0 and "replayed 1 records" in done.stdout
    shown_to_agents = await kafka.read_json(w.topic("skill.general"), min_count=1)
    assert [e["mid"] for e in shown_to_agents if e["type"] == "consumer_message"] == ["big"]
    assert cli(w, "replay", "--reason", "body_too_large").returncode == 0  # again: deduped downstream
    shown_to_agents = await kafka.read_json(w.topic("skill.general"), settle=2.0)
    assert [e["mid"] for e in shown_to_agents if e["type"] == "consumer_message"] == ["big"]
    assert w.metrics().get('messenger_duplicates_dropped_total{kind="message"}') == 1.0

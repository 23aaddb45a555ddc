"""Test helpers around a real Kafka broker: finding one, running workers, producing, consuming."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "kafka"))

import localkafka  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - no Docker engine in any form
        return False


@contextlib.contextmanager
def kafka_broker(tmp_root: Path) -> Iterator[str]:
    """A bootstrap address: $KAFKA_BOOTSTRAP_SERVERS, the project's running broker, a fresh local
    broker from Maven jars, or testcontainers. Raises RuntimeError when none can be had."""
    if bs := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield bs
        return
    default = localkafka.default_broker()
    if default.pid() is not None:
        yield default.bootstrap
        return
    if shutil.which("java") and (shutil.which("mvn") or localkafka.LIBS.is_dir()):
        port = free_port()
        ctrl = free_port()
        broker = localkafka.LocalKafka(tmp_root / "kafka", port=port, controller_port=ctrl)
        broker.up()
        try:
            yield broker.bootstrap
        finally:
            broker.down()
        return
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:8.1.0").with_kraft() as k:
            yield k.get_bootstrap_server()
        return
    raise RuntimeError("no Kafka: set KAFKA_BOOTSTRAP_SERVERS, install Java 17 + Maven, or provide Docker")


@dataclass
class Worker:
    """A `messenger-streams worker` subprocess with its own topics, group and web port."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    extra_args: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.env["MESSENGER_STREAMS_TOPIC_PREFIX"]

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.env['MESSENGER_STREAMS_WEB_PORT']}"

    def topic(self, name: str) -> str:
        return self.prefix + name

    def start(self, timeout: float = 90.0) -> None:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "messenger-streams"), "worker", *self.extra_args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.env["MESSENGER_STREAMS_DATADIR"],
        )
        deadline = time.monotonic() + timeout
        marker = f"===== start {self.starts} ====="
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            tail = text[text.rfind(marker) :]
            if "Ready" in tail and "[^Worker]" in tail:
                time.sleep(0.5)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{tail[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready within {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """One scrape of the worker's /metrics: `name{labels}` → value."""
        return scrape_metrics(self.web_url + "/metrics")

    def get_json(self, path: str) -> Any:
        import json
        import urllib.request

        with urllib.request.urlopen(self.web_url + path, timeout=10) as resp:  # noqa: S310 - local worker
            return json.loads(resp.read())


def scrape_metrics(url: str) -> dict[str, float]:
    """Prometheus text as `name{labels}` → value."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310 - a local test process
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def worker_env(bootstrap: str, tmp: Path, config_text: str, partitions: int = 2, **extra: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    cfg = tmp / "connector.toml"
    cfg.write_text(config_text)
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_") and k != "KAFKA_BOOTSTRAP_SERVERS"
    }
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "MESSENGER_STREAMS_CONFIG": str(cfg),
            "MESSENGER_STREAMS_TOPIC_PREFIX": f"t{tag}.",
            "MESSENGER_STREAMS_APP_ID": f"ms-test-{tag}",
            "MESSENGER_STREAMS_PARTITIONS": str(partitions),
            "MESSENGER_STREAMS_WEB_PORT": str(free_port()),
            "MESSENGER_STREAMS_WEB_HOST": "127.0.0.1",
            "MESSENGER_STREAMS_DATADIR": str(data),
            "MESSENGER_STREAMS_LOG_LEVEL": "info",
            "MESSENGER_STREAMS_TICK_INTERVAL_SECONDS": "0.5",
            "MESSENGER_STREAMS_COMMIT_INTERVAL_SECONDS": "0.5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def delete_worker_topics(bootstrap: str, workers: list[Worker]) -> None:
    """Delete every topic of these test workers: their topic prefix and their app id's internal topics."""
    from aiokafka.admin import AIOKafkaAdminClient

    prefixes = tuple(
        p for w in workers for p in (w.env.get("MESSENGER_STREAMS_TOPIC_PREFIX"), f"{w.env.get('MESSENGER_STREAMS_APP_ID')}-")
        if p and p != "None-"
    )
    if not prefixes:
        return

    async def delete() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            names = [t for t in await admin.list_topics() if t.startswith(prefixes)]
            if names:
                await admin.delete_topics(names, timeout_ms=10_000)
        finally:
            await admin.close()

    with contextlib.suppress(Exception):  # cleanup only: a broker already gone is fine
        asyncio.run(delete())


class KafkaIO:
    """Produce to and read from topics of one broker (no consumer group: reads from the start)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._producer: AIOKafkaProducer | None = None

    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2)
            await self._producer.start()
        return self._producer

    async def create_topic(self, prefix: str, partitions: int) -> str:
        """A new topic named `<prefix>-<random>` with `partitions` partitions; returns its name."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        finally:
            await admin.close()
        return topic

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def send(
        self,
        topic: str,
        value: bytes | dict[str, Any],
        key: bytes | str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        p = await self.producer()
        raw = value if isinstance(value, bytes) else orjson.dumps(value)
        k = key.encode() if isinstance(key, str) else key
        await p.send_and_wait(topic, raw, key=k, headers=headers or [], partition=partition)

    async def read_all(self, topic: str, *, settle: float = 1.0, timeout: float = 30.0, min_count: int = 0) -> list[Any]:
        """Every record of `topic` from the beginning, waiting until at least `min_count` arrived
        and nothing new came for `settle` seconds (or `timeout`)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        records: list[Any] = []
        try:
            deadline = time.monotonic() + timeout
            parts: set[int] | None = None
            while parts is None and time.monotonic() < deadline:
                parts = consumer.partitions_for_topic(topic)
                if not parts:
                    await consumer._client.force_metadata_update()  # noqa: SLF001
                    parts = consumer.partitions_for_topic(topic) or None
                    if parts is None:
                        await asyncio.sleep(0.3)
            if not parts:
                return records
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            last_new = time.monotonic()
            while time.monotonic() < deadline:
                batch = await consumer.getmany(*tps, timeout_ms=200)
                got = [r for recs in batch.values() for r in recs]
                if got:
                    records.extend(got)
                    last_new = time.monotonic()
                elif len(records) >= min_count and time.monotonic() - last_new >= settle:
                    break
        finally:
            await consumer.stop()
        records.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
        return records

    async def read_json(self, topic: str, **kw: Any) -> list[dict[str, Any]]:
        return [orjson.loads(r.value) for r in await self.read_all(topic, **kw)]


def envelope(item: dict[str, Any], page_id: str = "PAGE_ID") -> dict[str, Any]:
    """Wrap a single messaging item (as samples 07 and 21 are) into a webhook body."""
    return {"object": "page", "entry": [{"id": page_id, "time": item.get("timestamp", 0), "messaging": [item]}]}

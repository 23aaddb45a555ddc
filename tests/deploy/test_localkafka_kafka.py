"""The local broker keeps its data across `down`/`up` and loses it on `reset`; and the worker,
`webhook` and `dispatch` stop within 10 s when the broker is gone. On a broker of this test's own
(other ports, a temporary home): the shared one is never stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from tests.conftest import BASE_CONFIG
from tests.kafkatools import ROOT, free_port, worker_env

sys.path.insert(0, str(ROOT / "deploy" / "kafka"))
import localkafka  # noqa: E402

pytestmark = pytest.mark.kafka

STOP_PROMISE = 10.0
CLI = str(ROOT / ".venv" / "bin" / "messenger-streams")


def localkafka_cli(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "kafka" / "localkafka.py"), command], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


async def write_and_commit(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i}".encode(), partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="keeper", enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(3, "")})
    finally:
        await consumer.stop()


async def read_back(bootstrap: str, topic: str, timeout: float = 60.0) -> tuple[int, int | None]:
    """(end offset of partition 0, the group's committed offset). A broker just started may not
    serve the group's offsets yet (its coordinator loads `__consumer_offsets` first; aiokafka then
    says None): asked again until it does, or until `timeout`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="keeper", enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        ends = await consumer.end_offsets([tp])
        deadline = time.monotonic() + timeout
        committed = await consumer.committed(tp)
        while committed is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            committed = await consumer.committed(tp)
        return ends[tp], committed
    finally:
        await consumer.stop()


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - a local test process
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready within {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_unsplittable_kafka_opts_is_one_line_and_status_2(tmp_path: Path) -> None:
    env = {**os.environ, "KAFKA_HOME": str(tmp_path / "kafka"), "KAFKA_PORT": str(free_port()),
           "KAFKA_OPTS": '-Xlog:gc:file="/tmp/gc.log'}
    res = localkafka_cli("up", env)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: KAFKA_OPTS cannot be split into JVM options (No closing quotation): '-Xlog:gc:file=\"/tmp/gc.log'"]
    assert not (tmp_path / "kafka").exists()  # nothing started


def test_down_keeps_data_reset_deletes_it_and_everything_stops_with_the_broker_gone(tmp_path: Path) -> None:
    port, ctrl = free_port(), free_port()
    home = tmp_path / "kafka"
    gc_log = tmp_path / "gc.log"
    env = {**os.environ, "KAFKA_HOME": str(home), "KAFKA_PORT": str(port), "KAFKA_CONTROLLER_PORT": str(ctrl),
           "KAFKA_OPTS": f"-Xlog:gc:file={gc_log} -Xmx640m"}
    bootstrap = f"127.0.0.1:{port}"
    broker = localkafka.LocalKafka(home, port=port, controller_port=ctrl)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        res = localkafka_cli("up", env)
        assert res.returncode == 0, res.stderr
        assert "auto.create.topics.enable=false" in (home / "server.properties").read_text()
        # $KAFKA_OPTS reaches the JVM, after the defaults (so its -Xmx is the one that counts)
        assert "Using G1" in gc_log.read_text()
        cmdline = Path(f"/proc/{broker.pid()}/cmdline").read_bytes().split(b"\0")
        assert cmdline.index(b"-Xmx640m") > cmdline.index(b"-Xmx768m")
        asyncio.run(write_and_commit(bootstrap, "keep.me"))

        # worker, webhook and dispatch on this broker
        wenv = worker_env(bootstrap, tmp_path, BASE_CONFIG)
        wenv.update({
            "MESSENGER_STREAMS_APP_SECRET": "s3cret", "MESSENGER_STREAMS_VERIFY_TOKEN": "t0ken",
            "MESSENGER_STREAMS_WEBHOOK_PORT": str(free_port()), "MESSENGER_STREAMS_DISPATCH_WEB_PORT": str(free_port()),
            "MESSENGER_STREAMS_PAGE_TOKENS": '{"1691462197845448": "page-token"}',
            "MESSENGER_STREAMS_GRAPH_URL": f"http://127.0.0.1:{free_port()}",
        })
        logs = {name: tmp_path / f"{name}.log" for name in ("worker", "webhook", "dispatch")}
        for name, log in logs.items():
            procs[name] = subprocess.Popen([CLI, name], env=wenv, stdout=open(log, "wb"),  # noqa: SIM115
                                           stderr=subprocess.STDOUT, cwd=wenv["MESSENGER_STREAMS_DATADIR"])
        wait_http(f"http://127.0.0.1:{wenv['MESSENGER_STREAMS_WEB_PORT']}/metrics", procs["worker"], logs["worker"])
        wait_http(f"http://127.0.0.1:{wenv['MESSENGER_STREAMS_WEBHOOK_PORT']}/healthz", procs["webhook"], logs["webhook"])
        wait_http(f"http://127.0.0.1:{wenv['MESSENGER_STREAMS_DISPATCH_WEB_PORT']}/healthz", procs["dispatch"],
                  logs["dispatch"])

        # the broker goes away (a clean stop that keeps the data)
        down = time.monotonic()
        res = localkafka_cli("down", env)
        assert res.returncode == 0 and "data kept" in res.stdout, res.stderr
        print(f"kafka down (clean shutdown) took {time.monotonic() - down:.1f}s")
        assert broker.pid() is None and (home / "data" / "meta.properties").exists()

        # ... and every process still stops within the promise
        start = time.monotonic()
        for name, sig in (("worker", signal.SIGTERM), ("webhook", signal.SIGINT), ("dispatch", signal.SIGTERM)):
            procs[name].send_signal(sig)
        for name, proc in procs.items():
            left = STOP_PROMISE - (time.monotonic() - start)
            try:
                proc.wait(max(left, 0.1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still running {STOP_PROMISE}s after the signal, broker gone:\n"
                            f"{logs[name].read_text()[-2000:]}")
            print(f"{name} stopped {time.monotonic() - start:.1f}s after the signal (broker gone), "
                  f"status {proc.returncode}")

        # up again: the same topics, records and committed offsets
        res = localkafka_cli("up", env)
        assert res.returncode == 0, res.stderr
        assert asyncio.run(read_back(bootstrap, "keep.me")) == (5, 3)

        res = localkafka_cli("reset", env)
        assert res.returncode == 0, res.stderr
        assert not home.exists() and broker.pid() is None
        res = localkafka_cli("down", env)  # idempotent
        assert res.returncode == 0 and "not running" in res.stdout
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        broker.reset()

"""The worker process on a real broker: every topic before Faust starts, a crash stops the worker
with a non-zero status, and SIGINT/SIGTERM stop it within 10 s while starting and while running."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import BASE_CONFIG
from tests.kafkatools import ROOT, KafkaIO, Worker

pytestmark = pytest.mark.kafka

STOP_PROMISE = 10.0  # seconds from a signal to the process' end


async def partition_counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        metas = await admin.describe_topics(sorted(set(names) & existing))
        return {m["topic"]: len(m["partitions"]) for m in metas}
    finally:
        await admin.close()


def wait_for_log(worker: Worker, proc: subprocess.Popen[bytes], needle: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in worker.log_text():
        assert proc.poll() is None, f"exited {proc.returncode}:\n{worker.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout}s:\n{worker.log_text()[-3000:]}"
        time.sleep(0.1)


def spawn(worker: Worker, *args: str) -> subprocess.Popen[bytes]:
    log = open(worker.log_path, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(list(args), env=worker.env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=worker.env["MESSENGER_STREAMS_DATADIR"])


def crash_worker(worker: Worker, kind: str) -> subprocess.Popen[bytes]:
    env = worker.env
    env["PYTHONPATH"] = str(ROOT)
    return spawn(worker, sys.executable, "-m", "tests.stages.crashworker", kind)


def stopped_within(proc: subprocess.Popen[bytes], sig: int, timeout: float = STOP_PROMISE) -> tuple[int, float]:
    start = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running {timeout}s after signal {sig}")
    return code, time.monotonic() - start


async def test_fresh_app_id_has_every_topic_before_faust_starts(
    make_worker: Callable[..., Worker], kafka_bootstrap: str
) -> None:
    w = make_worker(partitions=3)
    app_id = w.env["MESSENGER_STREAMS_APP_ID"]
    changelogs = [f"{app_id}-conversations-changelog", f"{app_id}-csat_cells-changelog"]
    contract = [w.topic(n) for n in ("messenger.webhook.raw", "csat.facts", "agent.actions", "skill.billing")]
    counts = await partition_counts(kafka_bootstrap, changelogs + contract)
    assert counts == dict.fromkeys(changelogs + contract, 3)
    # Traffic through every stage, the CSAT table included: no agent meets a topic it does not know.
    env = dict(w.env)
    res = await asyncio.to_thread(
        subprocess.run, [str(ROOT / ".venv/bin/messenger-streams"), "simulate", "--rate", "200", "--count", "800",
                         "--consumers", "10"], env=env, capture_output=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = await asyncio.to_thread(w.metrics)
        if sum(v for k, v in m.items() if k.startswith("messenger_csat_answers_total")) > 0:
            break
        await asyncio.sleep(0.5)
    else:
        pytest.fail("no CSAT answer counted within 120 s")
    log = w.log_text()
    assert "Ignoring missing topic" not in log and "PartitionsMismatch" not in log and "Crashed" not in log
    # start-up's heap frozen out of the collector (supervision.settle_heap), before "Ready": its full
    # collection does not hold up the first records
    assert "heap settled:" in log and log.index("heap settled:") < log.index("[^Worker]: Ready")
    assert w.proc is not None and w.proc.poll() is None


async def start_on_a_topic_of(w: Worker, bootstrap: str, topic: str, partitions: int) -> subprocess.CompletedProcess[str]:
    """Create `topic` with `partitions` partitions, then run the worker command (it should refuse)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(w.topic(topic), partitions, 1)])
    finally:
        await admin.close()
    return await asyncio.to_thread(subprocess.run, [str(ROOT / ".venv/bin/messenger-streams"), "worker"], env=w.env,
                                   capture_output=True, text=True, timeout=120, check=False)


async def test_a_topic_with_another_partition_count_is_refused(
    make_worker: Callable[..., Worker], kafka_bootstrap: str
) -> None:
    w = make_worker(partitions=2, start=False)
    res = await start_on_a_topic_of(w, kafka_bootstrap, "csat.facts", 1)
    assert res.returncode == 2
    assert res.stderr == (f"messenger-streams: error: topic {w.topic('csat.facts')} has 1 partitions, the processor "
                          "needs 2 (MESSENGER_STREAMS_PARTITIONS): delete the topic or set "
                          "MESSENGER_STREAMS_PARTITIONS=1\n")


async def test_one_hop_refuses_a_raw_topic_with_another_partition_count(
    make_worker: Callable[..., Worker], kafka_bootstrap: str
) -> None:
    """The raw topic belongs to the ingester, and with two hops any count will do (the suite's
    two-hop runs use raw topics they create as they like); one hop needs raw partition p assigned
    with the table's partition p, so the worker says what to do instead."""
    w = make_worker(partitions=2, start=False)
    res = await start_on_a_topic_of(w, kafka_bootstrap, "messenger.webhook.raw", 3)
    assert res.returncode == 2
    assert res.stderr == (f"messenger-streams: error: topic {w.topic('messenger.webhook.raw')} has 3 partitions, the "
                          "processor needs 2 (MESSENGER_STREAMS_PARTITIONS): give it 2 partitions, or set "
                          "MESSENGER_STREAMS_ONE_HOP=false (every body then goes through messenger.events.split)\n")
    w.env["MESSENGER_STREAMS_ONE_HOP"] = "false"
    w.start()  # two hops: the same topic will do


@pytest.mark.parametrize(("kind", "line"), [
    ("agent", "[CRITICAL] agent explode crashed: Boom: cannot handle b'bad record'; stopping the worker (exit status 1)"),
    ("timer", "[CRITICAL] worker crashed: Boom: timer gave up; stopping the worker (exit status 1)"),
])
async def test_a_crash_stops_the_worker_with_status_1(
    make_worker: Callable[..., Worker], kafka: KafkaIO, kind: str, line: str
) -> None:
    w = make_worker(start=False)
    proc = crash_worker(w, kind)
    try:
        await asyncio.to_thread(wait_for_log, w, proc, "[^Worker]: Ready")
        await kafka.send(w.topic("crash.me"), b"bad record")
        sent = time.monotonic()
        code = await asyncio.to_thread(proc.wait, 60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 1
    assert took < 30  # "within a few seconds" (1-3 s measured), generous for a loaded machine
    assert w.log_text().count(line) == 1, w.log_text()[-3000:]


async def test_a_blocked_event_loop_still_stops_within_10_s(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    """The last resort: the loop is stuck in a synchronous call, Faust never hears SIGTERM; the
    deadline armed from the signal handler ends the process with status 1 and one line."""
    w = make_worker(start=False)
    proc = crash_worker(w, "block")
    try:
        await asyncio.to_thread(wait_for_log, w, proc, "[^Worker]: Ready")
        await kafka.send(w.topic("crash.me"), b"stuck")
        await asyncio.to_thread(wait_for_log, w, proc, "blocking the event loop")
        code, took = await asyncio.to_thread(stopped_within, proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 1 and 7.5 < took < STOP_PROMISE
    assert w.log_text().count("messenger-streams: did not stop within 8s after SIGTERM (worker); exiting now\n") == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_the_worker_while_starting(make_worker: Callable[..., Worker], sig: int) -> None:
    w = make_worker(start=False)
    proc = spawn(w, str(ROOT / ".venv/bin/messenger-streams"), "worker")
    try:
        await asyncio.to_thread(wait_for_log, w, proc, "[^Worker]: Starting...")  # Faust is starting (Ready: ~1-2 s on)
        code, took = await asyncio.to_thread(stopped_within, proc, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < STOP_PROMISE
    assert code in (0, 1), w.log_text()[-2000:]  # 1 only when the deadline had to end it


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_the_running_worker(make_worker: Callable[..., Worker], sig: int) -> None:
    w = make_worker(config=BASE_CONFIG)
    assert w.proc is not None
    code, took = await asyncio.to_thread(stopped_within, w.proc, sig)
    assert code == 0 and took < STOP_PROMISE

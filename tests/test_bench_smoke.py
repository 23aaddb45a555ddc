"""The benchmark harness end to end in smoke mode: every arm runs on the test broker and reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kafka


def run_bench(kafka_bootstrap: str, out: Path, *args: str) -> dict[str, Any]:
    """`python -m bench.run ARGS --results-dir OUT` on the test broker (without the caller's
    MESSENGER_STREAMS_* settings); its latest.json."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_")}
    env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap
    proc = subprocess.run([sys.executable, "-m", "bench.run", *args, "--results-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res: dict[str, Any] = orjson.loads((out / "latest.json").read_bytes())
    return res


def test_bench_smoke(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    res = run_bench(kafka_bootstrap, out, "--smoke")
    files = sorted(p.name for p in out.iterdir())
    assert "latest.json" in files and len(files) == 2, files

    assert res["mode"] == "smoke" and res["errors"] == []
    assert res["settings"]["arrival_topics"] and res["settings"]["input_topics"][0] == "raw"
    assert res["dataset"]["records"] >= 100
    thr = res["throughput"]
    for arm in ("A", "Ak", "B", "C"):
        s = thr[arm]
        assert len(s["rounds"]) == 1
        assert s["median_eps"] > 0
        assert s["peak_rss_mib"] > 0
        r = s["rounds"][0]
        assert r["processed"] > 0 and r["seconds"] > 0
    assert thr["ratio_C_A"] > 0 and thr["ratio_C_Ak"] > 0 and thr["ratio_B_A"] > 0 and thr["ratio_C_B"] > 0
    assert thr["fanout_k"] == 3
    # every arm counts its own output only: A writes one record per input, A×3 three
    (a,), (ak,) = thr["A"]["rounds"], thr["Ak"]["rounds"]
    assert sum(a["records_written"].values()) == a["input_records"]
    assert sum(ak["records_written"].values()) == 3 * ak["input_records"]
    for entry in res["latency"]:
        for arm in ("A", "B", "C"):  # B: faust's floor under the same live load
            assert entry[arm]["measured"] > 0
            assert entry[arm]["cpu_cores"] > 0
            assert entry[arm]["other_cpu_cores"]["generator"] > 0 and entry[arm]["other_cpu_cores"]["harness"] > 0
            assert set(entry[arm]["latency_ms"]) >= {"p50", "p90", "p99", "p99_9"}
    # nothing written to the repository's results folder
    assert not (ROOT / "bench" / "results" / f"latest-{res['run_id']}.json").exists()


def test_bench_live_two_workers(kafka_bootstrap: str, tmp_path: Path) -> None:
    """`--live-rate R --live-arm C2`: two workers of one group share an open-loop load; both
    decide units, and every id that never reached a console is a CSAT answer."""
    res = run_bench(kafka_bootstrap, tmp_path / "results", "--live-rate", "80", "--live-arm", "C2",
                    "--lat-warmup", "1", "--lat-seconds", "6")
    assert res["mode"] == "live" and res["errors"] == []
    (entry,) = res["latency"]
    r = entry["C2"]
    assert r["arm"] == "C2" and r["sent"] == 80 * 7 and r["measured"] > 0
    workers = r["processes"]
    assert len(workers) == 2
    assert all(w["units_flushed"] > 0 and w["cpu_cores"] > 0 for w in workers), workers
    assert set(r["never_arrived_by_kind"]) <= {"csat_digit"}
    assert r["never_arrived_by_kind"].get("csat_digit", 0) == r["csat_responses_written"]


def test_deleted_topics_leave_the_local_broker_before_the_next_phase(kafka_bootstrap: str) -> None:
    """The bench's tidying waits until the local broker has unlinked a deleted topic's files, so that
    it does not do so during the next measurement (docs/benchmarks.md, stop 33)."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    from bench.common import create_topics, delete_topics, local_data_dir

    data = local_data_dir(kafka_bootstrap)
    if data is None:
        pytest.skip("not the project's local broker: its files are not ours to watch")
    prefix = f"tidy{os.getpid()}."

    async def fill_and_delete() -> None:
        await create_topics(kafka_bootstrap, {f"{prefix}t": False}, 4)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(200):
                await producer.send(f"{prefix}t", b"x" * 1000, partition=i % 4)
            await producer.flush()
        finally:
            await producer.stop()
        assert sum(1 for p in data.iterdir() if p.name.startswith(prefix)) == 4
        await delete_topics(kafka_bootstrap, prefix)

    asyncio.run(fill_and_delete())
    assert [p.name for p in data.iterdir() if p.name.startswith(prefix)] == []

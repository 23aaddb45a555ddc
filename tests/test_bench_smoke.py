"""The benchmark harness end to end in smoke mode: every arm runs on the test broker and reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kafka


def test_bench_smoke(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_")}
    env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--results-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert "latest.json" in files and len(files) == 2, files
    res = orjson.loads((out / "latest.json").read_bytes())

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

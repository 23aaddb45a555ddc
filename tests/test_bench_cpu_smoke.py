"""`python -m bench.cpu` (our CPU per input record, without Kafka) at smoke size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import cpu

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_bench_runs_the_worker_stage_on_bench_traffic() -> None:
    res = cpu.run(cpu.DEFAULT_CONFIG, events=400, partitions=8, batch=50, profile=25)
    assert res["records"] == 400 and res["us_per_record"] > 0
    writes = res["writes"]
    # the records really went through the stage: state written, console events on the skill topics
    assert writes["conversations-changelog"] >= 200
    assert sum(n for t, n in writes.items() if ".skill." in f".{t}") >= 200
    assert writes.get("messenger.dlq", 0) <= 4  # 0.1% invalid bodies, 2% redelivered (deduplicated)
    # the profile is of the stage's own work (the rules' decide is among its 25 costliest functions;
    # its rank among the first few moves with the machine's noise in a 0.2 s profile)
    assert "decide" in res["profile"] and "streams/rules/" in res["profile"]


def test_cpu_bench_refuses_bad_arguments_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.cpu", "--events", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("--events, --batch and --partitions must be at least 1")

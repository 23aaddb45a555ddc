"""The history benchmark in smoke mode (no Kafka arm): it runs and reports rates and sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def test_history_bench_smoke(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_")}
    proc = subprocess.run([sys.executable, "-m", "bench.history", "--smoke", "--no-kafka", "--results-dir",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = orjson.loads((tmp_path / "history-latest.json").read_bytes())
    assert result["records"] > 2000 and result["messages"] == result["size"]["messages"]["rows"]
    assert result["store"]["messages_per_s"] > 0 and result["reads"]["search_q_ms_p50"] > 0

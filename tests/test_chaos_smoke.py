"""The chaos suite at smoke size inside `make test`: scenarios d (fuzzed bodies) and e (dispatcher
SIGKILLed mid-batch) on the test broker, in one harness run (about a minute on an idle machine).

`test_chaos_smoke_harness` checks the harness itself did what it claims (traffic ran to its end,
the dispatcher kill was mid-batch, every fuzz family was sent and audited); the goal tests hold each
scenario to every goal of the full suite. Select with `-m chaos`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent

# one process runs the whole module under pytest-xdist (`--dist loadgroup`): its report is made once
pytestmark = [pytest.mark.kafka, pytest.mark.chaos, pytest.mark.xdist_group("chaos_smoke")]

SCENARIOS = ("d", "e")


@pytest.fixture(scope="module")
def chaos_report(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("chaos")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_")}
    proc = subprocess.run(
        [sys.executable, "-m", "chaos.run", "--size", "smoke", "--scenarios", ",".join(SCENARIOS),
         "--bootstrap", kafka_bootstrap, "--results-dir", str(out), "--seed", "12",
         # no 60 s failover in d or e: a stuck step or partition is a finding after 60 s, not 150
         "--step-timeout", "60", "--recovery-timeout", "60"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    report: dict[str, Any] = dict(orjson.loads((out / "latest.json").read_bytes()))
    report["_stdout"] = proc.stdout[-4000:]
    return report


def _run(report: dict[str, Any], letter: str) -> dict[str, Any]:
    runs: list[dict[str, Any]] = [r for r in report["runs"] if r["scenario"] == letter]
    assert len(runs) == 1, report["_stdout"]
    return runs[0]


def test_chaos_smoke_harness(chaos_report: dict[str, Any]) -> None:
    assert chaos_report["errors"] == [], chaos_report["_stdout"]
    for letter in SCENARIOS:
        r = _run(chaos_report, letter)
        assert r["errors"] == [], r["errors"]
        tr = r["traffic"]
        assert tr["conversations"] >= 24 and tr["consumer_messages_sent"] >= 48
        assert tr["csat_answers_given"] > 0 and r["csat"]["answers_given"] == tr["csat_answers_given"]
        assert r["consumer_messages"]["sent"] == tr["consumer_messages_sent"]
        assert r["graph"]["graph_requests"] > 0 and r["graph"]["message_outbox_ids"] > 0
    d = _run(chaos_report, "d")
    dl = d["dead_letters"]
    assert d["fuzz"]["bodies_written"] == dl["fuzz_bodies"] == 300
    assert set(dl["families"]) == {"truncated_json", "wrong_types", "invalid_utf8", "unknown_kinds", "long_text",
                                   "big_body", "wide_entry"}
    assert dl["accounted"] + dl["unaccounted"] == 300
    assert dl["by_reason"].get("ingest:invalid_json", 0) > 0 and dl["by_reason"].get("ingest:invalid_item", 0) > 0
    e = _run(chaos_report, "e")
    (fault,) = e["recovery"]
    assert fault["mid_stream"]["ok"] and fault["mid_stream"]["graph_in_flight"] > 0, fault
    assert e["processes"]["dispatch"]["starts"] == 2


GOALS = [pytest.param("d"), pytest.param("e")]


@pytest.mark.parametrize("letter", GOALS)
def test_chaos_smoke_goals(chaos_report: dict[str, Any], letter: str) -> None:
    r = _run(chaos_report, letter)
    assert r["goals"]["met"], f"goals not met: {r['goals']['failed']}: " + str(
        {k: c["value"] for k, c in r["goals"]["checks"].items() if not c["met"]})

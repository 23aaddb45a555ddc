"""The chaos suite: `python -m chaos.run` (or `make chaos CHAOS_ARGS="..."`).

    python -m chaos.run                          # every scenario once, full size, own broker
    python -m chaos.run --runs 10                # ten runs in a row
    python -m chaos.run --scenarios a,c --size ci
    python -m chaos.run --size smoke --bootstrap 127.0.0.1:9092 --scenarios d,e

Scenarios (chaos/scenarios.py): a worker SIGKILLs, b broker restart, c two-worker failover,
d fuzzed bodies, e dispatcher SIGKILLs. Sizes: smoke (a make-test run), ci, full (the issue's).
The suite starts its own Kafka broker on free ports with its data in a temp dir (it restarts it);
`--bootstrap` runs a, c, d, e on an existing broker instead (fresh prefixed topics, deleted after),
b always on its own. Writes chaos/results/<stamp>-<size>-<run_id>.json and latest.json; exits 0
when every goal of every run is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from chaos.procs import ROOT, Broker
from chaos.scenarios import TITLES, Options, ScenarioRun

RESULTS = ROOT / "chaos" / "results"

SIZES: dict[str, dict[str, Any]] = {
    # conversations, their start rate (per s), fuzzed bodies, kills in a and e
    "smoke": {"conversations": 24, "rate": 2.0, "fuzz_bodies": 300, "kills": 1},
    "ci": {"conversations": 120, "rate": 2.0, "fuzz_bodies": 2_000, "kills": 3},
    "full": {"conversations": 300, "rate": 3.0, "fuzz_bodies": 10_000, "kills": 3},
}


def parse_args(argv: Sequence[str] | None) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e (default all)")
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="smoke, ci or full (default full)")
    p.add_argument("--runs", type=int, default=1, help="runs of every scenario (default 1)")
    p.add_argument("--seed", type=int, default=None, help="traffic and fault seed (default: random, reported)")
    p.add_argument("--conversations", type=int, default=None, help="scripted conversations per run")
    p.add_argument("--rate", type=float, default=None, help="conversations started per second")
    p.add_argument("--fuzz-bodies", type=int, default=None, help="fuzzed bodies in scenario d")
    p.add_argument("--kills", type=int, default=None, help="SIGKILLs in scenarios a and e")
    p.add_argument("--partitions", type=int, default=4, help="partitions of every topic (default 4)")
    p.add_argument("--step-timeout", type=float, default=150.0,
                   help="seconds a conversation waits for one step's effect before it counts as stalled")
    p.add_argument("--recovery-timeout", type=float, default=150.0,
                   help="seconds to wait for every partition to be processed again after a fault")
    p.add_argument("--graph-delay", type=float, default=0.05, help="fake Graph API answer delay in s (default 0.05)")
    p.add_argument("--broker-signal", choices=("term", "kill"), default="term",
                   help="how scenario b stops the broker (default term: a clean restart)")
    p.add_argument("--bootstrap", default=None,
                   help="run a, c, d, e on this existing broker (b always gets the suite's own)")
    p.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the workers (e.g. a session timeout setting)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON report goes")
    p.add_argument("--keep-topics", action="store_true", help="do not delete the scenario topics")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the process logs of every run in <results-dir>/logs/ (default: of failed runs only)")
    a = p.parse_args(argv)
    letters = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    bad = [s for s in letters if s not in TITLES]
    if bad or not letters:
        p.error(f"--scenarios takes letters among a,b,c,d,e, got {a.scenarios!r}")
    if a.runs < 1:
        p.error("--runs must be >= 1")
    for kv in a.worker_env:
        if "=" not in kv:
            p.error(f"--worker-env takes KEY=VALUE, got {kv!r}")
    size = SIZES[a.size]
    a.scenarios = letters
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(3), "big")
    opts = Options(
        size=a.size,
        conversations=a.conversations or size["conversations"],
        rate=a.rate or size["rate"],
        fuzz_bodies=a.fuzz_bodies or size["fuzz_bodies"],
        kills=a.kills or size["kills"],
        partitions=a.partitions,
        seed=seed,
        step_timeout=a.step_timeout,
        recovery_timeout=a.recovery_timeout,
        graph_delay=a.graph_delay,
        broker_signal=a.broker_signal,
        keep_topics=a.keep_topics,
        keep_logs=a.keep_logs,
        worker_env=dict(kv.split("=", 1) for kv in a.worker_env),
    )
    return opts, a


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("faust-streaming", "aiokafka", "messenger-streams"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def summarize(runs: list[dict[str, Any]], letters: list[str]) -> dict[str, Any]:
    """Per scenario over all runs: the worst figure of each goal and how many runs met every goal."""
    out: dict[str, Any] = {}
    for letter in letters:
        mine = [r for r in runs if r.get("scenario") == letter]
        if not mine:
            continue
        worst: dict[str, Any] = {}
        for r in mine:
            for name, c in r.get("goals", {}).get("checks", {}).items():
                v = c["value"]
                prev = worst.get(name, "unset")
                if isinstance(v, bool):
                    worst[name] = v if prev == "unset" else (prev and v)
                elif v is None or prev is None:
                    worst[name] = None
                else:
                    worst[name] = v if prev == "unset" else max(prev, v)
        out[letter] = {
            "title": TITLES[letter],
            "runs": len(mine),
            "runs_meeting_all_goals": sum(1 for r in mine if r.get("goals", {}).get("met")),
            "worst": worst,
            "recovery_s": [f.get("recovery_s") for r in mine for f in r.get("recovery", [])],
            "dead_letters_by_reason": _sum_counts(r.get("dead_letters", {}).get("by_reason", {}) for r in mine),
        }
    return out


def _sum_counts(dicts: Any) -> dict[str, int]:
    acc: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            acc[k] = acc.get(k, 0) + int(v)
    return dict(sorted(acc.items()))


async def run(opts: Options, letters: list[str], runs: int, bootstrap: str | None,
              logs_dir: Path | None = None) -> dict[str, Any]:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    run_id = uuid.uuid4().hex[:6]
    started = dt.datetime.now(dt.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="ms-chaos-"))
    result: dict[str, Any] = {
        "schema": 1,
        "run_id": run_id,
        "started_at": started.isoformat(timespec="seconds"),
        "size": opts.size,
        "scenarios": letters,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                 "load_at_start": list(os.getloadavg())},
        "git": _git(),
        "versions": _versions(),
        "settings": {k: v for k, v in vars(opts).items()},
        "goals": {"consumer_messages_lost": 0, "csat_double_counted": 0, "csat_missing": 0,
                  "outbox_ids_sent_more_than_once": 0, "bad_bodies_unaccounted": 0, "recovery_seconds": 15,
                  "conversations_stalled": 0},
        "runs": [],
        "errors": [],
    }
    own: Broker | None = None
    print(f"[chaos] run {run_id}: scenarios {','.join(letters)} × {runs}, size {opts.size}, seed {opts.seed}, "
          f"workdir {workdir}", flush=True)
    try:
        if bootstrap is None or "b" in letters:
            own = Broker(workdir / "kafka")
            secs = await own.up()
            print(f"[chaos] own broker on {own.bootstrap} up in {secs:.1f}s", flush=True)
        for i in range(1, runs + 1):
            for letter in letters:
                on = own if (letter == "b" or bootstrap is None) else None
                bs = on.bootstrap if on is not None else str(bootstrap)
                sr = ScenarioRun(letter, opts, bs, on, workdir, i, run_id,
                                 logs_dir / run_id if logs_dir is not None else None)
                try:
                    result["runs"].append(await sr.run())
                except Exception as exc:  # noqa: BLE001 - one broken run is reported, the others still run
                    msg = f"scenario {letter} run {i}: {type(exc).__name__}: {exc}"
                    result["errors"].append(msg[:3000])
                    result["runs"].append({"scenario": letter, "run": i, "goals": {"met": False,
                                           "failed": ["harness error"], "checks": {}}, "errors": [msg[:3000]]})
                    print(f"[chaos] {msg[:1000]}", flush=True)
                if own is not None and own.kafka.pid() is None:
                    await own.up()  # a scenario left it down: the next one needs it
    finally:
        if own is not None:
            await own.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    result["summary"] = summarize(result["runs"], letters)
    result["all_goals_met"] = all(r.get("goals", {}).get("met") for r in result["runs"]) and not result["errors"]
    result["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return result


def table(res: dict[str, Any]) -> str:
    lines = ["", f"messenger-streams chaos {res['run_id']} ({res['size']}, seed {res['settings']['seed']}):", "",
             f"{'':3}{'scenario':<52} {'runs ok':>7} {'lost':>5} {'csat±':>6} {'dup sends':>9} "
             f"{'unacc.':>6} {'recovery s':>11} {'stalled':>7}"]
    for letter, s in res.get("summary", {}).items():
        w = s["worst"]

        def f(name: str, w: dict[str, Any] = w) -> str:
            v = w.get(name, "-")
            return "n/a" if v == "unset" else str(v)

        csat = "-" if "csat_missing" not in w else f"{w.get('csat_double_counted')}/{w.get('csat_missing')}"
        lines.append(f"{letter:<3}{s['title']:<52} {s['runs_meeting_all_goals']:>3}/{s['runs']:<3} "
                     f"{f('consumer_messages_lost'):>5} {csat:>6} {f('outbox_ids_sent_more_than_once'):>9} "
                     f"{f('bad_bodies_unaccounted'):>6} {f('recovery_seconds') if 'recovery_seconds' in w else '-':>11} "
                     f"{f('conversations_stalled'):>7}")
    lines.append("")
    lines.append("csat± = double-counted/missing answers in GET /csat (worst worker); recovery = slowest partition")
    for r in res.get("runs", []):
        g = r.get("goals", {})
        if not g.get("met"):
            lines.append(f"FAILED {r.get('scenario')} run {r.get('run')}: {', '.join(g.get('failed', []))}")
    for e in res.get("errors", []):
        lines.append(f"ERROR: {e.splitlines()[0]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    opts, a = parse_args(argv)
    t = time.monotonic()
    # SIGTERM takes Ctrl-C's path: asyncio.run cancels the run, whose teardown stops the processes and
    # the broker it started (a plain SIGTERM would leave them running).
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        res = asyncio.run(run(opts, a.scenarios, a.runs, a.bootstrap, a.results_dir / "logs"))
    except KeyboardInterrupt:
        print("[chaos] interrupted: processes and broker stopped, no report written", flush=True)
        return 130
    res["duration_s"] = round(time.monotonic() - t, 1)
    a.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stamp}-{res['size']}-{res['run_id']}.json"
    data = orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    (a.results_dir / name).write_bytes(data)
    (a.results_dir / "latest.json").write_bytes(data)
    print(table(res))
    print(f"\nreport: {a.results_dir / name} ({res['duration_s']}s)")
    return 0 if res["all_goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

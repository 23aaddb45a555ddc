"""The benchmark: `python -m bench.run` (or `make bench BENCH_ARGS="..."`).

Arms, interleaved per round on the same broker and the same pre-generated input (A Ak B C [C2] A …):
- A  — raw aiokafka passthrough (bench/passthrough.py): one output per input, same partitions,
       acks, linger, batch size and commit cadence as the worker.
- Ak — the same passthrough writing every input k times (`--fanout`, default 3): the pipeline's
       extra I/O without its work.
- B  — a faust null agent (bench/nullagent.py) on the worker's own app settings, forwarding each
       input unchanged: the framework's floor.
- C  — the real pipeline: one `messenger-streams worker` subprocess, fresh topic prefix and app id,
       raw (+ agent actions once the conversation stage exists) → skill topics (or
       `messenger.events.split` while the conversation stage is not registered).
- C2 — the same with two worker processes in one consumer group (`--scale-out`).

Throughput: each arm drains a preloaded backlog; events/s = input records / (all committed − ready),
from the group's committed offsets (polled with the admin client) against the input's end offsets.
Latency: an open-loop generator (bench/loadgen.py) at 50% and 80% of C's measured capacity; the time
from each record's intended send time to its arrival on an output topic, matched by message id.
Peak RSS (VmHWM) of every arm process. Results: bench/results/<timestamp>.json and latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    DEFAULT_CONFIG,
    MID_RE,
    ROOT,
    Dataset,
    OffsetWatch,
    broker_pid,
    create_topics,
    delete_topics,
    expected_counts,
    input_attrs,
    load_config,
    make_dataset,
    mid_kind,
    percentiles,
    preload,
    proc_cpu_seconds,
    proc_status,
    quiet_kafka_logs,
    write_records,
)

RESULTS = ROOT / "bench" / "results"
LOADGEN_LINGER_MS = 5  # the upstream ingester's linger: fixed, so the worker's setting does not change the offered load
PASSTHROUGH_TOPIC = "bench.passthrough.out"
FANOUT_TOPIC = "bench.fanout.out"
NULLAGENT_TOPIC = "bench.nullagent.out"


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here if here.exists() else ROOT / ".venv" / "bin" / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings_default(name: str) -> Any:
    from streams.core.settings import Settings

    return Settings.model_fields[name].default


@dataclass
class Opts:
    bootstrap: str
    config: Path
    events: int
    rounds: int
    partitions: int
    scale_out: bool
    latency: bool
    lat_fractions: list[float]
    lat_warmup: float
    lat_seconds: float
    results_dir: Path
    keep_topics: bool
    worker_env: dict[str, str]
    profile: str | None
    smoke: bool
    profile_format: str = "speedscope"
    max_drain: float = 300.0
    lat_rates: list[float] = field(default_factory=list)
    fanout: int = 3
    live_rate: float | None = None
    live_arm: str = "C"
    capacity: bool = False
    cap_fractions: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    cap_warmup: float = 10.0  # as the latency runs: a fresh worker's first seconds of load are not steady
    cap_seconds: float = 20.0
    cap_p99_ms: float = 100.0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def worker_setting(self, name: str) -> int:
        """A worker setting the passthrough mirrors: from --worker-env, else the settings' default."""
        return int(self.worker_env.get(f"MESSENGER_STREAMS_{name.upper()}", _settings_default(name)))

    @property
    def linger_ms(self) -> int:
        return self.worker_setting("producer_linger_ms")

    @property
    def one_hop(self) -> bool:
        from pydantic import TypeAdapter

        # read as the worker's settings read it (pydantic's bool), so the bench never disagrees with it
        return TypeAdapter(bool).validate_python(self.worker_env.get("MESSENGER_STREAMS_ONE_HOP",
                                                                     _settings_default("one_hop")))

    @property
    def commit_interval(self) -> float:
        return float(
            self.worker_env.get("MESSENGER_STREAMS_COMMIT_INTERVAL_SECONDS", _settings_default("commit_interval_seconds"))
        )


# ---------------------------------------------------------------------------------------------
# topic names of one run (one prefix)


@dataclass
class Names:
    prefix: str
    partitions: int
    config: Any

    def topics(self) -> Any:
        from streams.core.settings import Topics

        return Topics(prefix=self.prefix)

    def attr(self, attr: str) -> str:
        return str(self.topics().name(attr))

    def inputs(self) -> list[str]:
        return [self.attr(a) for a in input_attrs()]

    def internal(self) -> list[str]:
        """Internal topics the group consumes: drained = committed up to their end offsets.
        (`conversations.ticks` is left out: the timer writes to it all the time.)"""

        return [self.attr(a) for a in ("split", "csat_facts")]

    def arrivals(self) -> list[str]:
        """Where a processed event lands: every configured skill's console topic."""
        t = self.topics()
        return [t.skill(s) for s in self.config.all_skills()]

    def passthrough_out(self) -> str:
        return self.prefix + PASSTHROUGH_TOPIC

    def fanout_out(self) -> str:
        return self.prefix + FANOUT_TOPIC

    def nullagent_out(self) -> str:
        return self.prefix + NULLAGENT_TOPIC

    def bench_outputs(self) -> list[str]:
        """The output topics of the comparison arms (A, A×k, B) of a round."""
        return [self.passthrough_out(), self.fanout_out(), self.nullagent_out()]

    def all_topics(self) -> dict[str, bool]:
        from streams.core.topics import TOPIC_SPECS

        t = self.topics()
        names = {t.name(a): spec[0] for a, spec in TOPIC_SPECS.items()}
        names.update({t.skill(s): False for s in self.config.all_skills()})
        names.update({t: False for t in self.bench_outputs()})
        return names


# ---------------------------------------------------------------------------------------------
# arm processes


class Proc:
    """One arm subprocess (a worker or the passthrough), its log, readiness, and /proc stats."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, ready_marker: str,
                 cwd: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.ready_marker = ready_marker
        self._log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self.env = env
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)
        self.ready_at: float | None = None
        self.cpu0 = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll_ready(self) -> bool:
        if self.ready_at is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if self.ready_marker in self.log_path.read_text(errors="replace"):
                self.ready_at = time.monotonic()
                self.cpu0 = proc_cpu_seconds(self.pid)
        return self.ready_at is not None

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stats(self) -> dict[str, Any]:
        st = proc_status(self.pid)
        return {"pid": self.pid, "peak_rss_kib": st["VmHWM"], "rss_kib": st["VmRSS"],
                "cpu_s": round(proc_cpu_seconds(self.pid) - self.cpu0, 2)}

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


async def wait_ready(procs: Sequence[Proc], timeout: float = 120.0) -> float:
    """Wait until every process says it is consuming; returns the latest ready time (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.poll_ready() for p in procs):
            return max(p.ready_at or 0.0 for p in procs)
        await asyncio.sleep(0.05)
    raise RuntimeError(f"not ready within {timeout}s:\n" + "\n".join(p.tail() for p in procs))


def start_workers(opts: Opts, names: Names, app_id: str, workdir: Path, count: int,
                  cmd: list[str] | None = None) -> list[Proc]:
    """`count` worker processes of one app (one consumer group): they split the partitions.
    `cmd` runs another faust app with the same environment instead (arm B)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MESSENGER_STREAMS_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
    procs = []
    for i in range(count):
        wdir = workdir / f"{app_id}-w{i}"
        (wdir / "data").mkdir(parents=True, exist_ok=True)
        env = dict(base)
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": opts.bootstrap,
            "MESSENGER_STREAMS_CONFIG": str(opts.config),
            "MESSENGER_STREAMS_TOPIC_PREFIX": names.prefix,
            "MESSENGER_STREAMS_APP_ID": app_id,
            "MESSENGER_STREAMS_PARTITIONS": str(opts.partitions),
            "MESSENGER_STREAMS_WEB_PORT": str(free_port()),
            "MESSENGER_STREAMS_WEB_HOST": "127.0.0.1",
            "MESSENGER_STREAMS_DATADIR": str(wdir / "data"),
            "MESSENGER_STREAMS_LOG_LEVEL": "info",  # for the "[^Worker]: Ready" line; nothing logs per event
            "PYTHONUNBUFFERED": "1",
        })
        env.update(opts.worker_env)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        procs.append(Proc(f"worker {app_id}#{i}", cmd or [_bin("messenger-streams"), "worker"], env,
                          wdir / "worker.log", "[^Worker]: Ready", wdir))
    return procs


def start_passthrough(opts: Opts, names: Names, group: str, workdir: Path, fanout: int = 1) -> Proc:
    cmd = [sys.executable, "-m", "bench.passthrough", *names.inputs(), "--bootstrap", opts.bootstrap,
           "--group", group, "--out", names.passthrough_out() if fanout == 1 else names.fanout_out(),
           "--partitions", str(opts.partitions), "--linger-ms", str(opts.linger_ms),
           "--fetch-min-bytes", str(opts.worker_setting("fetch_min_bytes")),
           "--fetch-max-wait-ms", str(opts.worker_setting("fetch_max_wait_ms")),
           "--commit-interval", str(opts.commit_interval), "--fanout", str(fanout)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    wdir = workdir / group
    wdir.mkdir(parents=True, exist_ok=True)
    return Proc(f"passthrough {group}", cmd, env, wdir / "passthrough.log", "READY", ROOT)


# ---------------------------------------------------------------------------------------------
# throughput: drain a preloaded backlog


Stage = tuple[list[str], int]  # topics consumed by one stage, records it must consume in all


async def drain(opts: Opts, arm: str, names: Names, group: str, procs: list[Proc], n_input: int,
                stages: list[Stage], internal: list[str], bpid: int | None, timeout: float = 90.0,
                own_output: str | None = None) -> dict[str, Any]:
    """Watch the group's committed offsets until the backlog is drained, or `opts.max_drain` s.

    Progress is the least advanced stage: min over stages of committed / expected (so an input
    stage running ahead of its downstream stages does not count), scaled to input records. Drained =
    every input committed and every internal topic committed up to its end offset."""
    watch = OffsetWatch(opts.bootstrap)
    await watch.start()
    try:
        t_ready = await wait_ready(procs)
        broker_cpu0 = proc_cpu_seconds(bpid)
        inputs = names.inputs()
        samples: list[tuple[float, float]] = []
        t_done: float | None = None
        truncated = False
        last_progress = time.monotonic()
        while True:
            committed = await watch.committed(group)
            now = time.monotonic()
            by_topic: dict[str, int] = {}
            for (t, _), o in committed.items():
                by_topic[t] = by_topic.get(t, 0) + o
            frac = min((sum(by_topic.get(t, 0) for t in topics) / max(1, exp) for topics, exp in stages), default=0)
            done_count = min(1.0, frac) * n_input
            if samples and done_count > samples[-1][1]:
                last_progress = now
            samples.append((now, done_count))
            if sum(by_topic.get(t, 0) for t in inputs) >= n_input:
                ends = await watch.end_offsets(internal, opts.partitions)
                if all(committed.get(tp, 0) >= end for tp, end in ends.items()):
                    t_done = now
                    samples[-1] = (now, float(n_input))
                    break
            if now - t_ready >= opts.max_drain:
                t_done, truncated = now, True
                break
            if now - last_progress > timeout:
                raise RuntimeError(f"{arm}: no progress for {timeout}s at {done_count:.0f}/{n_input}:\n"
                                   + "\n".join(p.tail() for p in procs))
            for p in procs:
                p.check_alive()
            await asyncio.sleep(0.1)
        broker_cpu = proc_cpu_seconds(bpid) - broker_cpu0
        stats = [p.stats() for p in procs]
        lag = {t: by_topic.get(t, 0) for t in [*inputs, *internal]}
        written = await watch.records_by_topic((names.prefix, group + "-"), opts.partitions)
        for t in inputs:
            written.pop(t, None)
        for t in names.bench_outputs():  # the round's other arms share the prefix
            if t != own_output:
                written.pop(t, None)
    finally:
        await watch.stop()
    c0 = samples[0][1]
    done = samples[-1][1] - c0
    wall = max(1e-6, t_done - t_ready)

    def crossing(target: float) -> float | None:
        prev = (t_ready, c0)
        for t, c in samples:
            if c >= target:
                if c == prev[1]:
                    return t
                return prev[0] + (t - prev[0]) * (target - prev[1]) / (c - prev[1])
            prev = (t, c)
        return None

    # steady rate between 10% and 90% of what was processed (the start-up and the last commit excluded)
    t10, t90 = crossing(c0 + 0.1 * done), crossing(c0 + 0.9 * done)
    cpu = sum(s["cpu_s"] for s in stats)
    return {
        "arm": arm,
        "workers": len(procs),
        "input_records": n_input,
        "processed_at_ready": round(c0),
        "processed": round(done),
        "truncated": truncated,
        "seconds": round(wall, 3),
        "eps": round(done / wall, 1),
        "steady_eps_10_90": round(0.8 * done / (t90 - t10), 1) if t10 is not None and t90 and t90 > t10 else None,
        "cpu_cores": round(cpu / wall, 3),
        "broker_cpu_cores": round(broker_cpu / wall, 3) if bpid else None,
        "peak_rss_mib": round(max(s["peak_rss_kib"] for s in stats) / 1024, 1),
        "peak_rss_mib_total": round(sum(s["peak_rss_kib"] for s in stats) / 1024, 1),
        "committed_at_end": lag,
        # records in every output / internal / changelog topic at the end: the write amplification
        "records_written": written,
        "records_written_per_input": round(sum(written.values()) / max(1.0, samples[-1][1]), 2),
        "procs": stats,
    }


async def prepare(opts: Opts, names: Names, ds: Dataset) -> float:
    await create_topics(opts.bootstrap, names.all_topics(), opts.partitions)
    return await preload(opts.bootstrap, ds.records, {a: names.attr(a) for a in input_attrs()})


def c_stages(names: Names, exp: dict[str, int], one_hop: bool = True) -> list[Stage]:
    """The pipeline's consuming stages and what each must consume. One hop (the default): converse
    reads raw, the events forwarded to split, and actions. Two hops (`--worker-env
    MESSENGER_STREAMS_ONE_HOP=false`): split_webhooks (raw), then converse (split + actions)."""
    if one_hop:
        return [([names.attr("raw"), names.attr("split"), names.attr("actions")],
                 exp["raw"] + exp["forwarded"] + exp["actions"])]
    return [
        ([names.attr("raw")], exp["raw"]),
        ([names.attr("split"), names.attr("actions")], exp["split"] + exp["actions"]),
    ]


async def arm_a_drain(opts: Opts, names: Names, ds: Dataset, workdir: Path, bpid: int | None,
                      fanout: int = 1) -> dict[str, Any]:
    group = f"{names.prefix}passthrough" + ("" if fanout == 1 else f"x{fanout}")
    p = start_passthrough(opts, names, group, workdir, fanout)
    try:
        n = len(ds.records)
        return await drain(opts, "A" if fanout == 1 else "Ak", names, group, [p], n, [(names.inputs(), n)], [], bpid,
                           own_output=names.passthrough_out() if fanout == 1 else names.fanout_out())
    finally:
        p.stop()


async def arm_b_drain(opts: Opts, names: Names, ds: Dataset, workdir: Path, app_id: str,
                      bpid: int | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.nullagent", *names.inputs(), "--out", names.nullagent_out()]
    procs = start_workers(opts, names, app_id, workdir, 1, cmd)
    try:
        n = len(ds.records)
        return await drain(opts, "B", names, app_id, procs, n, [(names.inputs(), n)], [], bpid,
                           own_output=names.nullagent_out())
    finally:
        for p in procs:
            p.stop()


async def arm_c_drain(opts: Opts, names: Names, ds: Dataset, exp: dict[str, int], workdir: Path, app_id: str,
                      workers: int, bpid: int | None) -> dict[str, Any]:
    procs = start_workers(opts, names, app_id, workdir, workers)
    try:
        return await drain(opts, "C" if workers == 1 else f"C{workers}", names, app_id, procs, len(ds.records),
                           c_stages(names, exp, opts.one_hop), names.internal(), bpid)
    finally:
        for p in procs:
            p.stop()


# ---------------------------------------------------------------------------------------------
# latency: open-loop load at a fixed rate


async def sink(bootstrap: str, topics: list[str], partitions: int, stop: asyncio.Event,
               seen: dict[bytes, tuple[int, int]], hops: dict[str, dict[bytes, int]] | None = None,
               settle: float = 2.0) -> int:
    """Read the output topics from the start; first arrival (wall ns, record timestamp) per message id.
    Records of the topics named in `hops` (topic → its dict) only note their record timestamp (ms):
    the per-hop breakdown of the pipeline's latency."""
    hops = hops or {}
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100)
    await consumer.start()
    total = 0
    try:
        tps = [TopicPartition(t, p) for t in [*topics, *hops] for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        last_new = time.monotonic()
        search = MID_RE.search
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time_ns()
            for recs in batch.values():
                for r in recs:
                    m = search(r.value)
                    hop = hops.get(r.topic)
                    if hop is not None:
                        if m is not None:
                            hop.setdefault(m.group(1), r.timestamp)
                        continue
                    total += 1
                    if m is not None:
                        mid = m.group(1)
                        if mid not in seen:
                            seen[mid] = (now, r.timestamp)
                last_new = time.monotonic()
            if stop.is_set() and time.monotonic() - last_new >= settle:
                break
    finally:
        await consumer.stop()
    return total


async def topic_records(bootstrap: str, topic: str, partitions: int) -> int:
    """Records in a topic (sum of its end offsets)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    finally:
        await consumer.stop()
    return int(sum(ends.values()))


def scrape_flush_metrics(proc: Proc) -> dict[str, float]:
    """Units flushed and seconds waited for acks by the conversation stage, from the worker's /metrics."""
    import urllib.request

    port = proc.env.get("MESSENGER_STREAMS_WEB_PORT")
    if not port:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310 - local
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if 'stage="conversation"' not in line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("messenger_state_units_flushed_total"):
            out["units_flushed"] = float(value)
        elif name.startswith("messenger_state_flush_wait_seconds_sum"):
            out[f"wait_s_{'changelog' if 'changelog' in name else 'outputs'}"] = round(float(value), 3)
        elif name.startswith("messenger_state_flush_wait_seconds_count"):
            out[f"waits_{'changelog' if 'changelog' in name else 'outputs'}"] = float(value)
    return out


async def latency_run(opts: Opts, arm: str, names: Names, ds: Dataset, records_file: Path, rate: float,
                      workdir: Path, app_id: str, profile: str | None = None) -> dict[str, Any]:
    await create_topics(opts.bootstrap, names.all_topics(), opts.partitions)
    if arm == "A":
        procs = [start_passthrough(opts, names, f"{names.prefix}passthrough", workdir)]
        outputs = [names.passthrough_out()]
    elif arm == "B":  # faust's floor under the same live load (`--live-rate R --live-arm B`)
        cmd = [sys.executable, "-m", "bench.nullagent", *names.inputs(), "--out", names.nullagent_out()]
        procs = start_workers(opts, names, app_id, workdir, 1, cmd)
        outputs = [names.nullagent_out()]
    else:  # C, or C2: two workers of one group under the same live load (`--live-arm C2`)
        procs = start_workers(opts, names, app_id, workdir, 2 if arm == "C2" else 1)
        outputs = names.arrivals()
    worker = arm in ("C", "C2")
    seen: dict[bytes, tuple[int, int]] = {}
    # the worker arms only: when each message reached the internal topics (record create time, ms)
    hop_names = {"split": names.attr("split")} if worker else {}
    hops: dict[str, dict[bytes, int]] = {t: {} for t in hop_names.values()}
    stop = asyncio.Event()
    spy: subprocess.Popen[bytes] | None = None
    try:
        await wait_ready(procs)
        if profile is not None:  # py-spy on the worker for the whole open-loop run (live load, not a drain)
            spy = subprocess.Popen([_bin("py-spy"), "record", "--pid", str(procs[0].pid), "--rate", "200",
                                    "--format", opts.profile_format, "--output", profile, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        sink_task = asyncio.create_task(sink(opts.bootstrap, outputs, opts.partitions, stop, seen, hops))
        await asyncio.sleep(0.5)  # the sink is assigned and polling
        seconds = opts.lat_warmup + opts.lat_seconds
        bpid = broker_pid(opts.bootstrap)
        cpu0 = (proc_cpu_seconds(bpid), time.process_time())  # the broker's and this harness's (the sink)
        cmd = [sys.executable, "-m", "bench.loadgen", "--records", str(records_file), "--rate", f"{rate:.3f}",
               "--seconds", str(seconds), "--bootstrap", opts.bootstrap, "--linger-ms", str(LOADGEN_LINGER_MS)]
        for a in input_attrs():
            cmd += ["--topic", f"{a}={names.attr(a)}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        gen = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, env=env, cwd=ROOT)
        out, _ = await gen.communicate()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            spy = None
        if gen.returncode != 0:
            raise RuntimeError(f"loadgen exited with {gen.returncode}")
        info = orjson.loads(out.strip().splitlines()[-1])
        others = {"generator": info["cpu_s"], "harness": time.process_time() - cpu0[1]}
        if bpid is not None:  # the project's local broker (a remote one is not ours to measure)
            others["broker"] = proc_cpu_seconds(bpid) - cpu0[0]
        # stragglers: wait until every expected id arrived, or nothing new came for 3 s (some ids
        # legitimately never reach a console topic, e.g. a CSAT digit answer), at most 30 s
        expected = [m for m, i in ds.mid_first.items() if i < info["sent"]]
        deadline = time.monotonic() + 30
        last_len, last_change = len(seen), time.monotonic()
        while time.monotonic() < deadline and any(m not in seen for m in expected):
            await asyncio.sleep(0.25)
            if len(seen) != last_len:
                last_len, last_change = len(seen), time.monotonic()
            elif time.monotonic() - last_change >= 3.0:
                break
        stop.set()
        out_total = await sink_task
        stats = [p.stats() for p in procs]
        per_worker = [scrape_flush_metrics(p) for p in procs] if worker else []
        worker_metrics = per_worker[0] if per_worker else {}  # C2: the first worker's
        csat_responses = await topic_records(opts.bootstrap, names.attr("csat_responses"), opts.partitions) \
            if worker else None
    finally:
        stop.set()
        if spy is not None:
            spy.kill()
        for p in procs:
            p.stop()
    interval = 1e9 / info["rate"]
    t0 = info["t0_ns"]
    lo, hi = t0 + opts.lat_warmup * 1e9, t0 + seconds * 1e9
    lat: list[float] = []
    lat_prod: list[float] = []
    lat_hop: dict[str, list[float]] = {h: [] for h in hop_names}
    worst: dict[int, float] = {}  # second of the run (intended) → its slowest arrival, to place the tail in time
    # every id sent, not only those of the measured window: each CSAT digit that never reached a
    # console must be an answer, i.e. one record on csat.responses (a missing message would be a loss)
    never: dict[str, int] = {}
    for mid, idx in ds.mid_first.items():
        if idx < info["sent"] and mid not in seen:
            kind = mid_kind(ds.records[idx].value)
            never[kind] = never.get(kind, 0) + 1
    missing = 0
    missing_ids: list[str] = []
    missing_kinds: dict[str, int] = {}
    for mid, idx in ds.mid_first.items():
        if idx >= info["sent"]:
            continue
        intended = t0 + int(idx * interval)
        if not lo <= intended < hi:
            continue
        got = seen.get(mid)
        if got is None:
            missing += 1
            kind = mid_kind(ds.records[idx].value)
            missing_kinds[kind] = missing_kinds.get(kind, 0) + 1
            if len(missing_ids) < 200 and kind != "csat_digit":
                missing_ids.append(mid.decode(errors="replace"))
            continue
        lat.append((got[0] - intended) / 1e6)
        sec = int((intended - t0) // 1_000_000_000)
        worst[sec] = max(worst.get(sec, 0.0), lat[-1])
        lat_prod.append((got[1] * 1_000_000 - intended) / 1e6)
        for h, t in hop_names.items():
            ts = hops[t].get(mid)
            if ts is not None:
                lat_hop[h].append((ts * 1_000_000 - intended) / 1e6)
    return {
        "arm": arm,
        "rate": round(rate, 1),
        "sent": info["sent"],
        "t0_unix": round(info["t0_ns"] / 1e9, 3),  # second 0 of max_ms_by_second, to line it up with other logs
        "generator_max_behind_ms": info["max_behind_ms"],
        "generator_errors": info["errors"],
        "outputs_read": out_total,
        "measured": len(lat),
        "missing": missing,
        # by kind of input: CSAT digits answering a pending survey never reach a console topic
        "missing_by_kind": missing_kinds,
        "missing_sample": missing_ids,
        "never_arrived_by_kind": never,
        "csat_responses_written": csat_responses,  # for bench/missing.py (where did they go?) with --keep-topics
        "latency_ms": percentiles(lat),
        "max_ms_by_second": {str(k): round(v, 1) for k, v in sorted(worst.items())},
        "latency_to_output_create_time_ms": percentiles(lat_prod),
        # intended send time → the record's create time on each internal topic (C only)
        "latency_to_hop_create_time_ms": {h: percentiles(v) for h, v in lat_hop.items()},
        "peak_rss_mib": round(max(s["peak_rss_kib"] for s in stats) / 1024, 1),
        "cpu_cores": round(sum(s["cpu_s"] for s in stats) / seconds, 3),
        # each process of the arm (C2: both workers): its cores, peak RSS and, for a worker, the
        # conversation stage's write/ack cycles (both > 0: both workers had partitions)
        "processes": [{"cpu_cores": round(s["cpu_s"] / seconds, 3), "peak_rss_mib": round(s["peak_rss_kib"] / 1024, 1),
                       **({"units_flushed": per_worker[i].get("units_flushed")} if per_worker else {})}
                      for i, s in enumerate(stats)],
        # the rest of the 2-core box while the generator ran: the broker, the generator, the sink
        "other_cpu_cores": {k: round(v / seconds, 3) for k, v in others.items()},
        # the conversation stage's write/ack cycles and the time it waited for acks (whole run)
        "worker_metrics": worker_metrics,
    }


async def live_capacity(opts: Opts, config: Any, ds: Dataset, c_eps: float, workdir: Path, rid: str,
                        prefixes: list[str], errors: list[str]) -> dict[str, Any]:
    """The highest offered rate at which C's p99 (intended send → skill topic) stays within
    `opts.cap_p99_ms`: open-loop runs of C alone at rising fractions of its drain rate, shorter
    than the latency runs (`--cap-seconds` measured after `--cap-warmup`), stopping at the first
    step over the bound."""
    step_opts = replace(opts, lat_warmup=opts.cap_warmup, lat_seconds=opts.cap_seconds)
    need = int(max(opts.cap_fractions) * c_eps * (opts.cap_warmup + opts.cap_seconds)) + 1
    if need > len(ds.records):
        ds = make_dataset(config, need, opts.partitions, input_attrs())
    records_file = workdir / "capacity.bin"
    write_records(records_file, ds.records)
    steps: list[dict[str, Any]] = []
    best: float | None = None
    for k, frac in enumerate(opts.cap_fractions):
        rate = frac * c_eps
        names = Names(f"bench{rid}k{k}.", opts.partitions, config)
        prefixes.append(names.prefix)
        try:
            r = await latency_run(step_opts, "C", names, ds, records_file, rate, workdir, names.prefix.rstrip("."))
        except Exception as exc:  # noqa: BLE001 - reported; the steps so far stand
            errors.append(f"capacity step {frac}: {exc}")
            break
        finally:
            await delete_topics(opts.bootstrap, names.prefix)
            await delete_topics(opts.bootstrap, names.prefix.rstrip("."))
        p99 = r["latency_ms"].get("p99")
        ok = p99 is not None and p99 <= opts.cap_p99_ms
        steps.append({"fraction": frac, "rate": round(rate, 1), "p50": r["latency_ms"].get("p50"), "p99": p99,
                      "ok": ok, "cpu_cores": r["cpu_cores"], "max_ms_by_second": r["max_ms_by_second"]})
        log(f"capacity step {rate:.0f}/s ({frac:.0%} of drain): p99 {p99} ms → {'ok' if ok else 'over'}")
        if not ok:
            break
        best = rate
    return {"p99_bound_ms": opts.cap_p99_ms, "capacity_eps": round(best, 1) if best else None,
            "ratio_to_drain": round(best / c_eps, 3) if best else None, "steps": steps}


# ---------------------------------------------------------------------------------------------
# the run


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    eps = [r["eps"] for r in rounds]
    if not eps:
        return {"rounds": rounds}
    return {
        "rounds": rounds,
        "median_eps": round(statistics.median(eps), 1),
        "min_eps": min(eps),
        "max_eps": max(eps),
        "median_steady_eps": round(statistics.median([r["steady_eps_10_90"] or 0 for r in rounds]), 1),
        "median_cpu_cores": round(statistics.median([r["cpu_cores"] for r in rounds]), 3),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds),
        "peak_rss_mib_total": max(r["peak_rss_mib_total"] for r in rounds),
    }


def log(msg: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    print(f"[bench {stamp}] {msg}", file=sys.stderr, flush=True)


async def run(opts: Opts) -> dict[str, Any]:
    quiet_kafka_logs()
    config = load_config(opts.config)
    attrs = input_attrs()
    started = dt.datetime.now(dt.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="ms-bench-"))
    bpid = broker_pid(opts.bootstrap)
    t = time.monotonic()
    ds = make_dataset(config, opts.events, opts.partitions, attrs)
    gen_s = time.monotonic() - t
    exp = expected_counts(ds, opts.partitions)
    rid = opts.run_id
    log(f"dataset: {len(ds.records)} records {ds.counts()}, {len(ds.mid_first)} message ids; "
        f"workdir {workdir}")
    result: dict[str, Any] = {
        "schema": 1,
        "run_id": rid,
        "started_at": started.isoformat(timespec="seconds"),
        "mode": "smoke" if opts.smoke else ("profile" if opts.profile else ("live" if opts.live_rate else "full")),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "versions": _versions(),
        "settings": {
            "bootstrap": opts.bootstrap,
            "config": str(opts.config),
            "events": opts.events,
            "rounds": opts.rounds,
            "partitions": opts.partitions,
            "acks": "all",
            "linger_ms": opts.linger_ms,
            "fetch_min_bytes": opts.worker_setting("fetch_min_bytes"),
            "fetch_max_wait_ms": opts.worker_setting("fetch_max_wait_ms"),
            "max_batch_size": 262_144,
            "commit_interval_s": opts.commit_interval,
            "worker_env": opts.worker_env,
            "input_topics": list(attrs),
            "arrival_topics": Names("", opts.partitions, config).arrivals(),
            "scale_out": opts.scale_out,
            "max_drain_seconds": opts.max_drain,
            "fanout_k": opts.fanout,
        },
        "dataset": {"records": len(ds.records), "by_topic": ds.counts(), "message_ids": len(ds.mid_first),
                    "expected_per_stage": exp, "generation_s": round(gen_s, 2)},
    }
    arms: dict[str, list[dict[str, Any]]] = {"A": [], "Ak": [], "B": [], "C": [], "C2": []}
    errors: list[str] = []
    prefixes: list[str] = []

    async def tidy(prefix: str) -> None:
        if not opts.keep_topics:
            await delete_topics(opts.bootstrap, prefix)
            await delete_topics(opts.bootstrap, prefix.rstrip("."))  # faust's own changelog topics

    try:
        if opts.live_rate:
            need = int(opts.live_rate * (opts.lat_warmup + opts.lat_seconds)) + 1
            if need > len(ds.records):
                ds = make_dataset(config, need, opts.partitions, attrs)
            records_file = workdir / "records.bin"
            write_records(records_file, ds.records)
            names = Names(f"bench{rid}pl.", opts.partitions, config)
            prefixes.append(names.prefix)
            arm = opts.live_arm
            r = await latency_run(opts, arm, names, ds, records_file, opts.live_rate, workdir,
                                  names.prefix.rstrip("."), profile=opts.profile)
            result["latency"] = [{"fraction": None, "rate": opts.live_rate, arm: r}]
            q = r["latency_ms"]
            log(f"{arm} under {opts.live_rate:.0f}/s: p50 {q.get('p50')} p99 {q.get('p99')} ms, "
                f"cpu {r['cpu_cores']} cores, {r['missing']} missing{' → ' + opts.profile if opts.profile else ''}")
        elif opts.profile:
            names = Names(f"bench{rid}p.", opts.partitions, config)
            prefixes.append(names.prefix)
            await prepare(opts, names, ds)
            procs = start_workers(opts, names, f"bench{rid}p", workdir, 1)
            try:
                await wait_ready(procs)
                spy = subprocess.Popen([_bin("py-spy"), "record", "--pid", str(procs[0].pid), "--rate", "200",
                                        "--format", opts.profile_format, "--output", opts.profile,
                                        "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                r = await drain(opts, "C", names, f"bench{rid}p", procs, len(ds.records), c_stages(names, exp, opts.one_hop),
                                names.internal(), bpid)
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            finally:
                for p in procs:
                    p.stop()
            arms["C"].append(r)
            log(f"profiled C: {r['eps']} ev/s → {opts.profile}")
        else:
            for rnd in range(1, opts.rounds + 1):
                names = Names(f"bench{rid}r{rnd}.", opts.partitions, config)
                prefixes.append(names.prefix)
                secs = await prepare(opts, names, ds)
                log(f"round {rnd}: preloaded {len(ds.records)} records in {secs:.1f}s")
                for arm in ("A", "Ak", "B", "C"):
                    if arm == "Ak" and opts.fanout <= 1:
                        continue
                    try:
                        if arm == "A":
                            r = await arm_a_drain(opts, names, ds, workdir, bpid)
                        elif arm == "Ak":
                            r = await arm_a_drain(opts, names, ds, workdir, bpid, opts.fanout)
                        elif arm == "B":
                            r = await arm_b_drain(opts, names, ds, workdir, f"bench{rid}r{rnd}b", bpid)
                        else:
                            r = await arm_c_drain(opts, names, ds, exp, workdir, f"bench{rid}r{rnd}", 1, bpid)
                        r["round"] = rnd
                        arms[arm].append(r)
                        log(f"round {rnd} {arm}: {r['eps']} ev/s in {r['seconds']}s, cpu {r['cpu_cores']} cores, "
                            f"peak RSS {r['peak_rss_mib']} MiB")
                    except Exception as exc:  # noqa: BLE001 - keep the other rounds; the error is reported
                        errors.append(f"round {rnd} {arm}: {exc}")
                        log(f"round {rnd} {arm} FAILED: {exc}")
                await tidy(names.prefix)
                if opts.scale_out:
                    names2 = Names(f"bench{rid}s{rnd}.", opts.partitions, config)
                    prefixes.append(names2.prefix)
                    await prepare(opts, names2, ds)
                    try:
                        r = await arm_c_drain(opts, names2, ds, exp, workdir, f"bench{rid}s{rnd}", 2, bpid)
                        r["round"] = rnd
                        arms["C2"].append(r)
                        log(f"round {rnd} C2: {r['eps']} ev/s in {r['seconds']}s, cpu {r['cpu_cores']} cores")
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"round {rnd} C2: {exc}")
                        log(f"round {rnd} C2 FAILED: {exc}")
                    await tidy(names2.prefix)

        thr: dict[str, Any] = {k: summarize(v) for k, v in arms.items() if v}
        a_eps = thr.get("A", {}).get("median_eps")
        c_eps = thr.get("C", {}).get("median_eps")
        c2_eps = thr.get("C2", {}).get("median_eps")
        thr["ratio_C_A"] = round(c_eps / a_eps, 3) if a_eps and c_eps else None
        ak_eps = thr.get("Ak", {}).get("median_eps")
        b_eps = thr.get("B", {}).get("median_eps")
        thr["fanout_k"] = opts.fanout
        thr["ratio_C_Ak"] = round(c_eps / ak_eps, 3) if ak_eps and c_eps else None
        thr["ratio_B_A"] = round(b_eps / a_eps, 3) if a_eps and b_eps else None
        thr["ratio_C_B"] = round(c_eps / b_eps, 3) if b_eps and c_eps else None
        thr["scaling_C2_C"] = round(c2_eps / c_eps, 3) if c_eps and c2_eps else None
        result["throughput"] = thr

        lat: list[dict[str, Any]] = result.get("latency", [])
        if opts.latency and c_eps and not opts.profile:
            loads = [(r / c_eps, r) for r in opts.lat_rates] or [(f, f * c_eps) for f in opts.lat_fractions]
            need = int(max(r for _, r in loads) * (opts.lat_warmup + opts.lat_seconds)) + 1
            if need > len(ds.records):
                ds = make_dataset(config, need, opts.partitions, attrs)
                log(f"dataset extended to {len(ds.records)} records for the latency runs")
            records_file = workdir / "records.bin"
            write_records(records_file, ds.records)
            for k, (frac, rate) in enumerate(loads):
                entry: dict[str, Any] = {"fraction": round(frac, 3), "rate": round(rate, 1)}
                for arm in ("A", "B", "C"):  # B: faust's floor under the same live load
                    names = Names(f"bench{rid}l{k}{arm.lower()}.", opts.partitions, config)
                    prefixes.append(names.prefix)
                    try:
                        entry[arm] = await latency_run(opts, arm, names, ds, records_file, rate, workdir,
                                                       names.prefix.rstrip("."))
                        q = entry[arm]["latency_ms"]
                        log(f"latency {arm} @ {rate:.0f}/s ({frac:.0%}): p50 {q.get('p50')} p99 {q.get('p99')} "
                            f"p99.9 {q.get('p99_9')} ms, {entry[arm]['measured']} measured, "
                            f"{entry[arm]['missing']} missing")
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"latency {arm} {frac}: {exc}")
                        log(f"latency {arm} @ {frac:.0%} FAILED: {exc}")
                    await tidy(names.prefix)
                lat.append(entry)
        result["latency"] = lat
        if opts.capacity and c_eps and not opts.profile and not opts.live_rate:
            result["live_capacity"] = await live_capacity(opts, config, ds, c_eps, workdir, rid, prefixes, errors)
    finally:
        if not opts.keep_topics:
            for pre in prefixes:
                await delete_topics(opts.bootstrap, pre)
                await delete_topics(opts.bootstrap, pre.rstrip("."))  # faust's changelog topics
        shutil.rmtree(workdir, ignore_errors=True)
    result["errors"] = errors
    result["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return result


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("faust-streaming", "aiokafka", "orjson", "pydantic", "uvloop", "messenger-streams"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def table(res: dict[str, Any]) -> str:
    thr = res.get("throughput", {})
    lines = ["", f"messenger-streams benchmark {res['run_id']} ({res['mode']}): {res['dataset']['records']} records, "
             f"arrival on {', '.join(res['settings']['arrival_topics'])}", ""]
    lines.append(f"{'arm':<4} {'rounds':>6} {'median ev/s':>12} {'min':>9} {'max':>9} {'steady':>9} {'cpu':>6} "
                 f"{'peak RSS MiB':>13}")
    for arm in ("A", "Ak", "B", "C", "C2"):
        s = thr.get(arm)
        if not s or "median_eps" not in s:
            continue
        lines.append(f"{arm:<4} {len(s['rounds']):>6} {s['median_eps']:>12,.0f} {s['min_eps']:>9,.0f} "
                     f"{s['max_eps']:>9,.0f} {s['median_steady_eps']:>9,.0f} {s['median_cpu_cores']:>6.2f} "
                     f"{s['peak_rss_mib']:>13.1f}")
    lines.append(f"C/A throughput ratio: {thr.get('ratio_C_A')}   C/A×{thr.get('fanout_k')}: {thr.get('ratio_C_Ak')}   "
                 f"B/A (faust floor): {thr.get('ratio_B_A')}   C/B: {thr.get('ratio_C_B')}   "
                 f"2-worker scaling C2/C: {thr.get('scaling_C2_C')}")
    for e in res.get("latency", []):
        for arm in ("A", "B", "C", "C2"):
            r = e.get(arm)
            if not r:
                continue
            q = r["latency_ms"]
            share = f"{e['fraction']:.0%} of C" if e.get("fraction") is not None else "fixed rate"
            lines.append(f"latency {arm} @ {e['rate']:,.0f}/s ({share}): p50 {q.get('p50')} "
                         f"p90 {q.get('p90')} p99 {q.get('p99')} p99.9 {q.get('p99_9')} max {q.get('max')} ms "
                         f"(n={r['measured']}, missing {r['missing']}, cpu {r['cpu_cores']} cores)")
    cap = res.get("live_capacity")
    if cap:
        lines.append(f"live capacity (p99 ≤ {cap['p99_bound_ms']:.0f} ms): {cap['capacity_eps']} ev/s "
                     f"= {cap['ratio_to_drain']} of C's drain rate; steps: "
                     + ", ".join(f"{st['rate']:.0f}/s p99 {st['p99']}" for st in cap["steps"]))
    for err in res.get("errors", []):
        lines.append(f"ERROR: {err.splitlines()[0]}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[Opts, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few hundred events, one round, tiny latency check")
    p.add_argument("--events", type=int, default=None, help="backlog size per drain (default 200000; smoke 300)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of A and C (default 3; smoke 1)")
    p.add_argument("--max-drain-seconds", type=float, default=300.0,
                   help="stop a drain after this long and rate what was processed (default 300)")
    p.add_argument("--partitions", type=int, default=8, help="partitions of every topic (default 8)")
    p.add_argument("--scale-out", dest="scale_out", action=argparse.BooleanOptionalAction, default=None,
                   help="also run C with two workers in one group (default: on, off in smoke mode)")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="open-loop latency at --lat-fractions of C's capacity (default on)")
    p.add_argument("--lat-fractions", default="0.5,0.8", help="offered load as fractions of C's median ev/s")
    p.add_argument("--lat-rates", default=None, help="offered loads in records/s instead of fractions (e.g. 300,600)")
    p.add_argument("--lat-warmup", type=float, default=None, help="seconds excluded at the start (default 10)")
    p.add_argument("--lat-seconds", type=float, default=None, help="measured seconds per latency run (default 40)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="connector TOML (default: the example)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes (default bench/results)")
    p.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra worker environment (e.g. MESSENGER_STREAMS_PRODUCER_LINGER_MS=10); linger and "
                        "commit interval are mirrored in the passthrough")
    p.add_argument("--keep-topics", action="store_true", help="do not delete the benchmark topics")
    p.add_argument("--fanout", type=int, default=3,
                   help="outputs per input of arm A×k, a passthrough with the pipeline's I/O (default 3; 1 skips it)")
    p.add_argument("--capacity", action=argparse.BooleanOptionalAction, default=None,
                   help="live capacity: step C's offered rate up until p99 > --cap-p99-ms (default on, off in smoke)")
    p.add_argument("--cap-fractions", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                   help="capacity steps as fractions of C's median drain rate")
    p.add_argument("--cap-seconds", type=float, default=20.0, help="measured seconds per capacity step (default 20)")
    p.add_argument("--cap-warmup", type=float, default=10.0,
                   help="seconds excluded per capacity step (default 10, as the latency runs)")
    p.add_argument("--cap-p99-ms", type=float, default=100.0, help="the capacity's p99 bound (default 100 ms)")
    p.add_argument("--profile", metavar="FILE", default=None,
                   help="instead: one C drain with py-spy attached to the worker, profile written to FILE")
    p.add_argument("--profile-format", default="speedscope", choices=("speedscope", "flamegraph", "raw"))
    p.add_argument("--live-rate", type=float, default=None, metavar="R",
                   help="instead: one open-loop run of C alone at R records/s, no drains (with --profile: py-spy "
                        "attached, the profile of live load rather than of a drain)")
    p.add_argument("--live-arm", default="C", choices=("A", "B", "C", "C2"),
                   help="the arm of --live-rate: C (default), C2 (two workers of one group), B (faust's floor) "
                        "or A (raw aiokafka)")
    a = p.parse_args(argv)
    smoke = a.smoke
    opts = Opts(
        bootstrap=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        config=a.config.resolve(),
        events=a.events or (300 if smoke else 200_000),
        rounds=a.rounds or (1 if smoke else 3),
        partitions=a.partitions,
        scale_out=a.scale_out if a.scale_out is not None else not smoke,
        latency=a.latency,
        lat_fractions=[float(x) for x in a.lat_fractions.split(",") if x.strip()],
        lat_warmup=a.lat_warmup if a.lat_warmup is not None else (0.5 if smoke else 10.0),
        lat_seconds=a.lat_seconds if a.lat_seconds is not None else (2.0 if smoke else 40.0),
        results_dir=a.results_dir,
        keep_topics=a.keep_topics,
        worker_env=dict(kv.split("=", 1) for kv in a.worker_env),
        profile=a.profile,
        smoke=smoke,
        profile_format=a.profile_format,
        max_drain=a.max_drain_seconds,
        lat_rates=[float(x) for x in (a.lat_rates or "").split(",") if x.strip()],
        fanout=a.fanout,
        live_rate=a.live_rate,
        live_arm=a.live_arm,
        capacity=a.capacity if a.capacity is not None else not smoke,
        cap_fractions=[float(x) for x in a.cap_fractions.split(",") if x.strip()],
        cap_seconds=a.cap_seconds,
        cap_warmup=a.cap_warmup,
        cap_p99_ms=a.cap_p99_ms,
    )
    if smoke and a.lat_fractions == "0.5,0.8":
        opts.lat_fractions = [0.5]
    return opts, a


def main(argv: Sequence[str] | None = None) -> int:
    opts, _ = parse_args(argv)
    res = asyncio.run(run(opts))
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stamp}-{res['mode']}-{res['run_id']}.json"
    data = orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    (opts.results_dir / name).write_bytes(data)
    (opts.results_dir / "latest.json").write_bytes(data)
    print(table(res))
    print(f"\nresults: {opts.results_dir / name}")
    ok = (bool(res.get("throughput", {}).get("C", {}).get("median_eps")) or bool(res.get("latency"))) \
        and not res["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

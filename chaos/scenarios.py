"""The five scenarios. Each run: fresh topics and consumer groups on the suite's broker, worker(s)
and a dispatcher talking to the fake Graph API, scripted conversations (chaos/traffic.py), the
scenario's faults, a settle phase, then the audit (chaos/audit.py).

- a: SIGKILL the worker `kills` times at random points mid-stream (the supervisor restarts it): the
  first during the steady flow, the others 0–2 s after the worker processes again (catching up).
- b: restart the broker mid-stream (SIGTERM by default, `--broker-signal kill` for SIGKILL).
- c: two workers in one group, SIGKILL one mid-stream: the other must take over its partitions (the
  figure); then the killed one is started again, so the end figures come from two workers.
- d: fuzzed and malformed bodies interleaved with the valid traffic (chaos/fuzz.py).
- e: SIGKILL the dispatcher `kills` times mid-batch (requests in flight at the fake Graph API).

"Mid-stream" is checked before each fault and reported: the group has input not yet committed,
console events were written in the last 2 s, and conversations are still running (for e: Graph
requests in flight or arriving, and outbound records not yet committed by the dispatcher).

Recovery: after each fault one probe message per partition is written; a partition is processed
again when its first output created after the fault is read — for the conversation stage a console
event whose key is on that partition, for the ingest stage a normalized event whose source is that
raw partition, for the dispatcher a Graph request for a conversation on that outbound partition.
The figure is the slowest partition (seconds after the fault; for b, after the broker is back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from bench.common import OffsetWatch, delete_topics
from chaos import audit, fuzz
from chaos.observe import Observer, graph_page, graph_recent, graph_wall_time, partition_of
from chaos.procs import ROOT, Broker, Managed, bin_path, free_port
from chaos.traffic import PAGES, Sender, Traffic
from streams.core.settings import Settings, Topics
from tests.fakegraph import FakeGraph

log = logging.getLogger("chaos")

CONFIG = Path(__file__).resolve().parent / "connector.toml"
RAW_TOPIC_MAX_BYTES = 8 * 1024 * 1024  # the upstream ingester may write bodies larger than a dead letter may be
WORKER_READY = "[^Worker]: Ready"
DISPATCH_READY = "dispatching "

TITLES = {
    "a": "SIGKILL the worker at random points mid-stream",
    "b": "restart the broker mid-stream",
    "c": "two workers, SIGKILL one, the other takes over",
    "d": "fuzzed and malformed bodies among valid traffic",
    "e": "SIGKILL the dispatcher mid-batch (fake Graph API)",
}


@dataclass
class Options:
    """Everything a scenario run needs to know (built by chaos/run.py)."""

    size: str
    conversations: int
    rate: float
    fuzz_bodies: int
    kills: int
    partitions: int
    seed: int
    step_timeout: float
    recovery_timeout: float
    graph_delay: float
    broker_signal: str
    keep_topics: bool
    keep_logs: bool = False
    worker_env: dict[str, str] = field(default_factory=dict)


def _say(msg: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[chaos {stamp}] {msg}", flush=True)


class ScenarioRun:
    """One run of one scenario on one broker."""

    def __init__(self, letter: str, opts: Options, bootstrap: str, broker: Broker | None, workdir: Path,
                 run_index: int, run_id: str, logs_dir: Path | None = None) -> None:
        self.letter = letter
        self.opts = opts
        self.bootstrap = bootstrap
        self.broker = broker
        self.run_index = run_index
        self.app_id = f"chaos{run_id}{letter}{run_index}"
        self.prefix = self.app_id + "."
        self.dir = workdir / self.app_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(f"{opts.seed}:{letter}:{run_index}")
        self.topics = Topics.model_construct(prefix=self.prefix)
        self.skills = sorted({skill for _, skill in PAGES})
        self.workers: list[Managed] = []
        self.dispatcher: Managed | None = None
        self.graph: FakeGraph | None = None
        self.observer: Observer | None = None
        self.sender: Sender | None = None
        self.traffic: Traffic | None = None
        self.watch: OffsetWatch | None = None
        self.faults: list[dict[str, Any]] = []
        self.fuzz_expect: dict[tuple[int, int], tuple[fuzz.FuzzBody, fuzz.Expected]] = {}
        self.fuzz_sent = 0
        self.fuzz_done = True
        self.errors: list[str] = []
        self.t0 = 0.0
        self.logs_dir = logs_dir

    # processes -------------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MESSENGER_STREAMS_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "MESSENGER_STREAMS_CONFIG": str(CONFIG),
            "MESSENGER_STREAMS_TOPIC_PREFIX": self.prefix,
            "MESSENGER_STREAMS_APP_ID": self.app_id,
            "MESSENGER_STREAMS_PARTITIONS": str(self.opts.partitions),
            "MESSENGER_STREAMS_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        })
        return env

    def _worker(self, i: int) -> Managed:
        wdir = self.dir / f"worker{i}"
        (wdir / "data").mkdir(parents=True, exist_ok=True)
        env = self._base_env()
        env.update({
            "MESSENGER_STREAMS_WEB_PORT": str(free_port()),
            "MESSENGER_STREAMS_WEB_HOST": "127.0.0.1",
            "MESSENGER_STREAMS_DATADIR": str(wdir / "data"),
        })
        env.update(self.opts.worker_env)
        return Managed(f"worker{i}", [bin_path("messenger-streams"), "worker"], env, wdir / "worker.log",
                       WORKER_READY)

    def _dispatch(self, graph_url: str) -> Managed:
        ddir = self.dir / "dispatch"
        ddir.mkdir(parents=True, exist_ok=True)
        env = self._base_env()
        env["MESSENGER_STREAMS_PAGE_TOKENS"] = orjson.dumps({p: f"token-{p}" for p, _ in PAGES}).decode()
        env["MESSENGER_STREAMS_DATADIR"] = str(ddir)
        return Managed("dispatch", [bin_path("messenger-streams"), "dispatch", "--graph-url", graph_url,
                                    "--web-port", "0"], env, ddir / "dispatch.log", DISPATCH_READY)

    async def _create_raw_topic(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            topic = NewTopic(self.topics.name("raw"), self.opts.partitions, 1,
                             topic_configs={"max.message.bytes": str(RAW_TOPIC_MAX_BYTES)})
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([topic], timeout_ms=30_000)
        finally:
            await admin.close()

    # the run ---------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        started = time.time()
        _say(f"scenario {self.letter} run {self.run_index}: {TITLES[self.letter]} (app {self.app_id})")
        try:
            await self._setup()
            await self._exercise()
            await self._settle()
            figures = await self._figures()
        finally:
            await self._teardown()
        figures["duration_s"] = round(time.time() - started, 1)
        figures["goals"] = audit.goals(figures)
        g = figures["goals"]
        if (not g["met"] or self.opts.keep_logs) and self.logs_dir is not None:
            figures["logs_kept_in"] = self._keep_logs(self.logs_dir)
        _say(f"scenario {self.letter} run {self.run_index}: {'all goals met' if g['met'] else 'FAILED ' + ', '.join(g['failed'])}"
             f" in {figures['duration_s']}s")
        return figures

    async def _setup(self) -> None:
        await self._create_raw_topic()
        self.graph = FakeGraph(default_delay=self.opts.graph_delay)
        url = await self.graph.start()
        n_workers = 2 if self.letter == "c" else 1
        self.workers = [self._worker(i) for i in range(n_workers)]
        await asyncio.gather(*(w.start() for w in self.workers))
        self.dispatcher = self._dispatch(url)
        await self.dispatcher.start()
        self.observer = Observer(
            self.bootstrap, self.opts.partitions, [self.topics.skill(s) for s in self.skills],
            self.topics.name("split"), self.topics.name("dlq"), self.topics.name("outbound"), self.topics.name("raw"),
        )
        await self.observer.start()
        self.sender = Sender(self.bootstrap, self.topics.name("raw"), self.topics.name("actions"), self.opts.partitions)
        await self.sender.start()
        self.watch = OffsetWatch(self.bootstrap)
        await self.watch.start()
        self.traffic = Traffic(self.sender, self.observer, conversations=self.opts.conversations,
                               rate=self.opts.rate, seed=self.opts.seed, tag=f"{self.letter}{self.run_index}",
                               step_timeout=self.opts.step_timeout)
        _say(f"  workers ready in {[w.ready_times[-1] for w in self.workers]}s, dispatcher in "
             f"{self.dispatcher.ready_times[-1]}s; {self.opts.conversations} conversations over "
             f"{self.traffic.arrival_window:.0f}s")

    async def _exercise(self) -> None:
        assert self.traffic is not None
        self.t0 = time.time()
        # generous: the faults' recoveries plus every step's own timeout
        n_faults = {"a": self.opts.kills, "e": self.opts.kills}.get(self.letter, 1)
        deadline = (self.t0 + self.traffic.arrival_window + 6 * self.opts.step_timeout
                    + n_faults * self.opts.recovery_timeout)
        fault = {"a": self._kill_worker, "b": self._restart_broker, "c": self._failover,
                 "d": self._fuzz, "e": self._kill_dispatcher}[self.letter]
        fault_task = asyncio.create_task(fault(), name=f"fault {self.letter}")
        # conversations keep starting until the faults are over, so every fault meets live traffic
        traffic_task = asyncio.create_task(self.traffic.run(deadline, lambda: not fault_task.done()),
                                           name="traffic")
        try:
            await fault_task
        except Exception as exc:  # noqa: BLE001 - reported; the audit still runs on what happened
            self.errors.append(f"fault: {type(exc).__name__}: {exc}"[:2000])
            _say(f"  fault injection failed: {exc!r}"[:500])
        await traffic_task
        _say(f"  traffic done: {self.traffic.summary()['completed']} of {len(self.traffic.convs)} conversations "
             f"completed")

    # faults ----------------------------------------------------------------------------------

    def _window(self) -> float:
        assert self.traffic is not None
        return max(5.0, self.traffic.arrival_window)

    async def _at(self, fraction_lo: float, fraction_hi: float) -> None:
        """Sleep until a random point of the arrival window."""
        when = self.t0 + self.rng.uniform(fraction_lo, fraction_hi) * self._window()
        await asyncio.sleep(max(0.0, when - time.time()))

    async def _kill_worker(self) -> None:
        """The first kill at a random point of the steady flow; each later one at a random point of
        the first seconds after the worker is processing again, while it catches up with the backlog
        that built up during the outage (the most writes in flight)."""
        await self._kill_repeatedly(self.workers[0], "worker", ("ingest", "conversation"), self._mid_stream,
                                    lambda: self.rng.uniform(0.0, 2.0))

    async def _kill_repeatedly(self, proc: Managed, what: str, stages: tuple[str, ...], mid: Any,
                               gap: Any) -> None:
        """SIGKILL `proc` `--kills` times (the supervisor restarts it): the first at 10–30% of the
        window, each later one `gap()` seconds after its partitions are processed again; `mid()` waits
        for and returns the mid-stream evidence."""
        for k in range(self.opts.kills):
            if k == 0:
                await self._at(0.1, 0.3)
            else:
                await asyncio.sleep(gap())
            ms = await mid()
            starts = proc.starts
            at = proc.kill(signal.SIGKILL)
            _say(f"  SIGKILL {what} ({k + 1}/{self.opts.kills}) at +{at - self.t0:.1f}s, mid-stream: {ms}")
            rec_task = asyncio.create_task(self._recovery(at, stages))
            await self._probe()
            try:
                ready: float | None = await proc.wait_start(starts + 1)
            except RuntimeError as exc:
                self.errors.append(str(exc)[:2000])
                ready = None
            rec = await rec_task
            self._fault(f"SIGKILL {what} #{k + 1}", at, ms, rec,
                        restarted_ready_s=None if ready is None else round(ready - at, 2))

    async def _restart_broker(self) -> None:
        if self.broker is None:
            raise RuntimeError("scenario b needs the suite's own broker")
        await self._at(0.25, 0.5)
        ms = await self._mid_stream()
        sig = signal.SIGKILL if self.opts.broker_signal == "kill" else signal.SIGTERM
        down = time.time()
        _say(f"  {sig.name} broker at +{down - self.t0:.1f}s, mid-stream: {ms}")
        await self.broker.stop(sig)
        stopped = time.time()
        await self.broker.up()
        up = time.time()
        _say(f"  broker back after {up - down:.1f}s")
        rec_task = asyncio.create_task(self._recovery(up, ("ingest", "conversation")))
        await self._probe()
        rec = await rec_task
        self._fault(f"broker restart ({sig.name})", down, ms, rec, broker_stopped_s=round(stopped - down, 2),
                    broker_down_s=round(up - down, 2), measured_from="broker back up")

    async def _failover(self) -> None:
        await self._at(0.2, 0.45)
        ms = await self._mid_stream()
        victim = self.rng.choice(self.workers)
        victim.restart_after_kill = False
        at = victim.kill(signal.SIGKILL)
        _say(f"  SIGKILL {victim.name} of 2 at +{at - self.t0:.1f}s, mid-stream: {ms}")
        rec_task = asyncio.create_task(self._recovery(at, ("ingest", "conversation")))
        await self._probe()
        rec = await rec_task
        self._fault(f"SIGKILL {victim.name} (of 2; the other takes over)", at, ms, rec)
        # then it comes back, as under a supervisor: the end figures (GET /csat on every worker)
        # are taken with the partitions shared by two workers again
        victim.restart_after_kill = True
        back = time.time()
        await victim.start()
        _say(f"  {victim.name} back after {time.time() - back:.1f}s")

    async def _kill_dispatcher(self) -> None:
        assert self.dispatcher is not None
        await self._kill_repeatedly(self.dispatcher, "dispatcher", ("dispatch",), self._mid_batch,
                                    lambda: self.rng.uniform(1.0, max(1.5, 0.15 * self._window())))

    async def _fuzz(self) -> None:
        """Send the fuzzed bodies spread over the arrival window, in small pipelined batches."""
        assert self.sender is not None
        self.fuzz_done = False
        bodies = fuzz.generate(self.opts.fuzz_bodies, self.opts.seed, f"{self.letter}{self.run_index}",
                               int(time.time() * 1000))
        max_bytes = int(Settings.model_fields["max_body_bytes"].default)
        spread = self._window()
        batch = 20
        for start in range(0, len(bodies), batch):
            due = self.t0 + spread * start / max(1, len(bodies))
            await asyncio.sleep(max(0.0, due - time.time()))
            chunk = bodies[start:start + batch]
            sent = await asyncio.gather(*(self.sender.send_raw(fb.value, "fuzz", fb.index) for fb in chunk))
            for fb, s in zip(chunk, sent, strict=True):
                if s is None:
                    continue
                self.fuzz_sent += 1
                self.fuzz_expect[(s.partition, s.offset)] = (
                    fb, fuzz.expect(fb.value, self.topics.name("raw"), s.partition, s.offset, max_bytes))
        self.fuzz_done = True
        _say(f"  {self.fuzz_sent} fuzzed bodies written ({len(self.sender.refused)} refused by Kafka)")

    def _fault(self, what: str, at: float, ms: dict[str, Any], rec: dict[str, Any], **extra: Any) -> None:
        entry = {"what": what, "at_s": round(at - self.t0, 2), "mid_stream": ms, **rec, **extra}
        self.faults.append(entry)
        _say(f"  {what}: every partition processed again after {rec.get('recovery_s')}s"
             + (f" (not recovered: {rec.get('not_recovered')})" if rec.get("not_recovered") else ""))

    async def _probe(self) -> None:
        assert self.traffic is not None
        try:
            await self.traffic.probe(self.opts.partitions)
        except Exception as exc:  # noqa: BLE001 - the broker may still be down; the figure shows it
            self.errors.append(f"probe: {exc!r}")

    async def _lag(self, group: str, topics: list[str]) -> int | None:
        assert self.watch is not None
        try:
            committed = await self.watch.committed(group)
            ends = await self.watch.end_offsets(topics, self.opts.partitions)
        except Exception:  # noqa: BLE001 - the broker may be restarting
            return None
        return sum(max(0, end - committed.get(tp, 0)) for tp, end in ends.items())

    async def _mid_stream(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait (bounded) until the worker group is mid-stream; the evidence, and whether it held."""
        assert self.observer is not None and self.traffic is not None
        inputs = [self.topics.name(a) for a in ("raw", "split", "actions")]
        deadline = time.monotonic() + timeout
        ev: dict[str, Any] = {}
        while True:
            lag = await self._lag(self.app_id, inputs)
            outs = self.observer.outputs_since(int((time.time() - 2.0) * 1000))
            running = self.traffic.pending()
            ev = {"input_lag": lag, "outputs_last_2s": outs, "conversations_running": running}
            ev["ok"] = bool(lag and outs and running)
            if ev["ok"] or time.monotonic() >= deadline:
                return ev
            await asyncio.sleep(0.1)

    async def _mid_batch(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.graph is not None and self.traffic is not None
        deadline = time.monotonic() + timeout
        while True:
            lag = await self._lag(f"{self.app_id}-dispatch", [self.topics.name("outbound")])
            ev: dict[str, Any] = {"outbound_lag": lag, "graph_in_flight": len(self.graph.in_flight()),
                                  "graph_requests_last_2s": graph_recent(self.graph, 2.0),
                                  "conversations_running": self.traffic.pending()}
            ev["ok"] = bool(ev["graph_in_flight"] and ev["graph_requests_last_2s"] and ev["conversations_running"])
            if ev["ok"] or time.monotonic() >= deadline:
                return ev
            await asyncio.sleep(0.02)

    async def _recovery(self, since: float, stages: tuple[str, ...]) -> dict[str, Any]:
        """Seconds after `since` until every partition of `stages` shows output created after it."""
        assert self.observer is not None and self.graph is not None
        obs, graph, parts = self.observer, self.graph, self.opts.partitions
        first: dict[str, dict[int, float]] = {s: {} for s in stages}
        ptr = dict.fromkeys(stages, 0)
        deadline = time.monotonic() + self.opts.recovery_timeout

        def times(stage: str, start: int) -> tuple[list[tuple[float, int]], int]:
            """(epoch s, partition) of the stage's outputs read from index `start` on, and the new end."""
            if stage == "conversation":
                seq = obs.console_by_partition[start:]
                return [(ts / 1000, part) for ts, part in seq], start + len(seq)
            if stage == "ingest":
                seq = obs.split_first_after[start:]
                return [(ts / 1000, part) for ts, part in seq], start + len(seq)
            reqs = graph.requests[start:]
            return [(graph_wall_time(r), partition_of(f"{graph_page(r)}:{r.psid}", parts)) for r in reqs], \
                start + len(reqs)

        def scan() -> None:
            for stage, seen in first.items():
                new, ptr[stage] = times(stage, ptr[stage])
                for at, part in new:
                    if at >= since and part not in seen:
                        seen[part] = at - since

        while time.monotonic() < deadline:
            scan()
            if all(len(v) == parts for v in first.values()):
                break
            await asyncio.sleep(0.1)
        scan()
        missing = [f"{s}/{p}" for s, v in first.items() for p in range(parts) if p not in v]
        allv = [t for v in first.values() for t in v.values()]
        return {
            "recovery_s": None if missing else round(max(allv), 2),
            "per_partition_s": {s: {str(p): round(t, 2) for p, t in sorted(v.items())} for s, v in first.items()},
            "not_recovered": missing,
        }

    # settle and collect ----------------------------------------------------------------------

    async def _until(self, what: str, cond: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            await asyncio.sleep(0.5)
        ok = bool(cond())
        if not ok:
            _say(f"  settle: {what} not reached within {timeout:.0f}s")
        return ok

    async def _settle(self) -> None:
        obs, traffic, graph = self.observer, self.traffic, self.graph
        assert obs is not None and traffic is not None and graph is not None
        mids = traffic.consumer_mids()

        def shown() -> bool:
            seen = {c.value.get("mid") for evs in obs.console.values() for c in evs
                    if c.value.get("type") == "consumer_message"}
            return all(m in seen for m in mids)

        await self._until("every consumer message shown", shown, 60)
        if self.fuzz_expect:
            def fuzz_settled() -> bool:
                return all(exp.events <= obs.split_sources.get(where, set())
                           for where, (_, exp) in self.fuzz_expect.items())
            await self._until("every good fuzzed item on the split topic", fuzz_settled, 90)
        await obs.quiet(3.0, 60)

        def all_sent() -> bool:
            sent = graph.deliveries()
            return all(o["outbox_id"] in sent for o in obs.outbound if o["message"])

        await self._until("every outbound message at the Graph API", all_sent, 60)

        def answers_shown() -> int:
            return sum(1 for c in traffic.convs if c.score is not None and any(
                e.value.get("type") == "csat_received" for e in obs.by_conversation.get(c.conversation_id, ())))

        # until every answer is shown, or none more came for 10 s (at most 60 s)
        answered = sum(1 for c in traffic.convs if c.score is not None)
        deadline, last, since = time.monotonic() + 60, -1, time.monotonic()
        while time.monotonic() < deadline:
            n = answers_shown()
            if n >= answered:
                break
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= 10:
                _say(f"  settle: csat_received for {n} of {answered} CSAT answers")
                break
            await asyncio.sleep(0.5)
        await obs.quiet(3.0, 30)

    async def _csat_reports(self) -> dict[str, Any]:
        assert self.traffic is not None
        reports: dict[str, Any] = {}

        async def fetch(session: aiohttp.ClientSession, w: Managed) -> Any:
            url = f"http://127.0.0.1:{w.env['MESSENGER_STREAMS_WEB_PORT']}/csat"
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    return await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                return f"{type(exc).__name__}: {exc}"

        live = [w for w in self.workers if w.alive]
        deadline = time.monotonic() + 45
        async with aiohttp.ClientSession() as session:
            while True:
                reports = {w.name: await fetch(session, w) for w in live}
                check = audit.csat_check(self.traffic, reports)
                if (check["double_counted"] == 0 and check["missing"] == 0) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
        return reports

    def _keep_logs(self, into: Path) -> str:
        """Copy the process logs of a failed run next to the report (for the post-mortem)."""
        dest = into / self.app_id
        dest.mkdir(parents=True, exist_ok=True)
        for m in [*self.workers, *([self.dispatcher] if self.dispatcher else [])]:
            with contextlib.suppress(OSError):
                shutil.copyfile(m.log_path, dest / m.log_path.name.replace(".log", f"-{m.name}.log"))
        return str(dest)

    def _log_signals(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in [*self.workers, *([self.dispatcher] if self.dispatcher else [])]:
            text = m.tail(50_000_000)
            out[m.name] = {"tracebacks": text.count("Traceback (most recent call last)"),
                           "agent_crashes": text.count("Crashed reason="),
                           "errors": text.count(" ERROR ") + text.count("[ERROR]")}
        return out

    async def _figures(self) -> dict[str, Any]:
        obs, traffic, sender = self.observer, self.traffic, self.sender
        assert obs is not None and traffic is not None and sender is not None
        reports = await self._csat_reports()
        stage_names = {self.topics.name("raw"): "ingest", self.topics.name("split"): "conversation",
                       self.topics.name("actions"): "conversation(actions)",
                       self.topics.name("csat_facts"): "csat"}
        fig: dict[str, Any] = {
            "scenario": self.letter,
            "title": TITLES[self.letter],
            "run": self.run_index,
            "app_id": self.app_id,
            "traffic": {**traffic.summary(), "producer_retries": sender.retries,
                        "raw_bodies_written": len(sender.raw), "stalled_examples": audit.stalled(traffic, obs)},
            "consumer_messages": audit.consumer_messages(traffic, obs),
            "console": audit.console_consistency(obs),
            "csat": audit.csat_check(traffic, reports),
            "csat_console": audit.csat_console(traffic, obs),
            "graph": audit.graph_sends(obs, self.graph),
            "dead_letters": audit.dead_letters(obs, sender, self.fuzz_expect, stage_names),
            "recovery": self.faults,
            "processes": {m.name: m.summary() for m in [*self.workers, *([self.dispatcher] if self.dispatcher else [])]},
            "logs": self._log_signals(),
            "observer_read_errors": obs.errors,
            "errors": self.errors,
        }
        if self.letter == "d":
            fig["fuzz"] = {"bodies_written": self.fuzz_sent, "families": fuzz.family_counts(self.opts.fuzz_bodies)}
        return fig

    async def _teardown(self) -> None:
        for closer in (
            *(w.stop() for w in self.workers),
            *((self.dispatcher.stop(),) if self.dispatcher else ()),
        ):
            with contextlib.suppress(Exception):
                await closer
        for thing in (self.observer, self.sender, self.watch, self.graph):
            if thing is not None:
                with contextlib.suppress(Exception):
                    await thing.stop()
        if not self.opts.keep_topics:
            with contextlib.suppress(Exception):
                await delete_topics(self.bootstrap, self.app_id)

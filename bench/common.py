"""Shared pieces of the benchmark: the input data set, topic names, Kafka helpers, process stats."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "deploy" / "connector.example.toml"

# The Simulator's message ids: `m_sim` + 32 hex digits. Found in the raw body, in the normalized
# event and in the console events of messages (consumer_message / external_message `mid`), so it
# correlates one input with its output in every arm without a JSON parse.
MID_RE = re.compile(rb'"mid":\s*"(m_sim[0-9a-f]{32})"')

ATTRS = ("raw", "actions")
_HEAD = struct.Struct("<BHii")


@dataclass(frozen=True)
class Rec:
    """One input record: topic attribute (raw/actions), key, value, and its fixed partition."""

    attr: str
    key: bytes | None
    value: bytes
    partition: int


@dataclass
class Dataset:
    """Pre-generated Simulator traffic, reused by every arm and round (same bytes, same partitions)."""

    records: list[Rec] = field(default_factory=list)
    mid_first: dict[bytes, int] = field(default_factory=dict)  # mid → index of its first occurrence

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.attr] = out.get(r.attr, 0) + 1
        return out


def input_attrs() -> tuple[str, ...]:
    """Topics the pipeline consumes from outside."""
    return ("raw", "actions")


def load_config(path: Path) -> Any:
    from streams.core.config import load_config as _load

    return _load(path)


def make_dataset(config: Any, count: int, partitions: int, attrs: Sequence[str], seed: int = 7,
                 consumers: int = 1000) -> Dataset:
    """`count` records of realistic traffic (the Simulator's mix, 0.1% invalid, 2% redelivered bodies),
    keeping only the topics the pipeline consumes. Keyless raw bodies are spread round-robin over
    the partitions; keyed records go where the Kafka default partitioner (murmur2) puts them."""
    from aiokafka.partitioner import murmur2

    from streams.commands.simulate import Simulator

    sim = Simulator(config, seed=seed, consumers=consumers, agents=True, invalid_ratio=0.001, duplicate_ratio=0.02)
    ds = Dataset()
    rr = 0
    while len(ds.records) < count:
        r = sim.step()
        if r.topic not in attrs:
            continue
        if r.key is None:
            part = rr % partitions
            rr += 1
        else:
            part = (murmur2(r.key) & 0x7FFFFFFF) % partitions
        idx = len(ds.records)
        ds.records.append(Rec(r.topic, r.key, r.value, part))
        if r.topic == "raw":
            m = MID_RE.search(r.value)
            if m is not None and m.group(1) not in ds.mid_first:
                ds.mid_first[m.group(1)] = idx
    return ds


def write_records(path: Path, records: Iterable[Rec]) -> None:
    with open(path, "wb") as f:
        for r in records:
            key = r.key
            f.write(_HEAD.pack(ATTRS.index(r.attr), r.partition, -1 if key is None else len(key), len(r.value)))
            if key is not None:
                f.write(key)
            f.write(r.value)


def read_records(path: Path) -> Iterator[Rec]:
    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        a, part, klen, vlen = _HEAD.unpack_from(data, pos)
        pos += _HEAD.size
        key = None
        if klen >= 0:
            key = data[pos : pos + klen]
            pos += klen
        value = data[pos : pos + vlen]
        pos += vlen
        yield Rec(ATTRS[a], key, value, part)


# ---------------------------------------------------------------------------------------------
# Kafka helpers (harness side)


def quiet_kafka_logs() -> None:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


async def create_topics(bootstrap: str, names: dict[str, bool], partitions: int) -> None:
    """Create topics (name → compacted?) and wait until their metadata is visible."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(n, partitions, 1, topic_configs={"cleanup.policy": "compact"} if c else {})
            for n, c in sorted(names.items())
            if n not in existing
        ]
        if new:
            await admin.create_topics(new, timeout_ms=30_000)
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            if all(len(consumer.partitions_for_topic(n) or ()) == partitions for n in names):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"topics not visible after 30 s: {sorted(names)}")
    finally:
        await consumer.stop()


async def delete_topics(bootstrap: str, prefix: str) -> None:
    """Delete every topic starting with `prefix` (benchmark topics are big; keep the broker tidy)."""
    from aiokafka.admin import AIOKafkaAdminClient

    if not prefix:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n.startswith(prefix)]
        if names:
            await admin.delete_topics(names, timeout_ms=30_000)
    except Exception as exc:  # noqa: BLE001 - tidying up is best effort
        logging.getLogger("bench").warning("could not delete topics %s*: %r", prefix, exc)
    finally:
        await admin.close()
    await files_gone(bootstrap, prefix)


async def files_gone(bootstrap: str, prefix: str, timeout: float = 60.0) -> None:
    """On the project's local broker: wait until the deleted topics' files are gone from its data
    directory, so that the broker does not unlink hundreds of MB during the next measurement (it
    did, 60 s later, in the middle of a capacity step: docs/benchmarks.md, stop 33). A remote
    broker is not ours to watch."""
    data = local_data_dir(bootstrap)
    if data is None:
        return
    deadline = time.monotonic() + timeout
    while any(p.name.startswith(prefix) for p in data.iterdir()):
        if time.monotonic() > deadline:
            logging.getLogger("bench").warning("files of the deleted topics %s* still on disk after %.0f s",
                                               prefix, timeout)
            return
        await asyncio.sleep(0.2)  # the broker's own deletion schedule: nothing to await on


async def preload(bootstrap: str, records: Sequence[Rec], topic_of: dict[str, str]) -> float:
    """Produce the backlog as fast as the broker takes it (acks=all); returns seconds taken."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1_048_576, max_request_size=4_194_304
    )
    await producer.start()
    t = time.monotonic()
    try:
        pending: list[asyncio.Future[Any]] = []
        for r in records:
            hdr = [("received-at", str(int(time.time() * 1000)).encode())] if r.attr == "raw" else []
            pending.append(await producer.send(topic_of[r.attr], r.value, key=r.key, partition=r.partition,
                                               headers=hdr))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await producer.flush()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - t


class OffsetWatch:
    """Cheap progress probe: a group's committed offsets and topics' end offsets (admin + plain consumer)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._admin: Any = None
        self._consumer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self._admin.start()
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def committed(self, group: str) -> dict[tuple[str, int], int]:
        offs = await self._admin.list_consumer_group_offsets(group)
        return {(tp.topic, tp.partition): om.offset for tp, om in offs.items() if om is not None and om.offset >= 0}

    async def end_offsets(self, topics: Sequence[str], partitions: int) -> dict[tuple[str, int], int]:
        from aiokafka.structs import TopicPartition

        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        if not tps:
            return {}
        ends = await self._consumer.end_offsets(tps)
        return {(tp.topic, tp.partition): int(o) for tp, o in ends.items()}

    async def records_by_topic(self, prefixes: Sequence[str], partitions: int) -> dict[str, int]:
        """Records (end offsets summed over partitions) of every topic whose name starts with a prefix."""
        from aiokafka.structs import TopicPartition

        names = [n for n in await self._admin.list_topics() if n.startswith(tuple(prefixes))]
        tps = []
        for desc in await self._admin.describe_topics(names) if names else ():
            name = desc.get("topic", desc.get("name"))
            tps += [TopicPartition(name, p.get("partition", p.get("partition_index"))) for p in desc["partitions"]]
        out: dict[str, int] = {}
        for tp, o in (await self._consumer.end_offsets(tps)).items() if tps else ():
            out[tp.topic] = out.get(tp.topic, 0) + int(o)
        return {t: n for t, n in sorted(out.items()) if n}


# ---------------------------------------------------------------------------------------------
# process stats from /proc

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS in KiB (0 when the process is gone)."""
    out = {"VmHWM": 0, "VmRSS": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in out:
                out[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def proc_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rfind(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return 0.0


def _local_broker(bootstrap: str) -> tuple[int, Path] | None:
    """(pid, data directory) of a broker on this machine started from a `server.properties`
    (`deploy/kafka/localkafka.py`: the project's own, or one a test started) whose listener is the
    address we talk to; None for a remote broker or one started otherwise."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"kafka.Kafka" not in args:
                continue
            props = Path(args[-2].decode() if args[-1] == b"" else args[-1].decode()).read_text()
        except (OSError, UnicodeDecodeError, IndexError):
            continue  # gone meanwhile, or not ours to read
        conf = dict(line.split("=", 1) for line in props.splitlines() if "=" in line and not line.startswith("#"))
        listeners = conf.get("listeners", "").split(",")
        if any(lst.endswith(f"//{host}:{port}") or lst.endswith(f"//127.0.0.1:{port}") for lst in listeners):
            data = Path(conf.get("log.dirs", "").split(",")[0])
            return int(proc.name), data
    return None


def broker_pid(bootstrap: str) -> int | None:
    """The pid of a local broker when that is the one we talk to (for its CPU share)."""
    b = _local_broker(bootstrap)
    return b[0] if b is not None else None


def local_data_dir(bootstrap: str) -> Path | None:
    """A local broker's data directory (its `log.dirs`) when that is the one we talk to."""
    b = _local_broker(bootstrap)
    return b[1] if b is not None and b[1].is_dir() else None


def percentiles(values: list[float], ps: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles (plus max) of `values`; empty dict when there are none."""
    if not values:
        return {}
    s = sorted(values)
    out: dict[str, float] = {}
    for p in ps:
        k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
        out[f"p{p:g}".replace(".", "_")] = round(s[k], 2)
    out["max"] = round(s[-1], 2)
    out["mean"] = round(sum(s) / len(s), 2)
    return out


def expected_counts(ds: Dataset, partitions: int) -> dict[str, int]:
    """What each internal stage should see for the data set (an oracle from the pure functions):
    raw bodies, agent actions, normalized events written to `split` by `split_webhooks` (two hops),
    those the conversation stage forwards there (`forwarded`, one hop: events of bodies not keyed by
    their conversation), and the survivors of dedupe (unique idempotency keys per
    conversation) written to `events`."""
    from aiokafka.partitioner import murmur2

    from streams.rules.normalize import split_body

    raw = actions = split = forwarded = 0
    seen: set[tuple[str, str]] = set()
    for r in ds.records:
        if r.attr != "raw":
            actions += 1
            continue
        raw += 1
        res = split_body(r.value)
        split += len(res.events)
        for e in res.events:
            seen.add((e.conversation_key, e.idempotency_key))
            key = e.conversation_key.encode()
            forwarded += r.key != key or (murmur2(key) & 0x7FFFFFFF) % partitions != r.partition
    return {"raw": raw, "actions": actions, "split": split, "forwarded": forwarded, "events": len(seen)}


def mid_kind(value: bytes) -> str:
    """What kind of message a raw body carrying a message id is (for the 'missing' breakdown):
    `csat_digit` (a one-digit text: a CSAT answer when a survey is pending, which reaches no
    console topic by design), `echo`, `message`, or `invalid` (a body that does not parse)."""
    import orjson

    try:
        body = orjson.loads(value)
        msg = body["entry"][0]["messaging"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "invalid"
    if not isinstance(msg, dict):
        return "invalid"
    if msg.get("is_echo"):
        return "echo"
    text = msg.get("text")
    if isinstance(text, str) and len(text) == 1 and text.isdigit():
        return "csat_digit"
    return "message"

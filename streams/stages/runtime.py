"""The state-first batch runner: a stage's state and outputs land together, whatever crashes.

Decision B of the team plan; the argument is in docs/architecture.md, "Delivery guarantees".

A stage agent takes a batch of records (`Stream.noack_take`: faust acks nothing by itself) and
hands it to `StateFirstRunner.run_batch`. For each record, in order, the runner decodes it
(`Stage.parse`), skips what the key's state already includes (the offset guard,
`streams.rules.guard`), decides (`Stage.decide`, the pure rules behind it) and keeps the outcome in
a *unit*: the new value of every key touched (coalesced: one write per key per unit) carrying
`pending`, the outputs of this unit's inputs of that key tagged by input, and the outputs
themselves. A record whose processing raises goes to the dead-letter topic and the batch moves on.

A unit is flushed in two steps: (1) every dirty key is written once (the table's local store plus
one changelog record on the input's partition) and the changelog acks are awaited: the state is
durable; (2) the outputs are sent and their acks awaited. Only after the last unit of a batch does
the agent ack the batch's records, and faust commits only acked offsets. With `start_batch` (the
unit pipeline, `StateFirstRunner._flush`) the last unit's values go into an overlay the next units
read, and both steps run in the background while the next batch is taken and decided, chained: a
unit's changelog records after the previous unit's were acknowledged, its outputs after the previous
unit's were. A redelivered record (its
offset at or below the key's applied offset for its topic-partition) is not decided again: the
outputs pending for it are sent again, with the same ids. Any failed write raises `WriteFailed`
and the agent ends the process (`crash_worker`): nothing continues on state that may differ from
the changelog.

Timers (decision D) run on each partition's stream time: a tick record proves that the inputs
written before its wall time have been consumed (`streams.rules.wheel.StreamClock`); the wheel's
due buckets are then fired as `timer` inputs whose `now` is the stream time. Per partition the
runner keeps one small meta value (`\\0part:<partition>`): stream time, the wheel's cursor and the
plan of the firing in progress, the durable counters fed by decision notes (open conversations and
queue depth per skill) and the offsets those counters include.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, Protocol

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import TopicPartition
from faust.serializers import codecs
from faust.streams import _current_event
from faust.types import TP

from schemas.events import Source
from streams.core import deadletter, metrics, serde
from streams.rules import guard, wheel
from streams.rules.conversation.api import Input
from streams.rules.wheel import Tick

log = logging.getLogger("messenger_streams.runtime")

EXIT_WRITE_FAILED = 70  # EX_SOFTWARE: a write to Kafka failed; state may differ from the changelog
META_PREFIX = "\x00part:"
LEGACY_CURSOR_PREFIX = "\x00cursor:"
HELD_WARN_SECONDS = 30.0  # stream time held this long (waiting for data or for commits) is logged
PURGE_AFTER_MS = 300_000  # a deleted key's guard is kept this long (stream time) before its tombstone
UNIT_MAX_KEYS = 1_000  # dirty keys and wheel slots per unit
UNIT_MAX_OUTPUTS = 5_000
# a key's state plus its pending outputs of the unit; the unit is flushed beyond, so a changelog value
# stays under 16 KB but for the outputs of its last input (`test_changelog_values_stay_small_in_a_burst`)
KEY_VALUE_TARGET_BYTES = 12_288
MAX_STATE_BYTES = 262_144  # a bigger state is refused (dead letter): its write would fail
MAX_INPUT_OUTPUT_BYTES = 262_144  # the outputs of one input
MAX_BUCKETS_PER_TICK = 86_400  # a day of wheel buckets per tick; the rest on the next ticks
UNIT_MAX_JOURNAL = 128  # keys whose counter share changed, per partition and unit (~80 B each in the meta)
PIPELINE_DEPTH = 2  # units staged (`StateFirstRunner._flush`) whose changelog records or outputs are not all acked

TICK_KEY = b"\x00tick"


class WriteFailed(RuntimeError):
    """A changelog or output record was not acknowledged by Kafka: the process must end."""


class BadRecord(ValueError):
    """A record that cannot be processed, with the dead-letter reason to file it under."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


def crash_worker(exc: BaseException) -> NoReturn:
    """End the worker at once, without committing anything: what was not acked is redelivered.

    A graceful faust shutdown would wait for the unacked records of the failed batch and commit
    what it can; a hard exit is what the state-first argument is proven against (SIGKILL)."""
    log.critical("a write to Kafka failed, exiting so that nothing continues on unwritten state: %r", exc,
                 exc_info=exc)
    logging.shutdown()
    os._exit(EXIT_WRITE_FAILED)


def is_too_large(exc: BaseException) -> bool:
    """True when a send failed because the record is over the producer's or broker's size limit
    (a property of that record, not of the producer: dead-letter it and go on)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, MessageSizeTooLargeError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


# --------------------------------------------------------------------------------------------
# records, outputs, steps


@dataclass(slots=True)
class Record:
    """One consumed record, independent of faust (`event` is faust's, for the agent's ack)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: Sequence[tuple[str, bytes]] = ()
    event: Any = None

    @property
    def src(self) -> str:
        return guard.src_id(self.topic, self.partition, self.offset)

    @classmethod
    def of_event(cls, event: Any) -> Record:
        """The record of a faust event."""
        msg = event.message
        value = event.value
        ts = msg.timestamp
        return cls(
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            key=msg.key if isinstance(msg.key, bytes) else None,
            value=value if isinstance(value, bytes) else None,
            timestamp_ms=int(ts * 1000) if ts else int(time.time() * 1000),
            headers=list(msg.headers or ()),
            event=event,
        )


@dataclass(frozen=True, slots=True)
class Out:
    """One record to produce: to `topic`, keyed by `key`, JSON `value`; `label` is for the
    stage's metrics when it is acknowledged (not stored: re-sent outputs are not counted again)."""

    topic: str
    key: str | bytes | None
    value: bytes
    label: tuple[str, str] | None = None


@dataclass(slots=True)
class Step:
    """What one input did, as the stage turned the rules' decision into records.

    `deltas` are changes of the per-partition counters: (counter, label, +n/-n)."""

    state: dict[str, Any] | None
    state_bytes: bytes | None
    outputs: list[Out]
    arms: list[int]
    deltas: list[tuple[str, str, int]] = field(default_factory=list)
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Keyed:
    """A decoded input for one key."""

    key: str
    inp: Input


@dataclass(frozen=True, slots=True)
class Split:
    """A record that holds several inputs: a raw webhook body split in place (one hop, issue 18).

    `inputs` are the inputs of keys of the record's own partition, in the body's order; `outs` are
    records that go out whatever the keys' state says (the body's events of other partitions,
    forwarded to the split topic, and the dead letters of its bad items). They follow from the
    record's bytes alone, so they are sent again on every delivery (at-least-once; the forwarded
    events are deduplicated by their conversation)."""

    inputs: list[Keyed]
    outs: list[Out]


@dataclass(frozen=True, slots=True)
class TickIn:
    """A decoded tick."""

    tick: Tick


def _lagging(tick: Tick, progress: Callable[[str], int]) -> str:
    """What a waiting tick waits for: each input topic not consumed up to the tick's end offset."""
    return ", ".join(f"{topic} at {progress(topic)} of {end}" for topic, end in sorted(tick.ends.items())
                     if progress(topic) < end)


def _uncommitted(topic: str, want: Mapping[int, int], committed: Mapping[int, int]) -> str:
    """What a tick waits for upstream: each partition the group has not committed up to its end."""
    return ", ".join(f"{topic} partition {part} committed {committed.get(part, -1)} of {end}"
                     for part, end in sorted(want.items()) if end > 0 and committed.get(part, -1) < end)


class HeldWarning:
    """Logs (once a minute at most, per partition) that stream time has been held back for more
    than `HELD_WARN_SECONDS`, and by what: timers wait meanwhile. Bounded by the partitions."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._since: dict[int, float] = {}
        self._logged: dict[int, float] = {}

    def clear(self, partition: int) -> None:
        self._since.pop(partition, None)

    def check(self, partition: int, detail: Callable[[], str]) -> None:
        now = time.monotonic()
        since = self._since.setdefault(partition, now)
        if now - since >= HELD_WARN_SECONDS and now - self._logged.get(partition, -1e9) >= 60.0:
            self._logged[partition] = now
            log.warning("%s for %.0f s (timers wait): %s", self.what.format(p=partition), now - since, detail())


class FactSeq:
    """Numbers the facts that one consumed record produces (`index` of decision C)."""

    def __init__(self, start: int = 0) -> None:
        self.n = start

    def next(self) -> int:
        n = self.n
        self.n += 1
        return n


class Stage(Protocol):
    """What a stage plugs into the runner."""

    facts_topic: str | None  # outputs to this topic are numbered by FactSeq

    def parse(self, rec: Record) -> Keyed | Split | TickIn:
        """Decode a record; raises BadRecord (or any exception: then `processing_error`)."""
        ...

    def decide(self, state: dict[str, Any] | None, inp: Input, key: str, rec: Record, facts: FactSeq) -> Step:
        """The outcome of one input (pure but for metrics of the decision itself)."""
        ...

    def sent(self, out: Out) -> None:
        """Called for every output once Kafka acknowledged it (metrics)."""
        ...


class Store(Protocol):
    """A table as the runner uses it: local reads and writes, and changelog records that return
    their ack. The runner writes a unit's values, locally and to the changelog, once the previous
    unit's changelog records were acknowledged (the unit pipeline, `StateFirstRunner._flush`)."""

    def get(self, key: str) -> Any: ...

    def write(self, key: str, data: bytes | None, partition: int, event: Any) -> None:
        """Replace the local copy of a key's value (None: delete it); no changelog record."""

    async def send(self, key: str, data: bytes | None, partition: int) -> Awaitable[Any]:
        """Enqueue the changelog record of a key's value (None: a tombstone), in call order; the
        returned awaitable resolves on Kafka's ack."""
        ...

    @property
    def persistent(self) -> bool:
        """The local copy outlives the process (RocksDB), rather than being rebuilt from the changelog."""


class Producer(Protocol):
    """Enqueue one record; the returned awaitable resolves when Kafka acknowledged it."""

    async def send(
        self, topic: str, key: bytes | None, value: bytes, partition: int | None = None
    ) -> Awaitable[Any]: ...

    def send_now(self) -> None:
        """Send what was enqueued without waiting out the linger: the caller awaits its acks next."""


# --------------------------------------------------------------------------------------------
# stored values


def meta_key(partition: int) -> str:
    return f"{META_PREFIX}{partition}"


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=serde.OPTIONS)


@dataclass(slots=True)
class Entry:
    """The stored value of one key: the rules' state plus what the runner needs.

    Stored form `{"v": 2, "s": state, "g": applied, "t": armed due times, "x": purge time,
    "r": the runner incarnation that wrote it, "c": the key's share of the partition's counters,
    "p": pending}`; `pending` is a list of
    `[src, [[topic, key, value], ...], [[counter, label, n], ...], runner incarnation]`. A stored value without
    `"v": 2` is a state written before this runner (legacy)."""

    state: dict[str, Any] | None = None
    applied: dict[str, int] = field(default_factory=dict)
    timers: list[int] = field(default_factory=list)
    purge_at: int | None = None
    pending: list[list[Any]] = field(default_factory=list)
    legacy: bool = False
    state_bytes: bytes | None = None
    run: str | None = None  # the runner incarnation that wrote `pending`
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # this key's share of the counters

    @classmethod
    def load(cls, value: Any) -> Entry | None:
        if value is None:
            return None
        if isinstance(value, dict) and value.get("v") == 2:
            return cls(
                state=value.get("s"),
                applied=dict(value.get("g") or {}),
                timers=list(value.get("t") or []),
                purge_at=value.get("x"),
                pending=list(value.get("p") or []),
                run=value.get("r"),
                counts=value.get("c") or {},
            )
        return cls(state=value if isinstance(value, dict) else None, legacy=True)

    def stored(self) -> dict[str, Any]:
        return {"v": 2, "s": self.state, "g": self.applied, "t": self.timers, "x": self.purge_at,
                "p": self.pending, "r": self.run, "c": self.counts}

    def encode_settled(self, run_id: str) -> tuple[bytes, bytes | None]:
        """The stored bytes, and (when this incarnation has pending entries on the key) the bytes
        without them, which the local copy keeps once they were acknowledged (`_settle`): one
        encoding of the state and the guard for both."""
        head = self._head()
        parts = [_pending_bytes(p) for p in self.pending]
        data = head + b",".join(parts) + b"]}"
        if not any(_own(p, run_id) for p in self.pending):
            return data, None
        kept = (b for b, p in zip(parts, self.pending, strict=True) if not _own(p, run_id))
        return data, head + b",".join(kept) + b"]}"

    def _head(self) -> bytes:
        """The stored bytes up to the pending entries' list (opened)."""
        state = self.state_bytes if self.state_bytes is not None else _dumps(self.state)
        return b"".join((
            b'{"v":2,"s":', state, b',"g":', _dumps(self.applied), b',"t":', _dumps(self.timers),
            b',"x":', _dumps(self.purge_at), b',"r":', _dumps(self.run), b',"c":', _dumps(self.counts),
            b',"p":[',
        ))

    def pending_for(self, src: str) -> list[Any] | None:
        for p in self.pending:
            if p[0] == src:
                return p
        return None


def _value_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else _dumps(value)


@functools.lru_cache(maxsize=256)
def _name_bytes(name: str | None) -> bytes:
    """JSON of a topic name or runner incarnation: few distinct values, written with every output."""
    return _dumps(name)


def _pending_bytes(p: list[Any]) -> bytes:
    src, outs, deltas = p[:3]
    outs_b = b",".join(
        b"[" + _name_bytes(topic) + b"," + _dumps(key) + b"," + _value_bytes(value) + b"]" for topic, key, value in outs
    )
    run = _name_bytes(p[3] if len(p) > 3 else None)
    return b"[" + _dumps(src) + b",[" + outs_b + b"]," + _dumps(deltas) + b"," + run + b"]"


def new_meta(legacy_cursor: Any = None) -> dict[str, Any]:
    """A partition's meta value before anything was stored for it."""
    return {
        "v": 1,
        "clock": 0,  # stream time, epoch ms
        "tick": -1,  # offset of the tick that moved it last (each tick plans at most once)
        "cursor": legacy_cursor if isinstance(legacy_cursor, int) else None,  # last bucket planned
        "low": None,  # lowest bucket armed while no cursor exists yet
        "firing": None,  # {"src", "upto", "done", "sent", "n"}: the plan of the last firing
        "gc": None,  # last bucket whose slots were deleted for sure
        "gc_to": None,  # last bucket whose slots the unit that wrote this value deleted
        "counts": {},  # counter → label → value: the sum of the keys' shares
        "j": {},  # key → share, for the keys whose share the unit that wrote this value changed
    }


def _copy(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


# --------------------------------------------------------------------------------------------
# the unit of work: what is written (and awaited) before outputs go out


class Reader(Protocol):
    def get(self, key: str) -> Any: ...


class Overlay:
    """The table as the runner reads it: the values of units in flight that are not in the local
    store yet (`StateFirstRunner._flush`), over the store. Bounded by the keys of PIPELINE_DEPTH units."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.values: dict[str, bytes | None] = {}

    def get(self, key: str) -> Any:
        values = self.values
        if key in values:
            data = values[key]
            return None if data is None else orjson.loads(data)
        return self.store.get(key)


class Unit:
    """The keys, slots, metas and outputs of one write/ack/send cycle."""

    def __init__(self, store: Reader, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.entries: dict[str, Entry | None] = {}
        self.dirty: dict[str, int] = {}  # key → partition
        self.deleted: dict[str, int] = {}
        self.events: dict[int, Any] = {}  # partition → an event of it (made current for store writes)
        self.slot_values: dict[str, Any] = {}
        self.slot_parts: dict[str, int] = {}
        self.metas: dict[int, dict[str, Any]] = {}
        self.dirty_metas: set[int] = set()
        self.outputs: list[Out] = []
        self.resent: dict[str, list[list[Any]]] = {}  # key → pending entries re-sent in this unit
        self.touched: set[str] = set()  # keys whose pending was reset in this unit
        self.pending_bytes: dict[str, int] = {}
        self.visited: set[str] = set()  # keys visited by a wheel walk in this unit
        self.journal: dict[int, dict[str, dict[str, dict[str, int]]]] = {}  # partition → key → new share
        self.collected: set[int] = set()  # partitions whose fired slots this unit deletes
        self.fired: dict[int, str] = {}  # partition → src of the firing this unit completes (once acked)
        self.settled: dict[str, bytes] = {}  # key → its written value without this incarnation's pending
        self.own: list[str] = []  # src of this incarnation's pending entries in its written values
        self.cut = False

    # reads ------------------------------------------------------------------------------------
    def entry(self, key: str) -> Entry | None:
        if key in self.entries:
            return self.entries[key]
        e = Entry.load(self.store.get(key))
        self.entries[key] = e
        return e

    def meta(self, partition: int) -> dict[str, Any]:
        m = self.metas.get(partition)
        if m is None:
            stored = self.store.get(meta_key(partition))
            m = {**new_meta(), **_copy(stored)} if isinstance(stored, dict) else new_meta(
                self.store.get(f"{LEGACY_CURSOR_PREFIX}{partition}"))
            self.metas[partition] = m
        return m

    def slots(self, partition: int) -> _SlotView:
        return _SlotView(self, partition)

    # writes -----------------------------------------------------------------------------------
    def touch(self, key: str, partition: int, event: Any, keep: Callable[[list[Any]], bool]) -> Entry:
        """The working entry of `key` for a change: on first change in this unit its pending is
        reset to what this unit re-sent and what `keep` says may still be needed."""
        e = self.entry(key)
        if e is None:
            e = Entry()
        if key not in self.touched:
            resent = self.resent.get(key, [])
            pending = list(resent) + [p for p in e.pending if p not in resent and keep(p)]
            e = Entry(e.state, dict(e.applied), list(e.timers), e.purge_at, pending,
                      False, e.state_bytes, self.run_id, e.counts)
            self.touched.add(key)
            self.pending_bytes[key] = 0
        self.entries[key] = e
        self.dirty[key] = partition
        self.deleted.pop(key, None)
        if event is not None:
            self.events.setdefault(partition, event)
        return e

    def delete(self, key: str, partition: int, event: Any) -> None:
        self.entries[key] = None
        self.dirty.pop(key, None)
        self.deleted[key] = partition
        if event is not None:
            self.events.setdefault(partition, event)

    def meta_dirty(self, partition: int, event: Any = None) -> dict[str, Any]:
        m = self.meta(partition)
        self.dirty_metas.add(partition)
        if event is not None:
            self.events.setdefault(partition, event)
        return m

    def full(self) -> bool:
        return (
            self.cut
            or len(self.dirty) + len(self.deleted) + len(self.slot_values) >= UNIT_MAX_KEYS
            or len(self.outputs) >= UNIT_MAX_OUTPUTS
            or any(len(j) >= UNIT_MAX_JOURNAL for j in self.journal.values())
        )

    def empty(self) -> bool:
        return not (self.dirty or self.deleted or self.slot_values or self.dirty_metas or self.outputs)

    def writes_partition(self, partition: int) -> bool:
        """True when this unit has a changelog write of `partition` (a key, a wheel slot, its meta)."""
        return (
            partition in self.dirty_metas
            or partition in self.dirty.values()
            or partition in self.deleted.values()
            or partition in self.slot_parts.values()
            or bool(self.resent)
        )


class _SlotView:
    """The wheel's view of one partition's slots: unit overlay first, then the store."""

    def __init__(self, unit: Unit, partition: int) -> None:
        self.unit = unit
        self.partition = partition

    def get(self, name: str) -> Any:
        if name in self.unit.slot_values:
            return self.unit.slot_values[name]
        return self.unit.store.get(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.unit.slot_values[name] = value
        self.unit.slot_parts[name] = self.partition


# --------------------------------------------------------------------------------------------
# the runner


class StateFirstRunner:
    """Runs batches of a stage's records state-first (see the module docstring)."""

    def __init__(
        self,
        stage: Stage,
        store: Store,
        producer: Producer,
        *,
        dlq_topic: str,
        dead_letter_max_bytes: int = deadletter.MAX_LETTER_BYTES,
        committed: Callable[[str, int], int | None] = lambda topic, partition: None,
        stage_name: str = "conversation",
    ) -> None:
        self.stage = stage
        self.store = store
        self.producer = producer
        self.dlq_topic = dlq_topic
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.committed = committed
        self.stage_name = stage_name
        self.run_id = uuid.uuid4().hex[:12]  # this incarnation: pending written by another may be unacked
        self.clock = wheel.StreamClock()
        self.consumed: dict[tuple[str, int], int] = {}  # (topic, partition) → next offset not consumed
        self.completed: dict[int, str] = {}  # partition → src of the plan this runner fired and saw acked
        self.stream_times: dict[int, int] = {}  # partition → stream time this runner moved it to (epoch ms)
        self._held = HeldWarning("stream time of partition {p} waits for its input")
        self._errors = metrics.BoundLabels(metrics.PROCESSING_ERRORS)
        self._waits = (metrics.FLUSH_WAIT.labels(stage_name, "changelog"),
                       metrics.FLUSH_WAIT.labels(stage_name, "outputs"))
        # the unit pipeline (`_flush`): the last unit's changelog acks and its output acks, the units
        # in flight (at most PIPELINE_DEPTH), this incarnation's pending entries they wrote (kept by
        # `_touch` until acknowledged), and the unit whose local value a key holds (`_settle`)
        self._logged: asyncio.Future[None] | None = None
        self._tail: asyncio.Future[None] | None = None
        self._flight: list[asyncio.Future[None]] = []
        self._unacked: Counter[str] = Counter()
        self._writer: dict[str, Unit] = {}
        self._overlay = Overlay(store)

    # public -----------------------------------------------------------------------------------
    async def run_batch(self, records: Sequence[Record]) -> None:
        """Process records in order; returns once every output is acknowledged by Kafka.
        Raises WriteFailed when a write failed (the caller must end the process)."""
        await (await self.start_batch(records))

    async def start_batch(self, records: Sequence[Record]) -> asyncio.Future[None]:
        """Process records in order; returns once their last unit is written locally, with a
        future that resolves once Kafka acknowledged its changelog records and then its outputs:
        only then may the records be acked. The next batch may be taken and decided meanwhile (the
        unit pipeline, `_flush`): its changelog records are sent after these were acknowledged, its
        outputs after these were. Raises WriteFailed when a write failed, and the future raises it
        when a record was not acknowledged (the caller must end the process either way)."""
        unit = self._unit()
        for rec in records:
            unit = await self._one(unit, rec)
            tp = (rec.topic, rec.partition)
            if rec.offset + 1 > self.consumed.get(tp, 0):
                self.consumed[tp] = rec.offset + 1
            if unit.full():
                unit = await self._flush(unit)
        await self._flush(unit, defer=True)
        tail = self._tail
        if tail is None:
            tail = asyncio.get_running_loop().create_future()
            tail.set_result(None)
        return tail

    def refresh_stream_lag(self, owned: set[int]) -> None:
        """Keep `messenger_stream_time_lag_seconds` growing while a partition's stream time stands
        still (it is otherwise set only when the time moves), and drop the partitions no longer
        owned (another worker reports them)."""
        now = time.time()
        for p in list(self.stream_times):
            if p in owned:
                metrics.STREAM_TIME_LAG.labels(str(p)).set(max(0.0, now - self.stream_times[p] / 1000))
            else:
                del self.stream_times[p]
                with contextlib.suppress(KeyError):
                    metrics.STREAM_TIME_LAG.remove(str(p))

    def progress(self, topic: str, partition: int) -> int:
        """The next offset of `topic`/`partition` not yet consumed (what faust last committed,
        or what this runner processed since)."""
        return max(self.consumed.get((topic, partition), 0), self.committed(topic, partition) or 0)

    def _unit(self) -> Unit:
        return Unit(self._overlay, self.run_id)

    # one record -------------------------------------------------------------------------------
    async def _one(self, unit: Unit, rec: Record) -> Unit:
        p = rec.partition
        if unit.meta(p).get("r") != self.run_id:
            unit = await self._adopt(unit, p, rec)
        try:
            parsed = self.stage.parse(rec)
        except BadRecord as exc:
            self._dead(unit, rec, exc.reason, exc.error)
            return unit
        except Exception as exc:  # noqa: BLE001 - one record must never stop the stage; logged with traceback
            self._failed(rec, exc, "decoding")
            self._dead(unit, rec, "processing_error", f"{type(exc).__name__}: {exc}")
            return unit
        if isinstance(parsed, TickIn):
            if rec.offset <= unit.meta(p)["tick"]:
                return unit  # redelivered: it moved the clock already (a tick plans at most once)
            tick = replace(parsed.tick, src=rec.src)
            proven = self.clock.offer(p, tick, lambda topic: self.progress(topic, p))
        else:
            if isinstance(parsed, Split):
                unit.outputs.extend(parsed.outs)
                facts = FactSeq()  # one numbering for the facts of every input of the record
                for key, inps in _by_key(parsed.inputs).items():
                    self._input(unit, rec, key, inps, facts)
            else:
                self._input(unit, rec, parsed.key, [parsed.inp], FactSeq())
            if not self.clock.waiting(p):
                return unit
            # this record may be the data a waiting tick was waiting for
            self.consumed[(rec.topic, p)] = max(self.consumed.get((rec.topic, p), 0), rec.offset + 1)
            proven = self.clock.poll(p, lambda topic: self.progress(topic, p))
        if proven is not None:
            self._held.clear(p)
            unit = await self._advance(unit, p, proven, rec)
        elif (oldest := self.clock.oldest(p)) is not None:
            self._held.check(p, lambda: _lagging(oldest, lambda topic: self.progress(topic, p)))
        return unit

    async def _adopt(self, unit: Unit, p: int, rec: Record) -> Unit:
        """First record of a partition for this incarnation (after a start, a crash, a
        rebalance): the last firing of its wheel may not have been acknowledged, or not finished:
        walk it again before anything else touches the partition's keys, unless the record whose
        batch carried it is committed (then it was, and only a later meta write was missing)."""
        meta = unit.meta_dirty(p, rec.event)
        for key, journaled in (meta.get("j") or {}).items():
            entry = unit.entry(key)
            stored = entry.counts if entry is not None else {}
            if stored != journaled:  # the meta counted a share the key's write did not keep
                meta["counts"] = _added(meta["counts"], _deltas(journaled, stored))
        meta["j"], meta["r"] = {}, self.run_id  # adopted (written with this unit)
        meta["gc_to"] = meta["gc"]  # deletes asked for by the last unit may not have landed
        f = meta["firing"]
        if f is not None and f["sent"] < f["upto"]:
            if self._committed_src(f.get("by")):
                # a firing completed before a clean stop (or a rebalance) whose meta was not written
                # again since: its outputs were all acknowledged; walking it again would send them twice
                f["sent"], f["n_sent"] = f["upto"], f["n"]
                self._collect(unit, p, meta)  # its slots, as the walk would have deleted them
                return unit
            return await self._fire(unit, p, _plan_record(f["src"], rec.event), recovering=True)
        return unit

    def _committed_src(self, src: Any) -> bool:
        """True when the record `src` (`topic/partition/offset`, maybe `#item` or `#bucket` after it)
        is committed: its batch was acked."""
        if not isinstance(src, str):
            return False  # a plan written before plans named their carrier: walked again
        topic, partition, offset = src.partition("#")[0].rsplit("/", 2)
        committed = self.committed(topic, int(partition))
        return committed is not None and int(offset) < committed

    def _input(self, unit: Unit, rec: Record, key: str, inps: Sequence[Input], facts: FactSeq) -> None:
        """The inputs one record holds for one key (one, or several items of a raw body split in
        place), decided in order; the key's guard covers them together (one offset)."""
        p = rec.partition
        entry = unit.entry(key)
        if entry is not None and guard.is_applied(entry.applied, rec.topic, p, rec.offset):
            # redelivered: the key is durable, and so is the meta written before it
            metrics.REDELIVERED.labels(self.stage_name).inc()
            found = entry.pending_for(rec.src)
            if found is not None:  # else its outputs were acked before a later unit replaced `pending`
                self._resend(unit, key, found)
            self._rewrite(unit, key, p, rec.event, entry)
            return
        for inp in inps:
            entry = unit.entry(key)
            try:
                step = self.stage.decide(entry.state if entry else None, inp, key, rec, facts)
                self._check(step)
            except Exception as exc:  # noqa: BLE001 - dead-lettered with reason, logged with traceback
                self._failed(rec, exc, f"key {key!r}")
                letter = self._dead(unit, rec, "processing_error", f"{type(exc).__name__}: {exc}")
                # the key's guard covers this offset once a later input is applied: keep the letter
                # pending on the key, so that a redelivery sends it again instead of skipping it
                e = self._touch(unit, key, p, rec.event)
                guard.mark_applied(e.applied, rec.topic, p, rec.offset)
                _pend(e, rec.src, [[letter.topic, key, letter.value]], [], self.run_id)
                if e.state is None and e.purge_at is None:
                    e.purge_at = max(unit.meta(p)["clock"], rec.timestamp_ms) + PURGE_AFTER_MS
                    self._arm(unit, p, key, e.purge_at, rec.event)
                continue
            if step.duplicate:
                continue
            self._apply(unit, key, p, rec, rec.src, step, guarded=True)

    def _check(self, step: Step) -> None:
        if step.state_bytes is not None and len(step.state_bytes) > MAX_STATE_BYTES:
            raise ValueError(f"state of {len(step.state_bytes)} bytes, over {MAX_STATE_BYTES}")
        size = sum(len(o.value) for o in step.outputs)
        if size > MAX_INPUT_OUTPUT_BYTES:
            raise ValueError(f"outputs of {size} bytes, over {MAX_INPUT_OUTPUT_BYTES}")

    def _apply(self, unit: Unit, key: str, p: int, rec: Record, src: str, step: Step, *, guarded: bool) -> None:
        """Put one input's outcome in the unit. `guarded`: the input is the record itself (its
        offset goes in the key's guard); a timer fired by a tick is not (the firing plan in the
        meta says what was fired)."""
        e = self._touch(unit, key, p, rec.event)
        e.state = step.state
        e.state_bytes = step.state_bytes
        if guarded:
            guard.mark_applied(e.applied, rec.topic, p, rec.offset)
        if step.outputs or step.deltas:
            _pend(e, src, [[o.topic, o.key, o.value] for o in step.outputs], [list(d) for d in step.deltas],
                  self.run_id)
            # about what the entry adds to the key's stored value (`_pending_bytes`): ids and topics too
            size = len(src) + 24 + sum(len(o.value) + len(o.topic) + len(o.key or "") + 8 for o in step.outputs)
            unit.pending_bytes[key] = unit.pending_bytes.get(key, 0) + size
            if unit.pending_bytes[key] + len(step.state_bytes or b"") >= KEY_VALUE_TARGET_BYTES:
                unit.cut = True
        unit.outputs.extend(step.outputs)
        if step.deltas:
            e.counts = _added(e.counts, step.deltas)
            self._share(unit, p, key, step.deltas, e.counts, rec.event)
        meta = unit.meta(p)
        if step.state is None:
            e.timers = []
            e.purge_at = max(meta["clock"], rec.timestamp_ms) + PURGE_AFTER_MS
            self._arm(unit, p, key, e.purge_at, rec.event)
            return
        e.purge_at = None
        for due in step.arms:
            e.timers = wheel.add_armed(e.timers, due)
            self._arm(unit, p, key, due, rec.event)

    @staticmethod
    def _share(
        unit: Unit, p: int, key: str, deltas: Sequence[Sequence[Any]], share: dict[str, dict[str, int]], event: Any
    ) -> None:
        """Count a key's counter deltas in its partition's meta, journaling the key's new share:
        the meta is written before the keys, so a restarted runner can tell (`_adopt`) which
        shares the meta counts that never reached the key's stored value."""
        meta = unit.meta_dirty(p, event)
        meta["counts"] = _added(meta["counts"], deltas)
        unit.journal.setdefault(p, {})[key] = share

    def _touch(self, unit: Unit, key: str, p: int, event: Any) -> Entry:
        """The key's working entry for a change. A pending entry written by this runner in an
        earlier unit is dropped once that unit's outputs were acknowledged (kept while it is in
        flight, the unit pipeline); one written by another incarnation, which may have died
        before the acks, is kept until its input is committed: the input's redelivery sends it
        again, whatever other input touches the key first.

        With a store that outlives the process (`Store.persistent`, RocksDB), a value written by
        another incarnation may be ahead of the changelog: a local write whose record was lost with
        a SIGKILL stays on disk, and recovery replays only the changelog after the last
        acknowledged record. Its first change here rewrites it anyway; the wheel slots of its
        timers are written again with it (slots before keys), so the changelog, which a worker
        taking the partition over recovers from, never holds a key whose timer has no slot."""
        if not self.store.persistent:  # the memory store is rebuilt from the changelog: nothing ahead
            return unit.touch(key, p, event, self._maybe_needed)
        prior = unit.entry(key) if key not in unit.touched else None
        e = unit.touch(key, p, event, self._maybe_needed)
        if prior is not None and prior.run != self.run_id:
            slots = unit.slots(p)
            for due in [*e.timers, *([e.purge_at] if e.purge_at is not None else [])]:
                for name in wheel.bucket_keys(slots, p, self._arm(unit, p, key, due, event))[1]:
                    keys = slots.get(name)
                    if keys is not None and key in keys:
                        slots[name] = list(keys)  # the slot holding the key, written again
        return e

    def _rewrite(self, unit: Unit, key: str, p: int, event: Any, entry: Entry) -> None:
        """A redelivered input (or a firing walked again) that a value of another incarnation
        already includes: with a persistent store that value may be ahead of the changelog (see
        `_touch`), and the input's offset is committed after this unit, so the value is written
        again, in this unit and so before anything it re-sends."""
        if self.store.persistent and entry.run != self.run_id:
            self._touch(unit, key, p, event)

    def _maybe_needed(self, pending: list[Any]) -> bool:
        if _own(pending, self.run_id):
            return pending[0] in self._unacked  # written by a unit whose outputs are still in flight
        return not self._committed_src(str(pending[0]))

    def _arm(self, unit: Unit, p: int, key: str, due: int, event: Any) -> int:
        meta = unit.meta(p)
        cursor = meta["cursor"]
        bucket = wheel.arm(unit.slots(p), p, cursor, key, due)
        if cursor is None and (meta["low"] is None or bucket < meta["low"]):
            unit.meta_dirty(p, event)["low"] = bucket
        if event is not None:
            unit.events.setdefault(p, event)
        return bucket

    def _resend(self, unit: Unit, key: str, pending: list[Any]) -> bool:
        """Send a pending entry's outputs again (once per unit); False when already done."""
        done = unit.resent.setdefault(key, [])
        if any(p[0] == pending[0] for p in done):
            return False
        log.debug("sending again the outputs of %s for key %r", pending[0], key)
        metrics.RESENT.labels(self.stage_name).inc(len(pending[1]))
        for topic, out_key, value in pending[1]:
            unit.outputs.append(Out(topic, out_key, _value_bytes(value)))
        done.append(pending)
        if key in unit.touched:  # its pending was reset in this unit: keep this one until acked
            e = unit.entries[key]
            if e is not None and all(p[0] != pending[0] for p in e.pending):
                e.pending.append(pending)
        return True

    # ticks and the wheel ----------------------------------------------------------------------
    async def _advance(self, unit: Unit, p: int, tick: Tick, carrier: Record) -> Unit:
        """A tick whose data has been consumed: the partition's stream time moves to its `now`,
        and the wheel's buckets up to it are planned and fired: the passed ones, and the current
        one in part (its keys due by now fire; it stays above the cursor and is walked again).
        `carrier` is the record being processed: the tick itself, or the data record a held tick
        waited for; the firing's units belong to its batch."""
        event = carrier.event
        meta = unit.meta(p)
        tick_offset = int(tick.src.rsplit("/", 1)[1])
        if tick_offset <= meta["tick"]:
            return unit  # older than the tick that moved the clock last
        stream_time = max(meta["clock"], tick.now)
        cursor = meta["cursor"]
        last_full = wheel.last_due_bucket(stream_time)
        if cursor is None:
            cursor = min(meta["low"] - 1, last_full) if meta["low"] is not None else last_full
        upto = min(wheel.bucket_of(stream_time), cursor + MAX_BUCKETS_PER_TICK)
        new_cursor = max(cursor, min(last_full, upto))
        self.stream_times[p] = stream_time
        metrics.STREAM_TIME_LAG.labels(str(p)).set(max(0.0, time.time() - stream_time / 1000))
        slots = unit.slots(p)
        if upto <= cursor or not any(slots.get(wheel.slot_key(p, b)) for b in range(cursor + 1, upto + 1)):
            # nothing armed in the buckets reached (most seconds): no plan, no walk
            meta = unit.meta_dirty(p, event)
            meta["clock"], meta["cursor"], meta["tick"] = stream_time, new_cursor, tick_offset
            return unit
        # Everything of this partition consumed before this tick is made durable (and its outputs
        # acked) before the plan: a durable stream time never covers an input whose state could still
        # be lost. Other partitions' writes may share the unit: their stream times are their own.
        if unit.writes_partition(p):
            unit = await self._flush(unit)
        meta = unit.meta_dirty(p, event)
        meta["clock"], meta["cursor"], meta["tick"] = stream_time, new_cursor, tick_offset
        # "by": the record whose batch carries the firing; once it is committed, that batch and so
        # every unit of the firing were acknowledged (`_adopt` need not walk it again)
        meta["firing"] = {"src": tick.src, "lo": cursor + 1, "upto": upto, "done": cursor, "sent": cursor,
                          "n": 0, "n_sent": 0, "by": carrier.src}
        # The plan is durable before any key fires: it is written in the same unit as the fired keys,
        # before them on the same changelog partition (`_flush` writes metas before keys), and Kafka
        # keeps a partition's records in order, so a durable fired key implies a durable plan. The
        # unit is not flushed here: the firings of the ticks of one batch share one write/ack cycle.
        return await self._fire(unit, p, _plan_record(tick.src, event), recovering=False)

    async def _fire(self, unit: Unit, p: int, rec: Record, *, recovering: bool) -> Unit:
        """Fire the planned buckets of partition `p`, flushing at bucket boundaries when the unit
        is full. The plan (`meta["firing"]`) says where it stands: buckets up to `sent` were fired
        and acknowledged, up to `done` fired in a unit whose meta is durable (its keys and outputs
        maybe not), up to `upto` planned. Recovering, the walk restarts after `sent`: a key whose
        entry shows it fired at that bucket for this plan has its outputs sent again; any other
        fires again (its state was lost, so were its outputs). Deltas are counted only past `done`
        (the meta has the earlier ones). Fact indexes restart from `n_sent` and replay exactly."""
        src = rec.src
        walked: tuple[int, int] | None = None  # (bucket, fact index) walked and flushed last
        while True:
            meta = unit.meta_dirty(p, rec.event)
            f = meta["firing"]
            if walked is not None:
                f["sent"], f["n_sent"] = walked  # the previous unit of this walk was acked
            elif not recovering:
                f["sent"], f["n_sent"] = f["done"], f["n"]
            self._collect(unit, p, meta)
            facts = FactSeq(f["n_sent"])
            b = f["sent"]
            while b < f["upto"]:
                b += 1
                for key in wheel.bucket_keys(unit.slots(p), p, b)[0]:
                    self._visit(unit, p, key, src, b, meta["clock"], rec, facts)
                if b >= f["done"]:
                    f["done"], f["n"] = b, facts.n
                if unit.full():
                    break
            walked = (b, facts.n)
            if b >= f["upto"] and not recovering:
                unit.fired[p] = src  # all acked with this unit: the next meta write may say so
                return unit
            unit = await self._flush(unit)
            if b >= f["upto"]:
                self.completed[p] = src  # all acked: the next meta write may say so
                return unit

    def _collect(self, unit: Unit, p: int, meta: dict[str, Any]) -> None:
        """Delete the slots of buckets whose firing was acknowledged (`sent`). The deletes are
        written after the meta that says so, and `gc` (deleted for sure) only catches up with
        `gc_to` (asked for) in a later unit, so a restarted worker can still walk every bucket it
        may need to send again, and deletes again what it cannot be sure was deleted."""
        f = meta["firing"]
        meta["gc"] = meta.get("gc_to", meta["gc"])
        start = meta["gc"] + 1 if meta["gc"] is not None else f["lo"]
        until = min(f["sent"], meta["cursor"])  # never the current bucket: it is walked again
        for b in range(start, until + 1):
            # last chunk first: a crash keeps the remaining chunks contiguous (walkable)
            for name in reversed(wheel.bucket_keys(unit.slots(p), p, b)[1]):
                unit.slot_values[name] = None
                unit.slot_parts[name] = p
        meta["gc_to"] = max(until, meta["gc"]) if meta["gc"] is not None else until
        unit.collected.add(p)

    def _visit(self, unit: Unit, p: int, key: str, src: str, b: int, now: int, rec: Record, facts: FactSeq) -> None:
        if key in unit.visited:
            return
        entry = unit.entry(key)
        if entry is None:
            return
        unit.visited.add(key)
        tag = f"{src}#{b}"
        fired = entry.pending_for(tag)
        if fired is not None:
            # fired here by this plan before a crash, and its entry is durable: same outputs again
            facts.n += sum(1 for o in fired[1] if o[0] == self.stage.facts_topic)
            self._resend(unit, key, fired)
            self._rewrite(unit, key, p, rec.event, entry)
            return
        if entry.state is None:
            if entry.purge_at is not None and entry.purge_at <= now:
                if entry.counts:  # a share left by rules that did not close it: no longer counted
                    self._share(unit, p, key, _deltas(entry.counts, {}), {}, rec.event)
                unit.delete(key, p, rec.event)
            return
        due, rest = wheel.split_due(entry.timers, now)
        if not due and not entry.legacy:
            return  # re-armed or cancelled since: a stale wheel entry (lazy deletion)
        inp = Input("timer", f"timer:{key}:{','.join(map(str, due)) or now}", now, {})
        try:
            step = self.stage.decide(entry.state, inp, key, rec, facts)
            self._check(step)
        except Exception as exc:  # noqa: BLE001 - one key's timer must not stop the partition's clock
            self._failed(rec, exc, f"timer of key {key!r}")
            letter = self._dead(unit, rec, "processing_error", f"timer of {key}: {type(exc).__name__}: {exc}")
            e = self._touch(unit, key, p, rec.event)
            e.timers = rest
            e.pending.append([tag, [[letter.topic, key, letter.value]], [], self.run_id])
            return
        self._touch(unit, key, p, rec.event).timers = rest
        self._apply(unit, key, p, rec, tag, step, guarded=False)

    # dead letters, errors ---------------------------------------------------------------------
    def _dead(self, unit: Unit, rec: Record, reason: str, error: str) -> Out:
        """Send a record to the dead-letter topic (with this unit's outputs)."""
        out = Out(self.dlq_topic, rec.key, letter_bytes(rec, reason, error, max_bytes=self.dead_letter_max_bytes))
        unit.outputs.append(out)
        metrics.DEAD_LETTERS.labels(reason).inc()
        return out

    def _failed(self, rec: Record, exc: BaseException, what: str) -> None:
        log.exception("cannot process %s record %s (%s): dead-lettered", rec.topic, rec.src, what, exc_info=exc)
        self._errors.inc(self.stage_name, type(exc).__name__)

    # flush ------------------------------------------------------------------------------------
    def _settle(self, unit: Unit) -> None:
        """After a unit's outputs were acknowledged, the local copy of each key it wrote drops the
        pending entries of this incarnation: nothing in this process reads them again (a redelivery
        whose entry is gone was acknowledged; `_touch` drops them on the key's next change); after a
        crash the memory store is rebuilt from the changelog, which keeps them, and a RocksDB copy
        is only settled once they were acknowledged. About two thirds of a new conversation's value
        (docs/benchmarks.md, "lean local values"): fewer bytes held and parsed on every read.
        Entries of another incarnation stay until their input is committed (`_maybe_needed`).
        A key a later unit wrote meanwhile (the pipeline) keeps that unit's value."""
        writer = self._writer
        for key, data in unit.settled.items():
            if writer.get(key) is unit:  # (`_forget` drops the entry)
                p = unit.dirty[key]
                self.store.write(key, data, p, unit.events.get(p))

    async def _flush(self, unit: Unit, *, defer: bool = False) -> Unit:
        """Put every dirty value in the overlay, then (in `_ship`) write it to the local store and
        the changelog, await the changelog acks, send the outputs and await theirs. Per partition
        the order is: wheel slots armed, meta, keys, wheel slots deleted (Kafka keeps one
        partition's records in order): a durable key implies its wheel entries and the meta with
        its counter deltas; a durable slot delete implies the meta that recorded its bucket as
        acknowledged.

        The unit pipeline (`defer`, the last unit of a batch, `start_batch`): the agent goes back to
        `take` once the values are in the overlay; `_ship` runs in the background, chained: a
        unit's changelog records are sent once the previous unit's were acknowledged, its outputs
        once the previous unit's were. So every changelog record is still written after every
        changelog record before it was acknowledged, and outputs keep their order; only a unit's
        own outputs may still be in flight while the next one's values are written, which is why
        `_touch` keeps this incarnation's pending entries of units in flight (`_unacked`) and
        `_settle` leaves a key that a later unit wrote. At most PIPELINE_DEPTH units are in flight.
        Without `defer` (a unit that filled up, a firing's steps), everything before is awaited
        first, and the unit's own acks before returning."""
        flight = self._flight
        flight[:] = [t for t in flight if not t.done()]
        if not defer:
            await self._drained()
        else:
            while len(flight) >= PIPELINE_DEPTH:
                await asyncio.shield(flight[0])
                flight[:] = [t for t in flight if not t.done()]  # (awaiting a done one does not yield)
        if unit.empty():
            if unit.fired:  # a firing with nothing to write: complete once everything before it is acked
                await self._drained()
                self.completed.update(unit.fired)
            return self._unit()
        writes = self._stage_writes(unit)
        logged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        logged.add_done_callback(_retrieved)
        task = asyncio.ensure_future(self._ship(unit, writes, self._logged, self._tail, logged))
        self._logged, self._tail = logged, task
        self._flight.append(task)
        if not defer:
            await task
        return self._unit()

    async def _drained(self) -> None:
        """Every unit in flight acknowledged (shielded: a stop that cancels the caller lets them
        complete, so their batches are still acked)."""
        if self._tail is not None:
            await asyncio.shield(self._tail)

    def _stage_writes(self, unit: Unit) -> list[tuple[str, bytes | None, int]]:
        """A unit's values in the changelog's order, (key, bytes or None for a tombstone,
        partition), put in the overlay that the next units read (`_ship` writes them to the local
        store once the unit before was acknowledged: the local store is never more than one unit
        ahead of the changelog, as without the pipeline; see `_touch` for a store that outlives
        the process)."""
        values = self._overlay.values
        writes: list[tuple[str, bytes | None, int]] = []

        def stage(key: str, data: bytes | None, p: int) -> None:
            values[key] = data
            writes.append((key, data, p))

        try:
            for name, value in unit.slot_values.items():
                if value is not None:
                    p = unit.slot_parts[name]
                    stage(name, _dumps(value), p)
            for p in sorted(unit.dirty_metas):
                m = unit.metas[p]
                m["r"] = self.run_id
                m["j"] = unit.journal.get(p, {})
                if p not in unit.collected:  # the deletes asked for by an earlier unit are done
                    m["gc"] = m.get("gc_to", m["gc"])
                    f = m["firing"]
                    if f is not None and self.completed.get(p) == f["src"]:
                        f["sent"], f["n_sent"] = f["upto"], f["n"]  # nothing to walk again after a restart
                stage(meta_key(p), _dumps(m), p)
            writer, unacked = self._writer, self._unacked
            for key, p in unit.dirty.items():
                e = unit.entries[key]
                assert e is not None  # noqa: S101 - dirty entries are never None
                data, settled = e.encode_settled(self.run_id)
                if settled is not None:
                    unit.settled[key] = settled
                    writer[key] = unit
                    own = [q[0] for q in e.pending if _own(q, self.run_id)]
                    unit.own.extend(own)
                    unacked.update(own)
                else:
                    writer.pop(key, None)
                stage(key, data, p)
            for key, p in unit.deleted.items():
                writer.pop(key, None)
                stage(key, None, p)
            for name, value in unit.slot_values.items():
                if value is None:
                    p = unit.slot_parts[name]
                    stage(name, None, p)
        except Exception as exc:
            raise WriteFailed(f"cannot encode table values: {exc!r}") from exc
        return writes

    async def _ship(
        self, unit: Unit, writes: Sequence[tuple[str, bytes | None, int]],
        logged_before: asyncio.Future[None] | None, acked_before: asyncio.Future[None] | None,
        logged: asyncio.Future[None],
    ) -> None:
        """A unit's changelog records, once the previous unit's were acknowledged, and its outputs,
        once the previous unit's were: sent, and their acks awaited (`_flush`)."""
        try:
            if logged_before is not None:
                await asyncio.shield(logged_before)
            store, values, events = self.store, self._overlay.values, unit.events
            acks: list[Awaitable[Any]] = []
            try:
                for key, data, p in writes:
                    store.write(key, data, p, events.get(p))
                    if key in values and values[key] is data:  # not written again by a later unit
                        del values[key]
                for key, data, p in writes:
                    acks.append(await store.send(key, data, p))
            except Exception as exc:
                raise WriteFailed(f"cannot write table values: {exc!r}") from exc
            self.producer.send_now()  # the store writes through the same producer
            t0 = time.monotonic()
            await _all(acks, "changelog")
            self._waits[0].observe(time.monotonic() - t0)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                logged.cancel()
            else:
                logged.set_exception(exc)
            self._forget(unit)
            raise
        logged.set_result(None)
        try:
            if acked_before is not None:
                await asyncio.shield(acked_before)
            sends: list[Awaitable[Any]] = []
            try:
                for out in unit.outputs:
                    out_key = out.key.encode() if isinstance(out.key, str) else out.key
                    sends.append(await self.producer.send(out.topic, out_key, out.value))
            except Exception as exc:
                raise WriteFailed(f"cannot send output: {exc!r}") from exc
            self.producer.send_now()
            await self._complete(unit, sends, time.monotonic())
        finally:
            self._forget(unit)

    def _forget(self, unit: Unit) -> None:
        """A unit out of flight (acknowledged, or failed: then the process ends)."""
        writer, unacked = self._writer, self._unacked
        for key in unit.settled:
            if writer.get(key) is unit:
                del writer[key]
        for src in unit.own:
            n = unacked[src] - 1
            if n > 0:
                unacked[src] = n
            else:
                del unacked[src]
        unit.settled, unit.own = {}, []

    async def _complete(self, unit: Unit, sends: Sequence[Awaitable[Any]], t2: float) -> None:
        """A flushed unit's outputs acknowledged (sent at `t2`, monotonic): count them, settle the
        local copies, and take note of the firings whose every output is now acknowledged."""
        await _all(sends, "output")
        if sends:
            self._waits[1].observe(time.monotonic() - t2)
        for out in unit.outputs:
            self.stage.sent(out)
        self._settle(unit)
        self.completed.update(unit.fired)
        metrics.UNITS_FLUSHED.labels(self.stage_name).inc()


def _retrieved(fut: asyncio.Future[None]) -> None:
    """Mark a future's exception as seen (a unit's changelog acks: the unit's task raises it)."""
    if not fut.cancelled():
        fut.exception()


def _own(pending: list[Any], run_id: str) -> bool:
    return len(pending) > 3 and pending[3] == run_id


def _pend(e: Entry, src: str, outs: list[list[Any]], deltas: list[list[Any]], run_id: str) -> None:
    """Keep the outputs and deltas of input `src` pending on the key; the inputs of one record for
    one key (items of a raw body) share one pending entry, re-sent together on redelivery."""
    last = e.pending[-1] if e.pending else None
    if last is not None and last[0] == src:
        e.pending[-1] = [src, [*last[1], *outs], [*last[2], *deltas], run_id]
    else:
        e.pending.append([src, outs, deltas, run_id])


def _by_key(inputs: Sequence[Keyed]) -> dict[str, list[Input]]:
    """Inputs grouped by key, each key's in their order (keys in order of first appearance)."""
    out: dict[str, list[Input]] = {}
    for k in inputs:
        out.setdefault(k.key, []).append(k.inp)
    return out


def _added(counts: Mapping[str, Mapping[str, int]], deltas: Sequence[Sequence[Any]]) -> dict[str, dict[str, int]]:
    """`counts` (counter → label → n) plus `deltas` ((counter, label, ±n)); zeros are dropped."""
    out = {name: dict(by_label) for name, by_label in counts.items()}
    for name, label, n in deltas:
        by_label = out.setdefault(name, {})
        value = by_label.get(label, 0) + int(n)
        if value:
            by_label[label] = value
        else:
            by_label.pop(label, None)
            if not by_label:
                del out[name]
    return out


def _deltas(old: Mapping[str, Mapping[str, int]], new: Mapping[str, Mapping[str, int]]) -> list[tuple[str, str, int]]:
    """The deltas that turn `old` into `new`."""
    out: list[tuple[str, str, int]] = []
    for name in {*old, *new}:
        for label in {*old.get(name, {}), *new.get(name, {})}:
            d = new.get(name, {}).get(label, 0) - old.get(name, {}).get(label, 0)
            if d:
                out.append((name, label, d))
    return out


def _plan_record(src: str, event: Any) -> Record:
    """The tick record that made a firing plan (timer inputs and their facts name it as source)."""
    topic, partition, offset = src.rsplit("/", 2)
    return Record(topic, int(partition), int(offset), TICK_KEY, None, 0, (), event)


class Consumed(Protocol):
    """What a dead letter needs of a consumed record: a `Record` or a faust message."""

    topic: str
    partition: int
    offset: int
    value: Any


def letter_bytes(rec: Consumed, reason: str, error: str, *, max_bytes: int, item_index: str | None = None) -> bytes:
    """The dead letter of one consumed record, serialized: its reason, error, source and original bytes
    (a bounded prefix with size and SHA-256 when the original is too large; `streams.core.deadletter`)."""
    source = Source(topic=rec.topic, partition=rec.partition, offset=rec.offset)
    raw = rec.value if isinstance(rec.value, bytes) else b""
    return serde.dumps(deadletter.dead_letter(raw, reason, error, source, item_index, max_bytes=max_bytes))


class BatchRouter:
    """A stage without state (ingest's splitter, the orders router): each record of a batch becomes
    writes or a dead letter (`_one`), and the batch returns once Kafka acknowledged every write of it;
    a write that fails raises `WriteFailed`."""

    what = "output"  # names the records in a WriteFailed message

    def __init__(self, producer: Producer, dlq_name: str, letter_max_bytes: int) -> None:
        self.producer = producer
        self.dlq_name = dlq_name
        self.letter_max_bytes = letter_max_bytes

    async def run_batch(self, records: Sequence[Record]) -> None:
        acks: list[Awaitable[Any]] = []
        for rec in records:
            await self._one(rec, acks)
        self.producer.send_now()
        await _all(acks, self.what)

    async def _one(self, rec: Record, acks: list[Awaitable[Any]]) -> None:
        raise NotImplementedError

    async def _dead(self, rec: Record, reason: str, error: str, acks: list[Awaitable[Any]],
                    item_index: str | None = None) -> None:
        letter = letter_bytes(rec, reason, error, max_bytes=self.letter_max_bytes, item_index=item_index)
        try:
            acks.append(await self.producer.send(self.dlq_name, rec.key, letter))
        except Exception as exc:
            raise WriteFailed(f"cannot send a dead letter: {exc!r}") from exc
        metrics.DEAD_LETTERS.labels(reason).inc()


async def _all(acks: Sequence[Awaitable[Any]], what: str) -> None:
    if not acks:
        return
    try:
        await asyncio.gather(*acks)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise WriteFailed(f"a {what} record was not acknowledged: {exc!r}") from exc


# --------------------------------------------------------------------------------------------
# faust adapters


@contextlib.contextmanager
def current_event(event: Any) -> Iterator[None]:
    """Make `event` faust's current event while a store is written: the RocksDB store picks the
    partition's database from it (`faust/stores/rocksdb.py` `_set`); the memory store ignores it."""
    if event is None:
        yield
        return
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class TableStore:
    """A faust Table written outside `table[key] = value`: the local store through `table.data`,
    the changelog record straight to the app's aiokafka producer on the input's partition, the
    value already serialized, the key with the table's own key serializer (JSON, as faust writes and
    recovery reads it). Once Kafka acknowledges it, the record's offset is the persisted offset of a RocksDB
    store, as faust's `Table._on_changelog_sent` does (faust 0.15.3 `tables/base.py`).

    The table is declared with `value_type=bytes` (raw values): the local store (memory or RocksDB)
    holds the value's JSON bytes, as written to the changelog and as recovery reads them back; `get`
    parses them. Not `table.send_changelog`: that queues each record in faust's producer buffer,
    which a background task hands to aiokafka later, record by record; the unit's writes then reach
    aiokafka spread over several loop turns (and produce requests), and every record pays for a
    FutureMessage, a PendingMessage and the topic's codecs. Here a unit's writes are enqueued in
    one go, in order (so a partition's records keep the runner's order)."""

    def __init__(self, table: Any, producer: Any, *, persistent: bool = False) -> None:
        self.table = table
        self.producer = producer  # faust's Producer (`send` → aiokafka's delivery future)
        self.persistent = persistent  # rocksdb://: the local copy survives the process
        self._topic: str | None = None

    @property
    def topic(self) -> str:
        if self._topic is None:
            self._topic = str(self.table.changelog_topic.get_topic_name())
        return self._topic

    def get(self, key: str) -> Any:
        value = self.table.data.get(key)
        return orjson.loads(value) if isinstance(value, bytes | bytearray) else value

    def write(self, key: str, data: bytes | None, partition: int, event: Any) -> None:
        # the local store keeps the serialized value (parsed again on read): a few KB of bytes per
        # conversation instead of a Python object graph several times that size (bench/memory.py)
        with current_event(event):
            if data is None:
                self.table.data.pop(key, None)
            else:
                self.table.data[key] = data

    async def send(self, key: str, data: bytes | None, partition: int) -> Awaitable[Any]:
        # the key as faust writes and recovery reads it: the table's key serializer (JSON)
        raw_key = codecs.dumps(self.table.key_serializer, key)
        fut: asyncio.Future[Any] = await self.producer.send(self.topic, raw_key, data, partition, None, None)
        fut.add_done_callback(self._persisted)
        return fut

    def _persisted(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # the runner's gather raises WriteFailed
        res = fut.result()
        self.table.data.set_persisted_offset(TP(res.topic, res.partition), res.offset)


class AppProducer:
    """The app's producer, keeping the delivery future that faust's `Topic.send` hides."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None) -> Awaitable[Any]:
        fut: Awaitable[Any] = await self.app.producer.send(topic, key, value, partition, None, None)
        return fut

    def send_now(self) -> None:
        """Close the producer's open batches and wake its sender, as aiokafka's own
        `flush_for_commit` does (pinned aiokafka 0.14): a batch is sent once its builder is closed
        or its linger ran out. The stages await their acks right after enqueuing a unit, so the
        linger (`MESSENGER_STREAMS_PRODUCER_LINGER_MS`) would only delay them; the linger still
        gathers the writes of other tasks (ticks, the CSAT stage) between two units."""
        try:
            producer = self.app.producer._ensure_producer()
        except Exception:  # noqa: BLE001 - not started (tests, shutdown): nothing is enqueued
            return
        acc = producer._message_accumulator
        for batches in acc._batches.values():
            for batch in batches:
                batch._builder.close()
        waiter = acc._waiter_future
        if not waiter.done():
            waiter.set_result(None)


def committed_offsets(app: Any) -> Callable[[str, int], int | None]:
    """What faust last committed (or found committed at assignment) for a topic-partition.

    faust 0.15.3 keeps it in `Consumer._committed_offset` (set in `perform_seek` on assignment and
    after every commit, dropped on revocation); there is no public accessor."""
    def committed(topic: str, partition: int) -> int | None:
        offsets: Mapping[Any, int | None] = getattr(app.consumer, "_committed_offset", {})
        value = offsets.get(TP(topic, partition))
        return value if isinstance(value, int) else None

    return committed



class TickSource:
    """Writes the tick records of the partitions this worker owns (decision D).

    A tick for partition p says "all input written before `now` has been consumed once the stage
    has consumed its input partitions p up to `ends`". Input that enters through an upstream stage
    of the same app (raw webhook bodies, split by `split_webhooks` before they reach the
    conversation stage) is covered too: the wall time T is taken together with the upstream
    topic's end offsets, and the tick is written only once the group's committed offsets of the
    upstream topic have passed them — every record split from those bodies was acknowledged
    before that commit, so it lies below the input end offsets read afterwards. After an outage
    the ticks therefore lag until the upstream backlog is split; stream time never runs ahead of
    a body that is still queued.

    Offsets are read with a client of its own (a group-less consumer for end offsets, an admin
    client for the group's commits): with faust's consumer thread (`MESSENGER_STREAMS_CONSUMER_THREAD`)
    its calls are answered only between its long polls."""

    def __init__(
        self,
        app: Any,
        *,
        ticks_topic: str,
        input_topics: Sequence[str],
        upstream_topic: str | None,
        group_id: str,
        bootstrap_servers: str,
        partitions: int,
        max_waiting: int = 64,
    ) -> None:
        self.app = app
        self.ticks_topic = ticks_topic
        self.input_topics = list(input_topics)
        self.upstream_topic = upstream_topic
        self.group_id = group_id
        self.bootstrap_servers = bootstrap_servers
        self.partitions = partitions
        self._waiting: deque[tuple[int, dict[int, int]]] = deque(maxlen=max_waiting)
        self._admin: AIOKafkaAdminClient | None = None
        self._offsets: AIOKafkaConsumer | None = None
        self._last_warning = 0.0
        self._held = HeldWarning("ticks wait for the group's commits of raw bodies")

    async def run_once(self) -> int:
        """Write one tick per owned partition if the upstream allows; returns how many."""
        try:
            return await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a missed tick only delays timers; the next one retries
            if time.monotonic() - self._last_warning > 60:
                self._last_warning = time.monotonic()
                log.warning("cannot write ticks (timers wait for the next ones): %r", exc)
            return 0

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        offsets, self._offsets = self._offsets, None
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()
        if offsets is not None:
            with contextlib.suppress(Exception):
                await offsets.stop()

    async def _ends(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        if self._offsets is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers, enable_auto_commit=False)
            await consumer.start()
            self._offsets = consumer
        ends: dict[TopicPartition, int] = await self._offsets.end_offsets(list(tps))
        return ends

    async def _run(self) -> int:
        owned = sorted({tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.ticks_topic})
        now = int(time.time() * 1000)
        stamp: int | None = now
        if self.upstream_topic is not None:
            stamp = await self._upstream_time(now)
        if stamp is None or not owned:
            return 0
        tps = [TopicPartition(t, p) for p in owned for t in self.input_topics]
        ends = await self._ends(tps)
        for p in owned:
            value = wheel.tick_value(stamp, {t: int(ends[TopicPartition(t, p)]) for t in self.input_topics})
            await self.app.producer.send(self.ticks_topic, TICK_KEY, _dumps(value), p, None, None)
        return len(owned)

    async def _upstream_time(self, now: int) -> int | None:
        """The newest wall time whose upstream end offsets the group has committed past."""
        topic = self.upstream_topic
        assert topic is not None  # noqa: S101 - checked by the caller
        n = self.app.consumer.topic_partitions(topic) or self.partitions
        tps = [TopicPartition(topic, i) for i in range(n)]
        ends = await self._ends(tps)
        self._waiting.append((now, {tp.partition: int(ends[tp]) for tp in tps}))
        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
            await admin.start()
            self._admin = admin
        offsets = await self._admin.list_consumer_group_offsets(self.group_id, partitions=tps)
        committed = {tp.partition: om.offset for tp, om in offsets.items()}
        stamp: int | None = None
        while self._waiting:
            t, want = self._waiting[0]
            if not all(end <= 0 or committed.get(part, -1) >= end for part, end in want.items()):
                break
            stamp = t
            self._waiting.popleft()
        if stamp is not None or not self._waiting:
            self._held.clear(-1)
        else:
            want = self._waiting[0][1]
            self._held.check(-1, lambda: _uncommitted(topic, want, committed))
        return stamp


def reseek_uncommitted(app: Any, *, group_id: str, bootstrap_servers: str) -> None:
    """After every rebalance, seek the stream partitions that have no committed offset (or 0) back
    to their start, before faust resumes the streams.

    Why: faust skips *and acks* records fetched before a rebalance and delivered after it (their
    generation id is stale; faust 0.15.3 `Stream._py_aiter`), trusting that the consumer is moved
    back to the committed offset, where it fetches them again. aiokafka's `seek_to_committed`
    moves only partitions whose committed offset is above 0 (aiokafka 0.14
    `AIOKafkaConsumer.seek_to_committed`), so on a partition that never had a commit those
    records were acked, committed and never processed (seen with two workers: a consumer message
    lost when the second worker joined). Seeking to 0 (`auto_offset_reset=earliest` resets it to
    the log start) fetches them again; the offset guard makes the repeat harmless."""
    admin: list[AIOKafkaAdminClient] = []

    async def on_rebalance_complete(sender: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        changelogs = set(app.tables.changelog_topics)
        tps = [tp for tp in app.consumer.assignment() if tp.topic not in changelogs]
        if not tps:
            return
        try:
            if not admin:
                client = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
                await client.start()
                admin.append(client)
            offsets = await admin[0].list_consumer_group_offsets(
                group_id, partitions=[TopicPartition(tp.topic, tp.partition) for tp in tps]
            )
        except Exception as exc:  # noqa: BLE001 - without the answer faust's own seek applies
            log.warning("cannot read committed offsets after a rebalance: %r", exc)
            return
        back = {TP(tp.topic, tp.partition): 0 for tp, om in offsets.items() if om.offset <= 0}
        if back:
            # through the consumer service (`Consumer.seek` would call aiokafka from this thread
            # while faust's consumer thread fetched: a KeyError in `Fetcher.fetched_records` stopped
            # a worker; on the loop consumer the service runs the seek in place, on this loop)
            await app.consumer.seek_wait(back)

    async def close(sender: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        while admin:
            with contextlib.suppress(Exception):
                await admin.pop().close()

    app.on_rebalance_complete.connect(on_rebalance_complete)
    app.on_before_shutdown.connect(close)

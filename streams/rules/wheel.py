"""Timers on the stream's time: the timer wheel and the stream clock, pure (no I/O, no clock).

**The wheel.** Each partition of a stage's table has buckets of one second: the slot
`\\0timers:<partition>:<second>` holds the keys that have a timer due in that second (a list of at
most `CHUNK_KEYS` keys; further keys go to `…:<second>:1`, `…:<second>:2`, … and past
`MAX_CHUNKS` chunks to the next second). Arming never goes below `cursor + 1`, the first bucket not
yet fired. When the partition's stream time passes a bucket, every key in it is visited; the key's
own list of armed due times (`split_due`) says whether anything is due: an entry left behind by a
timer that was re-armed or cancelled is skipped (lazy deletion), so arming never searches or
rewrites older buckets. Work per advance is the number of elapsed seconds plus the keys visited.

**The stream clock.** A tick record for partition p carries the wall time T at which it was made
and the end offsets, at that moment, of the stage's input partitions p (`Tick`). The stage advances
the partition's stream time to T only once it has consumed those inputs up to those offsets
(`StreamClock`); a tick that arrives ahead of its data waits (bounded) and is retried with later
ticks. So a timer never fires while input written before its stream time is still queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

BUCKET_MS = 1_000
CHUNK_KEYS = 256  # keys per slot value: ~10 KB with conversation keys (changelog values stay under 16 KB)
MAX_CHUNKS = 128  # a bucket holds at most 32,768 keys; more spill into the next second
MAX_ARMED = 16  # armed due times kept per key (the earliest; the rules re-arm the rest when they fire)
MAX_PENDING_TICKS = 64  # ticks per partition waiting for their data (older ones are dropped first)

SLOT_PREFIX = "\x00timers:"



class Slots(Protocol):
    """Where the wheel keeps its slots: the table (or a dict in tests). Values are replaced,
    never mutated in place."""

    def get(self, key: str) -> Any: ...

    def __setitem__(self, key: str, value: Any) -> None: ...


def slot_key(partition: int, bucket: int, chunk: int = 0) -> str:
    """The table key of one chunk of a bucket (chunk 0 has the historical name)."""
    base = f"{SLOT_PREFIX}{partition}:{bucket}"
    return base if chunk == 0 else f"{base}:{chunk}"


def bucket_of(due_ms: int) -> int:
    """The bucket (second) a due time falls in."""
    return due_ms // BUCKET_MS


def arm(slots: Slots, partition: int, cursor: int | None, key: str, due_ms: int) -> int:
    """Put `key` in the bucket of `due_ms` (never below `cursor + 1`); returns the bucket used.

    A key already in that bucket is not added twice. Slot values are replaced, never mutated in
    place, so `slots` may be a copy-on-write view over the stored table."""
    bucket = bucket_of(due_ms)
    if cursor is not None:
        bucket = max(bucket, cursor + 1)
    while True:
        for chunk in range(MAX_CHUNKS):
            name = slot_key(partition, bucket, chunk)
            keys = slots.get(name)
            if keys is None:
                slots[name] = [key]
                return bucket
            if key in keys:
                return bucket
            if len(keys) < CHUNK_KEYS:
                slots[name] = [*keys, key]
                return bucket
        bucket += 1


def bucket_keys(slots: Slots, partition: int, bucket: int) -> tuple[list[str], list[str]]:
    """(keys in arming order, slot names holding them) of one bucket."""
    keys: list[str] = []
    names: list[str] = []
    for chunk in range(MAX_CHUNKS):
        name = slot_key(partition, bucket, chunk)
        chunk_keys = slots.get(name)
        if chunk_keys is None:
            break
        names.append(name)
        keys.extend(chunk_keys)
    return keys, names


def last_due_bucket(stream_time: int) -> int:
    """The newest bucket whose every due time is at or before `stream_time`."""
    return (stream_time + 1) // BUCKET_MS - 1


def due_buckets(cursor: int, stream_time: int, limit: int) -> range:
    """Buckets to fire now: after `cursor`, wholly at or before `stream_time`, at most `limit`."""
    upto = min(last_due_bucket(stream_time), cursor + limit)
    return range(cursor + 1, upto + 1)


def split_due(armed: Iterable[int], now: int) -> tuple[list[int], list[int]]:
    """(due at `now`, still ahead) of a key's armed due times: an empty first list means the wheel
    entry that brought us here is stale (lazy deletion)."""
    due: list[int] = []
    rest: list[int] = []
    for t in armed:
        (due if t <= now else rest).append(t)
    return due, rest


def add_armed(armed: Iterable[int], due_ms: int) -> list[int]:
    """A key's armed due times with `due_ms` added: sorted, unique, the earliest `MAX_ARMED`."""
    return sorted({*armed, due_ms})[:MAX_ARMED]


# --------------------------------------------------------------------------------------------
# stream time


@dataclass(frozen=True, slots=True)
class Tick:
    """A tick for one partition: wall time `now` (epoch ms) at which it was made, and `ends`: for
    each input topic of the stage, its end offset on this partition at that time. `src` names the
    tick record (set by the stage that consumed it)."""

    now: int
    ends: Mapping[str, int]
    src: str = ""


def parse_tick(data: Any) -> Tick:
    """The tick in a decoded tick record; raises ValueError when it is not one (ticks written by
    older versions carry no end offsets and are refused: they prove nothing about the data)."""
    if not isinstance(data, dict):
        raise ValueError("a tick must be a JSON object")
    now = data.get("now")
    ends = data.get("ends")
    if not isinstance(now, int) or isinstance(now, bool) or now < 0:
        raise ValueError("tick without an integer 'now'")
    if not isinstance(ends, dict) or not all(
        isinstance(t, str) and isinstance(o, int) and not isinstance(o, bool) for t, o in ends.items()
    ):
        raise ValueError("tick without 'ends' (topic -> end offset)")
    return Tick(now, ends)


def tick_value(now: int, ends: Mapping[str, int]) -> dict[str, Any]:
    """The JSON value of a tick record."""
    return {"now": now, "ends": dict(ends)}


def caught_up(tick: Tick, progress: Callable[[str], int]) -> bool:
    """True when every input topic has been consumed up to the tick's end offset on it
    (`progress(topic)` = the next offset not yet consumed on this partition)."""
    return all(progress(topic) >= end for topic, end in tick.ends.items())


class StreamClock:
    """Ticks that arrived ahead of their data, per partition, until their data has been consumed.

    `offer` adds a tick and `poll` (after more input was consumed) returns the newest of the
    partition's ticks whose inputs have all been consumed, forgetting it and every older tick;
    None when no tick is proven yet. Bounded: at most `MAX_PENDING_TICKS` per partition (the
    oldest are dropped, which only makes the clock coarser). Nothing here needs resetting on a
    rebalance: a tick's claim ("all input written before `now` has offsets below `ends`") stays
    true forever."""

    def __init__(self, max_pending: int = MAX_PENDING_TICKS) -> None:
        self._pending: dict[int, deque[Tick]] = {}
        self._max = max_pending

    def offer(self, partition: int, tick: Tick, progress: Callable[[str], int]) -> Tick | None:
        waiting = self._pending.get(partition)
        if waiting is None:
            waiting = self._pending[partition] = deque(maxlen=self._max)
        waiting.append(tick)
        return self.poll(partition, progress)

    def poll(self, partition: int, progress: Callable[[str], int]) -> Tick | None:
        waiting = self._pending.get(partition)
        if not waiting or not caught_up(waiting[0], progress):
            return None  # offsets only grow: if the oldest is not proven, a newer one rarely is
        proven = waiting.popleft()
        while waiting and caught_up(waiting[0], progress):
            newer = waiting.popleft()
            if newer.now >= proven.now:
                proven = newer
        return proven

    def oldest(self, partition: int) -> Tick | None:
        """The oldest tick of a partition still waiting for its data (None when none waits)."""
        waiting = self._pending.get(partition)
        return waiting[0] if waiting else None

    def waiting(self, partition: int) -> int:
        """How many ticks of a partition wait for their data."""
        return len(self._pending.get(partition, ()))

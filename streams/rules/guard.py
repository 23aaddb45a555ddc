"""The offset guard: which consumed records a stored value already includes, per topic-partition.

Every value the state-first runner stores (`streams.stages.runtime`) carries `applied`:
`"<topic>/<partition>" → offset` of the last record applied to it from that topic-partition. A
record at or below that offset was applied before: it is being redelivered after a crash or a
rebalance, so it is not decided again (its pending outputs are re-sent instead).

The guard is per topic-partition, never per topic: offsets of different partitions are not
comparable. After a change of partition count a key's records come from another partition of the
same topic, which has no entry yet, so they are decided (and deduplicated by the rules) rather than
silently skipped because a bigger offset of the old partition happened to be recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping


def tp_key(topic: str, partition: int) -> str:
    """The guard's key of one topic-partition (Kafka topic names cannot contain '/')."""
    return f"{topic}/{partition}"


def src_id(topic: str, partition: int, offset: int) -> str:
    """The stable id of one consumed record: `<topic>/<partition>/<offset>`."""
    return f"{topic}/{partition}/{offset}"


def is_applied(applied: Mapping[str, int], topic: str, partition: int, offset: int) -> bool:
    """True when the record at `offset` of `topic`/`partition` was already applied."""
    last = applied.get(tp_key(topic, partition))
    return last is not None and offset <= last


def mark_applied(applied: MutableMapping[str, int], topic: str, partition: int, offset: int) -> None:
    """Record that the record at `offset` was applied (the guard never moves backwards)."""
    key = tp_key(topic, partition)
    last = applied.get(key)
    if last is None or offset > last:
        applied[key] = offset

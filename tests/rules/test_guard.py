"""The offset guard: per topic-partition, so a partition-count change never skips a record."""

from __future__ import annotations

from streams.rules import guard


def test_applied_per_topic_partition() -> None:
    applied: dict[str, int] = {}
    assert not guard.is_applied(applied, "events", 0, 0)
    guard.mark_applied(applied, "events", 0, 5)
    assert guard.is_applied(applied, "events", 0, 5)
    assert guard.is_applied(applied, "events", 0, 3)
    assert not guard.is_applied(applied, "events", 0, 6)
    # another partition of the same topic has its own offsets: a bigger offset seen on
    # partition 0 says nothing about partition 1 (the old per-topic guard skipped these)
    assert not guard.is_applied(applied, "events", 1, 2)
    assert not guard.is_applied(applied, "actions", 0, 2)
    assert applied == {"events/0": 5}


def test_never_moves_backwards() -> None:
    applied: dict[str, int] = {}
    guard.mark_applied(applied, "t", 3, 10)
    guard.mark_applied(applied, "t", 3, 7)
    assert applied == {"t/3": 10}


def test_partition_count_change_does_not_skip() -> None:
    """A key at offset 900 of partition 2 (of 8) moves to partition 0 (of 16) after a repartition:
    its next record, at offset 12 there, is decided."""
    applied: dict[str, int] = {}
    guard.mark_applied(applied, "messenger.events.split", 2, 900)
    assert not guard.is_applied(applied, "messenger.events.split", 0, 12)


def test_ids() -> None:
    assert guard.tp_key("a.b", 3) == "a.b/3"
    assert guard.src_id("a.b", 3, 17) == "a.b/3/17"

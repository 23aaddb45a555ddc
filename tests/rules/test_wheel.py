"""The timer wheel and the stream clock: arming, due buckets, lazy deletion, ticks that wait."""

from __future__ import annotations

from typing import Any

import pytest

from streams.rules import wheel
from streams.rules.wheel import Tick


def test_arm_puts_a_key_in_its_second_once() -> None:
    slots: dict[str, Any] = {}
    assert wheel.arm(slots, 3, None, "p:u1", 10_500) == 10
    assert wheel.arm(slots, 3, None, "p:u1", 10_999) == 10  # same bucket, not twice
    assert wheel.arm(slots, 3, None, "p:u2", 10_001) == 10
    assert slots == {"\x00timers:3:10": ["p:u1", "p:u2"]}


def test_arm_never_below_the_cursor() -> None:
    slots: dict[str, Any] = {}
    # bucket 10 was fired already (cursor 12): a due time in the past goes to the next bucket
    assert wheel.arm(slots, 0, 12, "k", 10_000) == 13
    assert wheel.bucket_keys(slots, 0, 13) == (["k"], ["\x00timers:0:13"])


def test_arm_replaces_slot_values_never_mutates() -> None:
    stored = ["a"]
    slots: dict[str, Any] = {"\x00timers:0:5": stored}
    wheel.arm(slots, 0, None, "b", 5_000)
    assert stored == ["a"] and slots["\x00timers:0:5"] == ["a", "b"]


def test_full_chunks_continue_then_spill(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wheel, "CHUNK_KEYS", 2)
    monkeypatch.setattr(wheel, "MAX_CHUNKS", 2)
    slots: dict[str, Any] = {}
    buckets = [wheel.arm(slots, 1, None, f"k{i}", 7_000) for i in range(5)]
    assert buckets == [7, 7, 7, 7, 8]  # 2 chunks of 2 keys, then the next second
    assert wheel.bucket_keys(slots, 1, 7) == (["k0", "k1", "k2", "k3"], ["\x00timers:1:7", "\x00timers:1:7:1"])
    assert wheel.bucket_keys(slots, 1, 8)[0] == ["k4"]
    assert wheel.bucket_keys(slots, 1, 9) == ([], [])


def test_due_buckets_only_wholly_past_seconds() -> None:
    # at 12.998 s the bucket 12 (12.000-12.999) may still get due times: not yet
    assert list(wheel.due_buckets(9, 12_998, 100)) == [10, 11]
    assert list(wheel.due_buckets(9, 12_999, 100)) == [10, 11, 12]
    assert list(wheel.due_buckets(12, 12_999, 100)) == []
    assert list(wheel.due_buckets(0, 1_000_000, 3)) == [1, 2, 3]  # bounded per advance


def test_lazy_deletion() -> None:
    assert wheel.split_due([5_000, 9_000], 6_000) == ([5_000], [9_000])
    # the entry that brought us here was for a timer re-armed to 9 s: nothing due, stale
    assert wheel.split_due([9_000], 6_000) == ([], [9_000])


def test_add_armed_sorted_unique_bounded() -> None:
    armed: list[int] = []
    for due in (30, 10, 20, 10):
        armed = wheel.add_armed(armed, due)
    assert armed == [10, 20, 30]
    for due in range(100, 100 + wheel.MAX_ARMED):
        armed = wheel.add_armed(armed, due)
    assert len(armed) == wheel.MAX_ARMED and armed[0] == 10


def test_parse_tick() -> None:
    assert wheel.parse_tick({"now": 5, "ends": {"a": 3}}) == Tick(5, {"a": 3})
    for bad in ({"now": 5}, {"now": "5", "ends": {}}, {"now": True, "ends": {}}, [], {"now": 1, "ends": {"a": "x"}}):
        with pytest.raises(ValueError):
            wheel.parse_tick(bad)


def test_clock_waits_for_the_data() -> None:
    consumed = {"events": 0, "actions": 4}
    clock = wheel.StreamClock()
    # made at 100 when the events partition ended at offset 3: not consumed yet, waits
    assert clock.offer(0, Tick(100, {"events": 3, "actions": 4}), consumed.__getitem__) is None
    assert clock.waiting(0) == 1
    consumed["events"] = 2
    assert clock.offer(0, Tick(200, {"events": 5, "actions": 4}), consumed.__getitem__) is None
    assert clock.poll(0, consumed.__getitem__) is None
    consumed["events"] = 3  # the first tick's data is in; the second's is not
    assert clock.poll(0, consumed.__getitem__) == Tick(100, {"events": 3, "actions": 4})
    assert clock.waiting(0) == 1
    assert clock.offer(0, Tick(300, {"events": 9, "actions": 4}, "t/0/7"), consumed.__getitem__) is None
    consumed["events"] = 9
    proven = clock.poll(0, consumed.__getitem__)
    assert proven is not None and (proven.now, proven.src) == (300, "t/0/7")
    assert clock.waiting(0) == 0
    # partitions are independent
    assert clock.offer(1, Tick(50, {}), consumed.__getitem__) == Tick(50, {})


def test_clock_is_bounded() -> None:
    clock = wheel.StreamClock(max_pending=3)
    for t in range(10):
        assert clock.offer(0, Tick(t, {"e": 100}), lambda topic: 0) is None
    assert clock.waiting(0) == 3
    proven = clock.offer(0, Tick(99, {"e": 1}), lambda topic: 100)
    assert proven is not None and proven.now == 99 and clock.waiting(0) == 0

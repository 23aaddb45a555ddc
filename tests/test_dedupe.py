"""The pure dedupe decision: duplicates within the horizon are dropped, old keys pruned."""

from __future__ import annotations

from streams.ingest import dedupe

H = 1000


def test_first_sight_forwards_and_repeat_drops() -> None:
    d1 = dedupe(None, "k1", 100, H)
    assert not d1.duplicate and d1.state == {"k": {"k1": 100}}
    d2 = dedupe(d1.state, "k1", 500, H)
    assert d2.duplicate
    d3 = dedupe(d1.state, "k2", 600, H)
    assert not d3.duplicate and set(d3.state["k"]) == {"k1", "k2"}


def test_keys_past_the_horizon_are_pruned_and_count_as_new() -> None:
    state = dedupe(None, "old", 0, H).state
    later = dedupe(state, "new", 5000, H)
    assert later.state == {"k": {"new": 5000}}
    again = dedupe(state, "old", 5000, H)
    assert not again.duplicate


def test_only_expired_keys_are_pruned() -> None:
    state = dedupe(None, "old", 0, H).state
    state = dedupe(state, "mid", 600, H).state
    state = dedupe(state, "new", 1200, H).state  # "old" left the horizon, "mid" did not
    assert state == {"k": {"mid": 600, "new": 1200}}
    assert dedupe(state, "mid", 1300, H).duplicate

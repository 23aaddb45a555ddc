"""The pure dedupe decision: duplicates within the horizon are dropped, old keys pruned."""

from __future__ import annotations

from streams.rules.dedupe import dedupe

H = 1000
M = 100  # keys kept per conversation, when the test is not about the cap


def test_first_sight_forwards_and_repeat_drops() -> None:
    seen: dict[str, int] = {}
    assert not dedupe(seen, "k1", 100, H, M) and seen == {"k1": 100}
    assert dedupe(seen, "k1", 500, H, M)
    assert seen == {"k1": 100}  # a duplicate changes nothing
    assert not dedupe(seen, "k2", 600, H, M) and list(seen) == ["k1", "k2"]


def test_keys_past_the_horizon_are_pruned_and_count_as_new() -> None:
    seen: dict[str, int] = {}
    dedupe(seen, "old", 0, H, M)
    assert not dedupe(seen, "new", 5000, H, M)
    assert seen == {"new": 5000}
    assert not dedupe(seen, "old", 5000, H, M)  # forgotten: new again


def test_only_expired_keys_are_pruned() -> None:
    seen: dict[str, int] = {}
    for key, at in (("old", 0), ("mid", 600), ("new", 1200)):  # "old" leaves the horizon, "mid" does not
        dedupe(seen, key, at, H, M)
    assert seen == {"mid": 600, "new": 1200}
    assert dedupe(seen, "mid", 1300, H, M)


def test_at_most_max_keys_are_kept_oldest_first_out() -> None:
    seen: dict[str, int] = {}
    for i in range(5):
        dedupe(seen, f"k{i}", i, H, 3)
    assert list(seen) == ["k2", "k3", "k4"]
    assert dedupe(seen, "k4", 10, H, 3)
    assert not dedupe(seen, "k0", 10, H, 3)  # pushed out by the cap: seen as new


def test_a_key_seen_again_after_the_horizon_moves_to_the_end() -> None:
    seen: dict[str, int] = {}
    dedupe(seen, "a", 0, H, M)
    dedupe(seen, "b", 900, H, M)
    assert not dedupe(seen, "a", 1500, H, M)
    assert list(seen) == ["b", "a"]

"""Unit tests of the dispatcher's sent log fold (streams/rules/sendapi.py): verdicts, the owner fence,
bounds by count and age. No broker: records are applied in log order as Kafka would deliver them."""

from __future__ import annotations

from typing import Any

from streams.rules.sendapi import (
    CLAIM_KEY,
    DAY_MS,
    FAILED,
    IN_DOUBT,
    IN_DOUBT_AGAIN,
    IN_FLIGHT,
    NEW,
    REPLAY,
    SEND,
    SENT,
    SUPERSEDED,
    SentLog,
    SentLogBounds,
    after_marker,
    before_marker,
    claim_value,
    entry_key,
    entry_value,
    is_expired,
    transport_error,
)

CONV = "1691462197845448:u1"
T0 = 1_700_000_000_000


class Log:
    """A SentLog fed like a partition: every write gets the next offset."""

    def __init__(self, bounds: SentLogBounds | None = None) -> None:
        self.log = SentLog(bounds or SentLogBounds())
        self.offset = 0

    def write(self, key: bytes, value: bytes | None) -> int:
        off = self.offset
        self.log.apply(off, key, value)
        self.offset += 1
        return off

    def claim(self, token: str) -> None:
        self.write(CLAIM_KEY, claim_value(token, T0))

    def mark(self, outbox: str, token: str, conv: str = CONV, at: int = T0) -> None:
        self.write(entry_key(conv, outbox), entry_value(conv, outbox, IN_FLIGHT, at, token))

    def outcome(self, outbox: str, token: str, state: str = SENT, conv: str = CONV, **result: Any) -> None:
        res = {"outbox_id": outbox, "status": state, **result}
        self.write(entry_key(conv, outbox), entry_value(conv, outbox, state, T0, token, res))

    def verdict_after_marker(self, outbox: str, token: str) -> str:
        return after_marker(self.log, self.log.get(CONV, outbox), token)


def test_unknown_id_is_new_and_our_marker_under_our_claim_is_granted() -> None:
    lg = Log()
    lg.claim("A")
    assert before_marker(lg.log.get(CONV, "ob-1")) == NEW
    lg.mark("ob-1", "A")
    assert lg.verdict_after_marker("ob-1", "A") == SEND


def test_an_outcome_is_replayed_with_its_result() -> None:
    lg = Log()
    lg.claim("A")
    lg.mark("ob-1", "A")
    lg.outcome("ob-1", "A", SENT, mid="m_1")
    entry = lg.log.get(CONV, "ob-1")
    assert entry is not None and before_marker(entry) == REPLAY
    assert entry.result is not None and '"mid":"m_1"' in entry.result
    lg.outcome("ob-2", "A", FAILED, code=551)  # a failure decided without a marker (e.g. no token)
    assert before_marker(lg.log.get(CONV, "ob-2")) == REPLAY


def test_a_marker_without_outcome_is_in_doubt_for_the_next_owner() -> None:
    lg = Log()
    lg.claim("A")
    lg.mark("ob-1", "A")  # A dies here (after, or during, the Graph call)
    lg.claim("B")
    assert before_marker(lg.log.get(CONV, "ob-1")) == IN_DOUBT_AGAIN
    # B records the in-doubt outcome; a later redelivery replays that, never sends
    lg.outcome("ob-1", "B", FAILED, reason=IN_DOUBT)
    assert before_marker(lg.log.get(CONV, "ob-1")) == REPLAY


def test_a_released_marker_lets_the_next_owner_send() -> None:
    lg = Log()
    lg.claim("A")
    lg.mark("ob-1", "A")
    lg.write(entry_key(CONV, "ob-1"), None)  # A stopped before any part reached Graph
    lg.claim("B")
    assert before_marker(lg.log.get(CONV, "ob-1")) == NEW
    lg.mark("ob-1", "B")
    assert lg.verdict_after_marker("ob-1", "B") == SEND


def test_a_zombie_owner_is_fenced_by_the_new_claim() -> None:
    """A lost the partition without noticing: its marker lands after B's claim, so A may not send;
    B, whose marker comes after A's, may not either (A could be sending): in doubt, never twice."""
    lg = Log()
    lg.claim("A")
    lg.claim("B")
    lg.mark("ob-1", "A")
    lg.mark("ob-1", "B")
    assert lg.verdict_after_marker("ob-1", "A") == SUPERSEDED
    assert lg.verdict_after_marker("ob-1", "B") == IN_DOUBT_AGAIN
    entry = lg.log.get(CONV, "ob-1")
    assert entry is not None and not entry.only_marked_by("A")  # A may not release what B marked too


def test_a_superseded_owner_may_release_only_its_own_lone_marker() -> None:
    lg = Log()
    lg.claim("A")
    lg.claim("B")
    lg.mark("ob-1", "A")
    entry = lg.log.get(CONV, "ob-1")
    assert lg.verdict_after_marker("ob-1", "A") == SUPERSEDED
    assert entry is not None and entry.only_marked_by("A") and not entry.only_marked_by("B")


def test_the_first_marker_wins_a_race() -> None:
    lg = Log()
    lg.claim("A")
    lg.mark("ob-1", "A")  # A's marker was written before B claimed: A may send
    lg.claim("B")
    lg.mark("ob-1", "B")
    assert lg.verdict_after_marker("ob-1", "A") == SEND
    assert lg.verdict_after_marker("ob-1", "B") == IN_DOUBT_AGAIN
    lg.outcome("ob-1", "A", SENT, mid="m_1")
    assert before_marker(lg.log.get(CONV, "ob-1")) == REPLAY


def test_a_marker_after_the_outcome_does_not_reopen_it() -> None:
    lg = Log()
    lg.claim("A")
    lg.mark("ob-1", "A")
    lg.outcome("ob-1", "A", SENT, mid="m_1")
    lg.mark("ob-1", "Z")
    entry = lg.log.get(CONV, "ob-1")
    assert entry is not None and entry.state == SENT and entry.by == "A"


def test_bad_records_are_skipped() -> None:
    lg = Log()
    lg.write(b"x", b"not json")
    lg.write(b"y", b'{"conversation": 5}')
    lg.log.apply(lg.offset, None, b"{}")
    assert len(lg.log) == 0 and lg.log.skipped == 3
    assert lg.log.position == 3


def test_count_bounds_per_conversation_and_per_partition() -> None:
    lg = Log(SentLogBounds(per_conversation=3, per_partition=5))
    lg.claim("A")
    for i in range(5):
        lg.outcome(f"ob-{i}", "A", SENT, conv="c1")
    assert [e.outbox_id for e in lg.log.entries.values()] == ["ob-2", "ob-3", "ob-4"]
    for i in range(4):
        lg.outcome(f"ob-x{i}", "A", SENT, conv="c2")
    # per conversation: c2 keeps its 3 newest; per partition: 5 in all, oldest first out
    assert [e.outbox_id for e in lg.log.entries.values()] == ["ob-3", "ob-4", "ob-x1", "ob-x2", "ob-x3"]
    assert lg.log.evicted == 4  # c1: ob-0, ob-1; the partition: ob-2; c2: ob-x0
    assert lg.log.by_conversation == {
        "c1": [entry_key("c1", "ob-3"), entry_key("c1", "ob-4")],
        "c2": [entry_key("c2", f"ob-x{i}") for i in (1, 2, 3)],
    }
    assert lg.log.get("c1", "ob-0") is None and before_marker(lg.log.get("c1", "ob-0")) == NEW


def test_age_bound() -> None:
    bounds = SentLogBounds(max_age_ms=2 * DAY_MS, margin_ms=DAY_MS)
    lg = Log(bounds)
    lg.claim("A")
    lg.mark("old", "A", at=T0)
    lg.mark("new", "A", at=T0 + DAY_MS)
    assert lg.log.prune(T0 + 3 * DAY_MS) == 0  # kept max_age + margin
    assert lg.log.prune(T0 + 3 * DAY_MS + 1) == 1
    assert lg.log.get(CONV, "old") is None and lg.log.get(CONV, "new") is not None
    assert lg.log.by_conversation == {CONV: [entry_key(CONV, "new")]}
    # a record old enough for its entry to be gone is never sent
    now = T0 + 10 * DAY_MS
    assert is_expired(now - 2 * DAY_MS - 1, now, bounds)
    assert not is_expired(now - 2 * DAY_MS, now, bounds)
    assert not is_expired(None, now, bounds)


def test_transport_errors_that_may_have_reached_graph_are_in_doubt() -> None:
    e = transport_error(TimeoutError(), reached=True)
    assert not e.retryable and e.reason == IN_DOUBT and "echo" in e.message
    assert transport_error(ConnectionRefusedError()).retryable

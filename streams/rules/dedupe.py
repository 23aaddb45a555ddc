"""Duplicate events: the pure check over one conversation's recently seen idempotency keys.

The conversation stage applies it to every event before deciding, with the keys kept in the
conversation's own state (one hop and one table write fewer per event than a dedupe stage of its own;
see docs/benchmarks.md). Meta retries a webhook for up to 36 h, so the horizon defaults to 48 h.
"""

from __future__ import annotations


def dedupe(seen: dict[str, int], idempotency_key: str, seen_at: int, horizon_ms: int, max_keys: int) -> bool:
    """True when `idempotency_key` is a duplicate; else records it in `seen` (changed in place).

    `seen` maps one conversation's recently seen keys to when they were seen (epoch ms, the raw
    record's receive time), oldest first. Keys older than the horizon relative to `seen_at` are
    pruned, and at most `max_keys` are kept (the oldest go first), so the state stays bounded by
    one conversation's traffic within the horizon.
    """
    first = seen.get(idempotency_key)
    if first is not None and seen_at - first <= horizon_ms:
        return True
    cutoff = seen_at - horizon_ms
    if seen and next(iter(seen.values())) < cutoff:  # insertion order ≈ arrival order: oldest first
        for key in [k for k, t in seen.items() if t < cutoff]:
            del seen[key]
    seen.pop(idempotency_key, None)  # a key seen again after the horizon moves to the end
    seen[idempotency_key] = seen_at
    while len(seen) > max_keys:
        del seen[next(iter(seen))]
    return False


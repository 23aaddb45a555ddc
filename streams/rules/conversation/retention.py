"""State has a lifetime: a key without an open conversation is compacted, then deleted.

`retention.closed_state_seconds` after the last close (or after the last input of a key that never
opened one) the state shrinks to what later rules need: the person (a returning consumer, for
`retention.returning_days`), Meta's window (while a send could still use it), the dedupe keys not
expired yet, a survey still answerable, held actions. When none of these is left the key is deleted
(`Decision.state=None`, a tombstone in the changelog). `forget` deletes at once.
"""

from __future__ import annotations

from streams.core.config import ConnectorConfig
from streams.rules.conversation import orders, thread
from streams.rules.conversation.state import State, new_state
from streams.rules.conversation.windows import window_end

DAY_MS = 86_400_000


def compact(st: State, now: int, config: ConnectorConfig, horizon_ms: int) -> State | None:
    """What is worth keeping of a state without an open conversation at `now`; None: nothing."""
    kept = new_state()
    expiries: list[int] = []
    person = st["person"]
    if person is not None:
        until = person["last_at"] + config.retention.returning_days * DAY_MS
        if until > now:
            kept["person"] = person
            expiries.append(until)
    window = window_end(st["consumer_at"], config.messaging, config.account.human_agent_tag)
    if window is not None and window > now:
        kept["consumer_at"] = st["consumer_at"]
        expiries.append(window)
    seen = {h: t for h, t in st["seen"].items() if t * 1000 + horizon_ms > now}
    if seen:
        kept["seen"] = seen
        expiries.append(min(seen.values()) * 1000 + horizon_ms)
    survey = st["survey"]
    if survey is not None:
        until = survey["sent_at"] + config.csat.expire_after_seconds * 1000
        if until > now:
            kept["survey"] = survey
            expiries.append(until)
    if "profile" in st and kept["person"] is not None:
        kept["profile"] = st["profile"]  # #17: with the person (it is refreshed after its TTL)
    kept["held"] = st["held"]
    expiries.extend(thread.compact(st, kept, now, config.bots.transcript_minutes * 60_000))  # #15
    expiries.extend(orders.compact(st, kept, now, config.optin.match_window_seconds * 1000,
                                  config.optin.relink_days * DAY_MS))
    if not expiries and not kept["held"]:
        return None
    kept["wm"] = st["wm"]
    kept["last_closed"] = st["last_closed"]
    kept["armed"] = [a for a in st["armed"] if a > now]
    kept["expire_at"] = min(expiries) if expiries else now + config.retention.closed_state_seconds * 1000
    for stage_field in ("o", "pending"):
        if stage_field in st:
            kept[stage_field] = st[stage_field]  # the stage's own
    return kept


def ensure_expiry(st: State, now: int, config: ConnectorConfig) -> None:
    """A state without an open conversation always has a time to be compacted."""
    if st["conv"] is None and st["expire_at"] is None:
        st["expire_at"] = now + config.retention.closed_state_seconds * 1000

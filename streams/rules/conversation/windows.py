"""Meta's messaging windows, on Meta's clock.

A window opens at the consumer's message as Meta timed it: the event's own `timestamp`, never
later than when we received it (a delivery Meta retried hours late does not extend the window).
Standby-channel consumer messages count too: the window belongs to the page and the person,
whichever app holds the thread.
"""

from __future__ import annotations

from typing import Any

from streams.core.config import Messaging

SendMode = tuple[str, str | None]  # (messaging_type, tag)


def meta_time(ev: dict[str, Any], received: int) -> int:
    """When Meta says the consumer acted: the event's timestamp, bounded by the receive time."""
    ts = int(ev.get("timestamp") or 0)
    return min(ts, received) if ts > 0 else received


def newest(consumer_at: int | None, at: int) -> int:
    """The consumer's newest message time after one more at `at` (out-of-order safe)."""
    return at if consumer_at is None else max(consumer_at, at)


def in_response_window(consumer_at: int | None, now: int, messaging: Messaging) -> bool:
    """Inside the standard (24 h) window: automatic messages may go, as `RESPONSE`."""
    return consumer_at is not None and now - consumer_at <= messaging.response_window_seconds * 1000


def send_mode(consumer_at: int | None, now: int, messaging: Messaging, human_agent_tag: bool,
              inside: str = "RESPONSE") -> SendMode | None:
    """How a human agent's message may go now: `inside` within 24 h, `MESSAGE_TAG`/`HUMAN_AGENT`
    within 7 days when the app is approved for it, else None (the window is closed)."""
    if consumer_at is None:
        return None
    age = now - consumer_at
    if age <= messaging.response_window_seconds * 1000:
        return inside, None
    if human_agent_tag and age <= messaging.human_agent_window_seconds * 1000:
        return "MESSAGE_TAG", "HUMAN_AGENT"
    return None


def window_end(consumer_at: int | None, messaging: Messaging, human_agent_tag: bool) -> int | None:
    """When the last window a send could use closes (for retention)."""
    if consumer_at is None:
        return None
    longest = messaging.human_agent_window_seconds if human_agent_tag else messaging.response_window_seconds
    return consumer_at + max(longest, messaging.response_window_seconds) * 1000

"""The parts of a conversation key's state that #15 adds: the thread's owner with the bot's
transcript (`thread`), and checkout opt-ins with their orders (`checkout`).

Both are optional keys of `state.State` (absent in states stored before #15, so no migration), and
every list has a bound here; `tests/rules/test_bots_state.py` drives them at their largest.
"""

from __future__ import annotations

from typing import Any, TypedDict

LINES_BYTES = 1_000  # the bot transcript's texts together (the line count is `bots.transcript_messages`)
LINE_TEXT_MAX = 200  # one transcript line's text, cut at a word boundary
OPTINS_MAX = 2  # opt-ins remembered per key (newest)
ORDERS_MAX = 4  # orders known per key: waiting for their opt-in, or matched (for their updates)
PENDING_ORDER_BYTES = 1_800  # the compact orders waiting at a PSID key, together (one order of at most this)
PENDING_CHECKOUT_BYTES = 6_000  # the same at a checkout or ref key (no conversation history there)
LINKED_MAX = 4  # user_refs a PSID key has claimed
HOMES_MAX = 3  # opt-ins a `ref` key points to


# One line of the standby channel, stored compactly as `[by, at, text]`: `by` is customer, bot (the app
# that owns the thread) or page (Page Inbox); `at` epoch ms; `text` cut to LINE_TEXT_MAX (or a
# `[image]`-like summary, or null).
Line = list[Any]


class Handback(TypedDict):
    """The thread goes back to the bot when the closed conversation's survey is over (`until` at the latest)."""

    conversation_id: str
    skill: str
    closed_by: str
    reason: str
    until: int


class Thread(TypedDict):
    """Who owns the thread (Conversation Routing) and what happened on the standby channel."""

    owner: str | None  # the app id that owns the thread; None: unknown or idle
    at: int  # when we learned it
    lines: list[Line]  # the bot transcript (standby channel), bounded
    handback: Handback | None
    requested_at: int | None  # our last `request_thread_control`


class KnownOrder(TypedDict):
    """An order this key knows: waiting for its opt-in (`order` kept, compact), matched (its
    conversation; `order` kept only where a handoff may still need it), or forwarded (`to`: the key
    it went to, so its updates follow it)."""

    id: str  # the merchant's order id, hashed (`state.short_hash`)
    hash: str  # digest of its content: a changed order is an update
    at: int  # when it reached this key
    v: int | None  # the order's `updated_at`: an older record is stale
    matched: bool
    order: dict[str, Any] | None
    conversation_id: str | None
    to: str | None


class Home(TypedDict):
    """At a `ref` key: the key of an opt-in that carried this ref."""

    key: str
    at: int


class Checkout(TypedDict):
    optins: list[int]  # when checkout opt-ins reached this key (within the match window)
    orders: list[KnownOrder]
    moved_to: str | None  # a checkbox key whose person replied: their PSID
    moved_until: int | None
    linked: list[str]  # a PSID key: the user_refs it claimed
    homes: list[Home]  # a `ref` key: opt-ins carrying the ref
    receipts: int  # messages sent to the user_ref (Meta allows one before the person answers)


def new_thread(now: int) -> Thread:
    return {"owner": None, "at": now, "lines": [], "handback": None, "requested_at": None}


def new_checkout() -> Checkout:
    return {"optins": [], "orders": [], "moved_to": None, "moved_until": None, "linked": [], "homes": [], "receipts": 0}

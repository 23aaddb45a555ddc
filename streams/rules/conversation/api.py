"""The contract between the conversation rules and the stage that drives them.

`decide(state, input, key, env) -> Decision` is pure: everything it may know besides the stored state
and the input comes in `env`, read by the stage before the call (the live page record, the account's
routing). The stage owns I/O: it stores `Decision.state` (None deletes the key), writes
`Decision.outputs`, feeds a `timer` input back at each time in `Decision.arms`, and counts `notes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from streams.core.config import ExternalUser, Page, Routing

Source = Literal["event", "action", "result", "timer"]
Dest = Literal["skill", "outbound", "history", "csat_responses", "csat_facts"]


@dataclass(frozen=True, slots=True)
class Input:
    """One input to decide on. `id` is stable across redelivery; `now` is its time in epoch ms
    (for `timer` inputs: the stream time of the conversation's partition)."""

    source: Source
    id: str
    now: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Env:
    """What a decision may read besides the state: passed in by the stage, so `decide` stays pure.

    `page` is the conversation's page as connected now (None: the page is not connected);
    `routing` and `external_user` are the account's settings now; `skills` every skill a conversation
    may be routed or transferred to now (their topics exist: the configured skills plus those of pages
    connected live); None: the configured skills only (no live page directory)."""

    page: Page | None
    routing: Routing
    external_user: ExternalUser
    skills: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Output:
    """One record to write: to a skill topic (`skill` set), or to one of the named topics."""

    dest: Dest
    key: str
    value: dict[str, Any]
    skill: str | None = None


@dataclass(slots=True)
class Decision:
    """The outcome of one input: the new state (None: delete the key), outputs, timers to arm
    (epoch ms: feed a `timer` input back once stream time reaches each), notes for counters
    (`(name, label)`) and figures for histograms (`(name, label, value)`); both go to
    `streams.core.metrics.record_notes`."""

    state: dict[str, Any] | None
    outputs: list[Output] = field(default_factory=list)
    arms: list[int] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    duplicate: bool = False  # the input was a duplicate: nothing changed, nothing to write
    figures: list[tuple[str, str, float]] = field(default_factory=list)

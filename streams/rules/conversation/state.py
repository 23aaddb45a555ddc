"""The stored state of one conversation key (`<page_id>:<psid>`): typed views over the JSON dict,
its bounds, and the one function that migrates older stored states (`migrate`).

Every list and map has a bound below, so a stored value stays under `STATE_BUDGET` bytes however
long the conversation runs (tests/rules/test_state_bounds.py drives a very long one). Rules never
change a stored dict in place: they build new parts (`{**conv, ...}`) and the decision holds a
shallow copy whose unchanged parts are the stored objects themselves (copy-on-write).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, NotRequired, TypedDict, cast

from streams.rules.conversation.state_bots import Checkout, Thread

STATE_VERSION = 2
STATE_BUDGET = 16_384  # bytes of the serialized state, whatever the conversation's length

HASH_CHARS = 10  # dedupe keys and applied-action ids are kept as 40-bit hashes (10 hex characters)
SEEN_MAX = 128  # dedupe keys of events within the horizon (only kinds not idempotent by themselves)
RECENT_MAX = 48  # applied action ids and failed send results
OUTBOX_MAX = 16  # our recent sends, to recognise their echoes and send results
OUTBOX_TEXT_BYTES = 3_000  # agent texts kept until their mid is known, at most this many bytes together
HELD_MAX = 4  # actions held for a conversation not known yet
HELD_BYTES = 3_000  # their raw size together
ARMED_MAX = 6  # wake-up times handed to the stage's timer wheel and not yet fired
AGENTS_MAX = 10  # agents who wrote in one conversation (history `agents`)
MANAGERS_MAX = 4  # managers present at once
SKILLS_MAX = 8  # skills one conversation went through (history `skills`)

Turn = Literal["agent", "consumer"]  # whose turn: "agent" = the consumer waits for an agent


class Agent(TypedDict):
    """An agent as the conversation knows them: id and the nickname their action gave (if any)."""

    id: str
    nickname: str | None


class Counts(TypedDict):
    consumer: int
    agent: int
    external: int
    system: int


class Conv(TypedDict):
    """The open conversation."""

    id: str
    skill: str
    skills: list[str]
    opened_at: int
    opened_by: str  # consumer / agent
    locale: str
    owner: Agent | None  # the assigned agent; None: in the skill's queue
    assigned_at: int | None
    managers: list[Agent]
    agents: list[str]  # who sent a message, in order
    turn: Turn
    turn_at: int  # when the turn started; on the consumer's turn: the agent's last message
    queue_since: int | None  # start of the current queue stay (None while assigned)
    queue_ms: int  # time spent unassigned before the current stay
    first_agent_at: int | None
    agent_in_stay: bool  # an agent wrote during the current queue stay
    counts: Counts
    fired: list[str]  # once-per-turn / once-per-stay timers already fired: warn, agent_nr, waiting
    off_hours_until: int | None  # the off-hours period already told about (its end)
    urgent: bool
    response_seconds: int | None  # set by an agent (`set_response_time`)


class Survey(TypedDict):
    """A CSAT survey waiting for its answer; it belongs to `conversation_id` only."""

    conversation_id: str
    sent_at: int
    skill: str
    agent_id: str | None
    locale: str
    summary: dict[str, Any]


class OutboxEntry(TypedDict):
    """One of our sends: the agent's text is kept only until its mid is known."""

    origin: str
    agent_id: str | None
    text: str | None
    mid: str | None
    skill: str | None
    conversation_id: str | None
    at: int


class Held(TypedDict):
    """An action for a conversation not known yet, held until `until`."""

    id: str  # the input id: the outputs of the action derive their ids from it
    at: int  # the input's time
    until: int
    action: dict[str, Any]


class Person(TypedDict):
    """What is remembered of the person: for `welcome_first` vs `welcome_returning`."""

    convs: int
    last_at: int


class State(TypedDict):
    v: int
    seen: dict[str, int]  # hashed idempotency key → epoch seconds first seen
    recent: list[str]  # hashed ids of applied actions and failed send results
    person: Person | None
    consumer_at: int | None  # Meta's clock: the consumer's newest message, for the messaging windows
    wm: dict[str, int]  # receipt watermarks: delivered / read
    conv: Conv | None
    survey: Survey | None
    outbox: dict[str, OutboxEntry]
    held: list[Held]
    armed: list[int]  # wake-ups handed to the stage and not fired yet
    expire_at: int | None  # when a state without an open conversation is compacted or deleted
    last_closed: str | None  # the conversation closed last: actions naming it are rejected at once
    thread: NotRequired[Thread]  # #15: the thread's owner and the bot transcript (state_bots.py)
    checkout: NotRequired[Checkout]  # #15: checkout opt-ins and their orders
    profile: NotRequired[Any]  # the person's User Profile, kept with a TTL (#17: streams.rules.profile)
    o: NotRequired[dict[str, Any]]  # the stage's own fields (offset guard, pending outputs): kept as is
    pending: NotRequired[Any]


def short_hash(text: str) -> str:
    """A fixed-size hash for ids kept in the state."""
    return hashlib.blake2b(text.encode(), digest_size=HASH_CHARS // 2).hexdigest()


def new_state() -> State:
    """The state of a conversation key never seen before."""
    return {
        "v": STATE_VERSION,
        "o": {},
        "seen": {},
        "recent": [],
        "person": None,
        "consumer_at": None,
        "wm": {},
        "conv": None,
        "survey": None,
        "outbox": {},
        "held": [],
        "armed": [],
        "expire_at": None,
        "last_closed": None,
    }


def migrate(stored: dict[str, Any] | None) -> State:
    """The stored value as today's `State`: new for None, as is for the current version, converted
    from version 1 (the single-class `Decider` of before); raises ValueError for a newer version."""
    if stored is None:
        return new_state()
    version = stored.get("v", 1)
    if version == STATE_VERSION:
        return cast(State, stored)
    if version != 1:
        raise ValueError(f"stored conversation state has version {version!r}; this code knows up to {STATE_VERSION}")
    return _from_v1(stored)


def _from_v1(old: dict[str, Any]) -> State:
    st = new_state()
    for key in ("o", "pending"):
        if key in old:
            st[key] = old[key]  # the stage's own fields
    seen = old.get("seen") or {}
    st["seen"] = {short_hash(k): int(t) // 1000 for k, t in list(seen.items())[-SEEN_MAX:]}
    st["recent"] = [short_hash(r) for r in (old.get("recent") or [])][-RECENT_MAX:]
    n = int(old.get("n_convs") or 0)
    last = old.get("last_consumer_at")
    st["consumer_at"] = int(last) if last is not None else None
    st["wm"] = {k: int(v) for k, v in (old.get("wm") or {}).items()}
    outbox: dict[str, OutboxEntry] = {}
    for ob_id, e in list((old.get("outbox") or {}).items())[-OUTBOX_MAX:]:
        outbox[ob_id] = {"origin": e.get("origin") or "agent", "agent_id": e.get("agent_id"),
                         "text": e.get("text") if e.get("origin") == "agent" and not e.get("mid") else None,
                         "mid": e.get("mid"),
                         "skill": e.get("skill"), "conversation_id": e.get("conversation_id"), "at": 0}
    st["outbox"] = outbox
    survey = old.get("survey")
    if survey:
        st["survey"] = {"conversation_id": survey["conversation_id"], "sent_at": int(survey["sent_at"]),
                        "skill": survey["skill"], "agent_id": survey.get("agent_id"),
                        "locale": survey.get("locale") or "en_US", "summary": dict(survey.get("summary") or {})}
    conv = old.get("conv")
    if conv:
        st["conv"] = _conv_from_v1(conv)
        st["armed"] = sorted(set(int(d) for d in (conv.get("wheel") or {}).values()))[:ARMED_MAX]
    if n:
        st["person"] = {"convs": n, "last_at": int((conv or {}).get("opened_at") or last or 0)}
    return st


def _conv_from_v1(c: dict[str, Any]) -> Conv:
    """A v1 conversation did not know whose turn it was: an agent who wrote makes it the consumer's
    turn from the consumer's last message (the old idle clock), else the agent's; the once-only
    timers count as fired, so an upgrade sends nobody a late warning."""
    counts = c.get("counts") or {}
    agent_id = c.get("agent_id")
    opened_at = int(c.get("opened_at") or 0)
    last_consumer = int(c.get("last_consumer_at") or opened_at)
    agent_wrote = int(counts.get("agent") or 0) > 0
    return {
        "id": c["id"],
        "skill": c["skill"],
        "skills": list(c.get("skills") or [c["skill"]])[-SKILLS_MAX:],
        "opened_at": opened_at,
        "opened_by": c.get("opened_by") or "consumer",
        "locale": c.get("locale") or "en_US",
        "owner": {"id": agent_id, "nickname": c.get("agent_nickname")} if agent_id else None,
        "assigned_at": opened_at if agent_id else None,
        "managers": [],
        "agents": list(c.get("agents") or [])[-AGENTS_MAX:],
        "turn": "consumer" if agent_id and agent_wrote else "agent",
        "turn_at": last_consumer,
        "queue_since": None if agent_id else opened_at,
        "queue_ms": 0,
        "first_agent_at": None,
        "agent_in_stay": agent_wrote,
        "counts": {"consumer": int(counts.get("consumer") or 0), "agent": int(counts.get("agent") or 0),
                   "external": int(counts.get("external") or 0), "system": int(counts.get("system") or 0)},
        "fired": ["warn", "agent_nr", "waiting"],
        "off_hours_until": None,
        "urgent": False,
        "response_seconds": None,
    }

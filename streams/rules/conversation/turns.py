"""The conversation's lifecycle and turns, as pure functions from a `Conv` to a new `Conv`.

Queue → assigned → closed (docs/lifecycle.md has the diagram); whose turn it is — the agent's
(the consumer waits for an agent) or the consumer's (the agent waits for the consumer) — and when
it started. A consumer line gives the turn to the agent (its start is that first line); an agent
line gives it to the consumer (its start is the agent's latest line). Automatic messages and page
(external) messages change neither the turn nor the timers.
"""

from __future__ import annotations

from typing import Any

from streams.rules.conversation.state import AGENTS_MAX, MANAGERS_MAX, SKILLS_MAX, Agent, Conv, Counts


def new_conv(conv_id: str, skill: str, locale: str, now: int, opened_by: str, owner: Agent | None = None) -> Conv:
    """A conversation opened at `now`: by the consumer (in the queue, the agent's turn) or
    proactively by an agent (assigned to them, the consumer's turn from the open)."""
    return {
        "id": conv_id,
        "skill": skill,
        "skills": [skill],
        "opened_at": now,
        "opened_by": opened_by,
        "locale": locale,
        "owner": owner,
        "assigned_at": now if owner else None,
        "managers": [],
        "agents": [],
        "turn": "consumer" if owner else "agent",
        "turn_at": now,
        "queue_since": None if owner else now,
        "queue_ms": 0,
        "first_agent_at": None,
        "agent_in_stay": False,
        "counts": {"consumer": 0, "agent": 0, "external": 0, "system": 0},
        "fired": [],
        "off_hours_until": None,
        "urgent": False,
        "response_seconds": None,
    }


def _without(fired: list[str], *names: str) -> list[str]:
    return [f for f in fired if f not in names]


def consumer_line(conv: Conv, now: int) -> Conv:
    """A consumer message or postback: the turn passes to the agent (started now) unless it was
    already theirs; the agent-not-responding message may fire again in the new turn."""
    counts: Counts = {**conv["counts"], "consumer": conv["counts"]["consumer"] + 1}
    if conv["turn"] == "agent":
        return {**conv, "counts": counts}
    return {**conv, "counts": counts, "turn": "agent", "turn_at": now, "fired": _without(conv["fired"], "agent_nr")}


def agent_line(conv: Conv, agent_id: str, now: int) -> Conv:
    """A human agent's message (owner or manager): the consumer's turn from now."""
    agents = conv["agents"] if agent_id in conv["agents"] else [*conv["agents"], agent_id][-AGENTS_MAX:]
    return {
        **conv,
        "counts": {**conv["counts"], "agent": conv["counts"]["agent"] + 1},
        "turn": "consumer",
        "turn_at": now,
        "fired": _without(conv["fired"], "warn"),
        "agents": agents,
        "first_agent_at": conv["first_agent_at"] if conv["first_agent_at"] is not None else now,
        "agent_in_stay": conv["agent_in_stay"] or conv["owner"] is None,
    }


def system_line(conv: Conv) -> Conv:
    """An automatic message: counted, nothing else changes."""
    return {**conv, "counts": {**conv["counts"], "system": conv["counts"]["system"] + 1}}


def external_line(conv: Conv) -> Conv:
    """A message the page sent from elsewhere (Page Inbox, Greeting, another app): counted only."""
    return {**conv, "counts": {**conv["counts"], "external": conv["counts"]["external"] + 1}}


def queue_stay_ms(conv: Conv, now: int) -> int:
    """How long the current queue stay has lasted (0 when assigned)."""
    return max(0, now - conv["queue_since"]) if conv["queue_since"] is not None else 0


def assign(conv: Conv, agent: Agent, now: int) -> Conv:
    """The conversation goes to `agent` (accept, auto-accept, manager take-over, transfer to them):
    the queue stay ends; the agent-not-responding clock restarts from the assignment."""
    return {
        **conv,
        "owner": agent,
        "assigned_at": now,
        "queue_ms": conv["queue_ms"] + queue_stay_ms(conv, now),
        "queue_since": None,
        "agent_in_stay": False,
        "fired": _without(conv["fired"], "agent_nr", "waiting"),
    }


def requeue(conv: Conv, now: int) -> Conv:
    """Into the (new) skill's queue: a new queue stay starts now (a current one is counted)."""
    return {**conv, "owner": None, "assigned_at": None, "queue_ms": conv["queue_ms"] + queue_stay_ms(conv, now),
            "queue_since": now, "agent_in_stay": False, "fired": _without(conv["fired"], "waiting", "agent_nr")}


def unassign(conv: Conv, now: int) -> Conv:
    """Back to the queue (return to queue): a new queue stay starts now; no-op when queued."""
    return conv if conv["owner"] is None else requeue(conv, now)


def move_to_skill(conv: Conv, skill: str) -> Conv:
    """The conversation moves to another skill (its topic, its settings); `skills` keeps the
    last `SKILLS_MAX` it went through, in order."""
    return {**conv, "skill": skill, "skills": [*conv["skills"], skill][-SKILLS_MAX:]}


def join(conv: Conv, manager: Agent) -> Conv:
    """A manager joins (at most `MANAGERS_MAX` at once; the longest present leaves the list first)."""
    others = [m for m in conv["managers"] if m["id"] != manager["id"]]
    return {**conv, "managers": [*others, manager][-MANAGERS_MAX:]}


def leave(conv: Conv, manager_id: str) -> Conv:
    """A manager leaves."""
    return {**conv, "managers": [m for m in conv["managers"] if m["id"] != manager_id]}


def fired(conv: Conv, name: str) -> Conv:
    """Mark a once-per-turn / once-per-stay timer as fired."""
    return conv if name in conv["fired"] else {**conv, "fired": [*conv["fired"], name]}


def summary(conv: Conv, *, key: str, page_id: str, psid: str | None, now: int, closed_by: str,
            reason: str) -> dict[str, Any]:
    """The closed conversation for `conversations.history`, with its contact-center figures."""
    first = conv["first_agent_at"]
    return {
        "conversation_id": conv["id"],
        "conversation_key": key,
        "page_id": page_id,
        "psid": psid,
        "skill": conv["skill"],
        "skills": conv["skills"],
        "agents": conv["agents"],
        "opened_at": conv["opened_at"],
        "opened_by": conv["opened_by"],
        "closed_at": now,
        "closed_by": closed_by,
        "close_reason": reason,
        "consumer_messages": conv["counts"]["consumer"],
        "agent_messages": conv["counts"]["agent"],
        "external_messages": conv["counts"]["external"],
        "system_messages": conv["counts"]["system"],
        "first_agent_response_ms": max(0, first - conv["opened_at"]) if first is not None else None,
        "queue_ms": conv["queue_ms"] + queue_stay_ms(conv, now),
        "handle_ms": max(0, now - conv["opened_at"]),
        "abandoned": first is None,
        "csat_score": None,
    }

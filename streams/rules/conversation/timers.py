"""Timers by turn, per skill, on the stream's time.

Which timers run follows from the conversation (`conv_dues`, pure): on the consumer's turn the idle
close (`auto_close_after_seconds` since the agent's last message) and its warning
(`consumer_not_responding`); on the agent's turn while assigned, `agent_not_responding` (from the
turn's first consumer line or the assignment, whichever is later); while in the queue with no
agent reply, `waiting_for_agent`. The warning, agent and waiting messages fire once per turn or
queue stay; off hours suspend the agent and waiting timers (they count open time only).

The rules hand the stage wake-up times (`Decision.arms`); the stage feeds back a `timer` input whose
`now` is the partition's stream time, and whatever is due then fires. A wake-up is handed over only
when none is pending at or before it, so pushing a timer later costs no new wheel entry.
"""

from __future__ import annotations

from typing import Any

from streams.core.config import ConnectorConfig, Skill
from streams.rules.conversation import lifecycle, turns
from streams.rules.conversation.context import Ctx
from streams.rules.conversation.hours import add_open_time
from streams.rules.conversation.state import ARMED_MAX, Conv, State, migrate
from streams.rules.conversation.system import say


def conv_dues(conv: Conv, skill: Skill) -> dict[str, int]:
    """When each running timer of the open conversation is due (epoch ms)."""
    dues: dict[str, int] = {}
    fired = conv["fired"]
    if conv["turn"] == "consumer":
        if skill.auto_close_after_seconds:
            dues["idle"] = conv["turn_at"] + skill.auto_close_after_seconds * 1000
        if skill.auto_close_warning_after_seconds and "warn" not in fired:
            dues["warn"] = conv["turn_at"] + skill.auto_close_warning_after_seconds * 1000
    elif conv["owner"] is not None and skill.agent_not_responding_after_seconds and "agent_nr" not in fired:
        start = max(conv["turn_at"], conv["assigned_at"] or conv["turn_at"])
        due = add_open_time(skill.hours, start, skill.agent_not_responding_after_seconds)
        if due is not None:
            dues["agent_nr"] = due
    if (conv["owner"] is None and conv["queue_since"] is not None and skill.waiting_for_agent_after_seconds
            and "waiting" not in fired and not conv["agent_in_stay"]):
        due = add_open_time(skill.hours, conv["queue_since"], skill.waiting_for_agent_after_seconds)
        if due is not None:
            dues["waiting"] = due
    return dues


def next_wake(st: State, config: ConnectorConfig) -> int | None:
    """The earliest time anything of this state is due: a timer, a held action, the retention."""
    candidates: list[int] = [h["until"] for h in st["held"]]
    conv = st["conv"]
    if conv is not None:
        candidates.extend(conv_dues(conv, config.skill(conv["skill"])).values())
    if st["expire_at"] is not None:
        candidates.append(st["expire_at"])
    return min(candidates) if candidates else None


def arm(armed: list[int], due: int) -> list[int] | None:
    """The pending wake-ups after asking for one at `due`; None when one at or before it is pending.
    At most `ARMED_MAX` are remembered (the latest go: the earliest re-arms them when it fires)."""
    if any(a <= due for a in armed):
        return None
    return sorted([*armed, due])[:ARMED_MAX]


def schedule(ctx: Ctx) -> None:
    """Hand the stage the next wake-up of the new state, if none pending covers it."""
    due = next_wake(ctx.st, ctx.config)
    if due is None:
        return
    armed = arm(ctx.st["armed"], due)
    if armed is not None:
        ctx.st["armed"] = armed
        ctx.arms.append(due)


def wants_timer(stored: dict[str, Any] | None, now: int) -> bool:
    """Does a stored state wait for a wake-up at or before `now`? (For a stage's lazy timer wheel:
    entries of keys whose wake-up moved or went are skipped.)"""
    if not stored:
        return False
    return any(a <= now for a in migrate(stored)["armed"])


def fire(ctx: Ctx) -> None:
    """A `timer` input: forget the wake-ups it covers and fire the conversation's due timers."""
    now = ctx.now
    if any(a <= now for a in ctx.st["armed"]):
        ctx.st["armed"] = [a for a in ctx.st["armed"] if a > now]
    conv = ctx.st["conv"]
    if conv is None:
        return
    due = {name for name, at in conv_dues(conv, ctx.config.skill(conv["skill"])).items() if at <= now}
    if "idle" in due:
        ctx.note("timer", "idle")
        lifecycle.close(ctx, closed_by="system", reason="idle", agent_id=None)
        return
    if "warn" in due:
        ctx.note("timer", "warn")
        say(ctx, "consumer_not_responding")
        _mark(ctx, "warn")
    if "agent_nr" in due:
        ctx.note("timer", "agent_nr")
        owner = conv["owner"]
        ctx.console("agent_not_responding", agent_id=owner["id"] if owner else None, since=conv["turn_at"])
        say(ctx, "agent_not_responding")
        _mark(ctx, "agent_nr")
    if "waiting" in due:
        ctx.note("timer", "waiting")
        say(ctx, "waiting_for_agent")
        _mark(ctx, "waiting")


def _mark(ctx: Ctx, name: str) -> None:
    conv = ctx.st["conv"]
    assert conv is not None  # noqa: S101 - fire checked
    ctx.st["conv"] = turns.fired(conv, name)

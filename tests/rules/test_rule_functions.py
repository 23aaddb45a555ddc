"""The pure rule functions on their own: turns, timer dues and arming, ownership, held actions."""

from __future__ import annotations

import pytest

from streams.core.config import Hours, Skill
from streams.rules.conversation import turns
from streams.rules.conversation.actions import ownership
from streams.rules.conversation.api import Env
from streams.rules.conversation.held import releasable
from streams.rules.conversation.routing import route, transfer_target
from streams.rules.conversation.state import AGENTS_MAX, ARMED_MAX, SKILLS_MAX, Conv, Held, new_state
from streams.rules.conversation.timers import arm, conv_dues, next_wake
from tests.rules.convo import cfg

T = 1_000_000
ANA = {"id": "ana", "nickname": None}


def queued(at: int = T) -> Conv:
    return turns.new_conv("c1", "billing", "en_US", at, "consumer")


def test_turns_follow_the_lines() -> None:
    c = queued()
    assert (c["turn"], c["turn_at"], c["queue_since"]) == ("agent", T, T)
    c = turns.consumer_line(c, T + 5)
    assert (c["turn"], c["turn_at"]) == ("agent", T)  # more lines keep the turn's start
    c = turns.assign(c, ANA, T + 10)  # type: ignore[arg-type]
    assert c["queue_since"] is None and c["queue_ms"] == 10 and c["assigned_at"] == T + 10
    c = turns.agent_line(c, "ana", T + 20)
    assert (c["turn"], c["turn_at"], c["first_agent_at"], c["agents"]) == ("consumer", T + 20, T + 20, ["ana"])
    c = turns.agent_line(c, "ana", T + 30)
    assert (c["turn_at"], c["first_agent_at"], c["agents"]) == (T + 30, T + 20, ["ana"])
    c = turns.system_line(turns.external_line(c))
    assert (c["turn"], c["turn_at"]) == ("consumer", T + 30)  # automatic and page messages: no turn change
    c = turns.consumer_line(c, T + 40)
    assert (c["turn"], c["turn_at"]) == ("agent", T + 40)
    c = turns.unassign(c, T + 50)
    assert c["owner"] is None and c["queue_since"] == T + 50
    assert turns.summary(c, key="p:u", page_id="p", psid="u", now=T + 60, closed_by="agent", reason="agent")[
        "queue_ms"] == 20


def test_proactive_conversations_start_on_the_consumers_turn() -> None:
    c = turns.new_conv("c2", "billing", "en_US", T, "agent", owner=ANA)  # type: ignore[arg-type]
    assert (c["turn"], c["turn_at"], c["queue_since"]) == ("consumer", T, None)


def test_lists_are_bounded() -> None:
    c = queued()
    for i in range(AGENTS_MAX + 5):
        c = turns.agent_line(c, f"a{i}", T + i)
    assert len(c["agents"]) == AGENTS_MAX and c["agents"][-1] == f"a{AGENTS_MAX + 4}"
    for i in range(SKILLS_MAX + 3):
        c = turns.move_to_skill(c, f"s{i}")
    assert len(c["skills"]) == SKILLS_MAX
    for i in range(10):
        c = turns.join(c, {"id": f"m{i}", "nickname": None})
    assert [m["id"] for m in c["managers"]] == ["m6", "m7", "m8", "m9"]


def test_timer_dues_by_turn() -> None:
    skill = Skill(auto_close_after_seconds=120, auto_close_warning_after_seconds=60,
                  agent_not_responding_after_seconds=30, waiting_for_agent_after_seconds=20)
    c = queued()
    assert conv_dues(c, skill) == {"waiting": T + 20_000}  # queued, the agent's turn, nobody assigned
    c = turns.assign(c, ANA, T + 5_000)  # type: ignore[arg-type]
    assert conv_dues(c, skill) == {"agent_nr": T + 35_000}
    c = turns.agent_line(c, "ana", T + 10_000)
    assert conv_dues(c, skill) == {"idle": T + 130_000, "warn": T + 70_000}
    assert conv_dues(turns.fired(c, "warn"), skill) == {"idle": T + 130_000}
    manager_wrote = turns.agent_line(queued(), "sup", T + 1)
    assert "waiting" not in conv_dues(manager_wrote, skill)  # an agent wrote in this queue stay


def test_off_hours_suspend_agent_and_waiting_dues() -> None:
    closed = Skill(waiting_for_agent_after_seconds=20, hours=Hours(timezone="UTC"))
    assert conv_dues(queued(), closed) == {}  # never opens: never due


def test_arming_hands_over_only_earlier_wake_ups() -> None:
    assert arm([], 50) == [50]
    assert arm([40], 50) is None  # a pending one comes first: it re-arms when it fires
    assert arm([60], 50) == [50, 60]
    assert arm(list(range(100, 100 + ARMED_MAX)), 1) == [1, *range(100, 99 + ARMED_MAX)]


def test_next_wake_takes_timers_held_actions_and_retention() -> None:
    config = cfg("\n[skills.billing]\nwaiting_for_agent_after_seconds = 20\n")
    st = new_state()
    assert next_wake(st, config) is None
    st["conv"] = queued()
    assert next_wake(st, config) == T + 20_000
    st["conv"] = None
    st["expire_at"] = T + 9_000
    st["held"] = [{"id": "x", "at": T, "until": T + 5_000, "action": {}}]
    assert next_wake(st, config) == T + 5_000


@pytest.mark.parametrize(
    ("owner", "agent", "role", "auto", "verdict"),
    [
        ("ana", "ana", "agent", False, "owner"),
        ("ana", "bob", "agent", True, "not_owner"),
        ("ana", "sup", "manager", False, "manager"),
        (None, "bob", "agent", True, "take"),
        (None, "bob", "agent", False, "not_assigned"),
        (None, "sup", "manager", False, "manager"),
    ],
)
def test_ownership(owner: str | None, agent: str, role: str, auto: bool, verdict: str) -> None:
    c = queued() if owner is None else turns.assign(queued(), {"id": owner, "nickname": None}, T)
    assert ownership(c, agent, role, auto) == verdict


def test_held_actions_release_only_those_taken_after_the_opening() -> None:
    c = queued(T)
    held: list[Held] = [
        {"id": "early", "at": T - 1, "until": T + 10, "action": {}},
        {"id": "late", "at": T + 1, "until": T + 10, "action": {}},
        {"id": "other", "at": T + 1, "until": T + 10, "action": {"conversation_id": "c-older"}},
        {"id": "named", "at": T + 1, "until": T + 10, "action": {"conversation_id": "c1"}},
    ]
    apply, reject = releasable(held, c)
    assert [h["id"] for h in apply] == ["late", "named"] and [h["id"] for h in reject] == ["early", "other"]


def test_routing_by_mode_and_page() -> None:
    config = cfg()
    billing = config.page("1691462197845448")
    assert route(Env(billing, config.routing, config.external_user)) == ("billing", True)
    manual = config.routing.model_copy(update={"mode": "manual"})
    assert route(Env(billing, manual, config.external_user)) == ("general", True)
    assert route(Env(None, config.routing, config.external_user)) == ("general", False)
    skills = frozenset(config.all_skills())
    assert transfer_target(None, "billing", skills) == "billing"
    assert transfer_target("support", "billing", skills) == "support"
    assert transfer_target("nowhere", "billing", skills) is None

"""The stored state: one migration from the old shape, bounds whatever the length, copy-on-write."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.rules.conversation.state import (
    HASH_CHARS,
    OUTBOX_MAX,
    SEEN_MAX,
    STATE_BUDGET,
    STATE_VERSION,
    migrate,
    new_state,
    short_hash,
)
from tests.rules.convo import DAY, HOUR, KEY, MINUTE, SECOND, T0, Convo, cfg, console, of, rejections, triggers, types

V1 = json.loads((Path(__file__).parent / "state_v1.json").read_text())
V1_SKILLS = "\n[skills.billing]\nauto_close_after_seconds = 1800\nwaiting_for_agent_after_seconds = 60\n"


def test_new_state_is_todays_version() -> None:
    st = new_state()
    assert st["v"] == STATE_VERSION and st["conv"] is None and st["o"] == {}
    assert migrate(None) == st


def test_current_states_are_not_copied_and_newer_ones_refused() -> None:
    st: dict[str, Any] = dict(new_state())
    assert migrate(st) is st
    with pytest.raises(ValueError, match="version 3"):
        migrate({**st, "v": 3})


def test_an_open_v1_conversation_migrates_and_goes_on() -> None:
    old = copy.deepcopy(V1["open"])
    st = migrate(old)
    assert old == V1["open"]  # the stored value is not changed
    conv = st["conv"]
    assert conv is not None
    assert conv["owner"] == {"id": "ana", "nickname": "Ana"}
    assert conv["turn"] == "consumer" and conv["turn_at"] == T0  # an agent wrote: the old idle clock goes on
    assert conv["agents"] == ["ana"] and conv["counts"]["agent"] == 1
    assert st["person"] == {"convs": 1, "last_at": T0} and st["consumer_at"] == T0
    assert st["o"] == {"agent.actions": 7}  # the stage's offset guard is kept
    assert st["seen"] == {short_hash("msg:1691462197845448:m1"): T0 // 1000}
    assert st["recent"] == [short_hash("action:x1"), short_hash("action:x2")]
    assert st["armed"] == [T0 + 60_000, T0 + 1_800_000]
    agent_entry = st["outbox"]["ob-4c85d45bc4f79471-1"]
    assert agent_entry["text"] == "On it" and agent_entry["mid"] is None
    # it goes on under the new rules: the old timers do not send late warnings, the idle close comes
    c = Convo(cfg(V1_SKILLS))
    c.state = V1["open"]
    assert triggers(c.tick(T0 + 60_000)) == []  # waiting: counted as fired (assigned anyway)
    echo = c.event("echo", at=T0 + 61_000, mid="mid.9", app_id="950864918368986", metadata="ob-4c85d45bc4f79471-1")
    assert [(v["type"], v["mid"], v["text"]) for v in console(echo)] == [("agent_message", "mid.9", "On it")]
    again = c.msg("hi", at=T0 + 2000, mid="m1")  # a redelivery of the v1 message: still a duplicate
    assert again.duplicate
    assert c.act("accept", at=T0 + 3000, agent="ana", action_id="x1").outputs == []  # the old action id: applied
    closed = c.tick(T0 + 1_800_000)
    assert "conversation_closed" in types(closed)
    (summary,) = of(closed, "history")
    assert summary["agents"] == ["ana"] and summary["conversation_id"] == "c-e6955160d2f481ae62df"


def test_a_v1_pending_survey_still_counts() -> None:
    c = Convo(cfg(V1_SKILLS))
    c.state = V1["closed_with_survey"]
    out = c.msg("5", at=T0 + MINUTE, mid="m-answer")
    (fact,) = of(out, "csat_facts")
    assert (fact["fact"], fact["score"], fact["agent_id"]) == ("answer", 5, "ana")
    (hist,) = of(out, "history")
    assert hist["csat_score"] == 5 and hist["agents"] == ["ana"]


def test_dedupe_keys_are_fixed_size_hashes_only_for_kinds_that_need_them() -> None:
    c = Convo()
    c.msg("hi", at=T0, mid="m" * 300)
    assert c.state is not None
    assert all(len(k) == HASH_CHARS for k in c.state["seen"])
    n = len(c.state["seen"])
    for wm in (T0 + 1, T0 + 2):
        c.event("delivery", at=T0 + 3, watermark=wm)
        c.event("read", at=T0 + 3, watermark=wm)
    assert len(c.state["seen"]) == n  # receipts are idempotent by their watermark
    c.act("accept")
    c.act("message", text="hi")
    ob = next(iter(k for k, e in c.state["outbox"].items() if e["origin"] == "agent"))
    c.event("echo", at=T0 + 4, mid="mid.a", app_id="950864918368986", metadata=ob)
    c.event("echo", at=T0 + 5, mid="mid.a", app_id="950864918368986", metadata=ob)
    assert len(c.state["seen"]) == n  # our echoes are idempotent by their outbox id
    c.event("echo", at=T0 + 6, mid="mid.inbox", app_id="263902037430900", text="from the page")
    assert len(c.state["seen"]) == n + 1  # a page echo is not


def test_no_deep_copy_parts_not_touched_are_shared_and_the_stored_state_is_unchanged() -> None:
    c = Convo()
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + SECOND)
    before = c.state
    assert before is not None
    snapshot = copy.deepcopy(before)
    out = c.act("typing", at=T0 + 2 * SECOND, on=True)
    assert before == snapshot  # the stored value was not changed in place
    assert out.state is not None and out.state is not before
    for part in ("seen", "conv", "person", "outbox", "held", "wm"):
        assert out.state[part] is before[part], part  # unchanged parts are the stored objects
    msg = c.msg("more", at=T0 + 3 * SECOND)
    assert msg.state is not None and msg.state["outbox"] is out.state["outbox"]


def _emoji_text(n: int) -> str:
    return "\U0001f600" * n


def test_a_very_long_conversation_stays_under_16_kb() -> None:
    """Thousands of inputs of every kind at their largest: the serialized state never passes the budget."""
    config = cfg(
        "\n[limits]\nagent_text = 2000\nconsumer_text = 5000\n"
        "\n[skills.billing]\nauto_accept = true\nauto_close_after_seconds = 86400\n"
        "\n[skills.support]\nauto_accept = true\n"
        "\n[csat]\nenabled = true\n"
    )
    c = Convo(config)
    longest = 0
    at = T0
    agents = [f"agent-{i:03d}-" + "x" * 100 for i in range(40)]
    for i in range(3000):
        at += 7 * SECOND
        step = i % 12
        agent = agents[i % len(agents)]
        if step == 0:
            c.msg(_emoji_text(5000), at=at, mid=f"m{i}-" + "y" * 200)
        elif step == 1:
            c.act("message", at=at, agent=agent, role="manager", text=_emoji_text(2000),
                  agent_nickname="N" * 200)
        elif step == 2:
            c.event("echo", at=at, mid=f"e{i}", app_id="263902037430900", text=_emoji_text(2000))
        elif step == 3:
            c.event("reaction", at=at, data={"mid": f"m{i}", "reaction": "love", "action": "react"})
        elif step == 4:
            c.act("join", at=at, agent=agent, role="manager", agent_nickname="M" * 200)
        elif step == 5:
            c.act("transfer", at=at, agent=agent, role="manager", to_skill="support" if i % 24 < 12 else "billing",
                  to_agent_id=agent, to_agent_nickname="T" * 200)
        elif step == 6:
            c.event("delivery", at=at, watermark=at)
        elif step == 7 and i % 96 == 7:
            c.act("close", at=at, agent=agent, role="manager")
            for k in range(6):  # actions for the closed conversation: held, bounded
                c.act("message", at=at + k, agent=agent, text=_emoji_text(600), conversation_id=f"later-{k}")
        elif step == 8:
            c.postback("P" * 1000, at=at, title="T" * 20)
        elif step == 9:
            c.tick(at)
        else:
            c.act("set_response_time", at=at, agent=agent, role="manager", seconds=3600)
        size = len(orjson.dumps(c.state))
        longest = max(longest, size)
        assert size <= STATE_BUDGET, f"input {i}: {size} bytes"
    st = c.state
    assert st is not None
    assert len(st["seen"]) <= SEEN_MAX and len(st["outbox"]) <= OUTBOX_MAX
    assert longest > STATE_BUDGET // 4  # the drive did fill the bounded parts


def test_closed_state_is_compacted_then_deleted() -> None:
    c = Convo(cfg("\n[csat]\nenabled = false\n[retention]\nclosed_state_seconds = 3600\nreturning_days = 30\n"))
    c.msg("hi", at=T0)
    c.act("accept", at=T0 + SECOND)
    c.act("message", at=T0 + 2 * SECOND, text="done")
    closed = c.act("close", at=T0 + 3 * SECOND)
    assert closed.arms == [T0 + 3 * SECOND + HOUR]
    kept = c.tick(T0 + 3 * SECOND + HOUR)
    st = c.state
    assert st is not None and ("state", "compacted") in kept.notes
    assert st["outbox"] == {} and st["recent"] == [] and st["conv"] is None
    assert st["person"] is not None and st["consumer_at"] == T0 and len(st["seen"]) == 1
    # the next wake-ups: the dedupe key (48 h), Meta's 7-day window, then the person (30 days)
    c.tick(T0 + 2 * DAY + 1)
    assert c.state is not None and c.state["seen"] == {} and c.state["consumer_at"] == T0
    c.tick(T0 + 7 * DAY + 1)
    assert c.state is not None and c.state["consumer_at"] is None and c.state["person"] is not None
    returning = Convo(cfg("\n[retention]\nreturning_days = 30\n"))
    returning.state = c.state
    assert triggers(returning.msg("back again", at=T0 + 10 * DAY)) == ["welcome_returning"]
    gone = c.tick(T0 + 30 * DAY + 3 * SECOND)
    assert gone.state is None and ("state", "deleted") in gone.notes


def test_a_key_that_never_opened_a_conversation_expires_too() -> None:
    c = Convo(cfg("\n[retention]\nclosed_state_seconds = 600\n"))
    out = c.event("delivery", at=T0, watermark=T0)
    assert out.arms == [T0 + 600_000]
    assert c.tick(T0 + 600_000).state is None


def test_forget_erases_the_state_and_shows_the_conversation_closed() -> None:
    c = Convo()
    c.msg("hi", at=T0)
    assert rejections(c.act("forget", at=T0 + SECOND)) == ["invalid_action"]  # needs role admin
    out = c.act("forget", at=T0 + 2 * SECOND, agent="privacy-bot", role="admin")
    assert out.state is None
    assert [(v["type"], v["reason"]) for v in console(out)] == [("conversation_closed", "forgotten")]
    assert of(out, "history") == []
    nothing = Convo()
    assert nothing.act("forget", at=T0, agent="privacy-bot", role="admin").state is None
    assert KEY  # same key throughout

"""A seeded random walk over every input kind: no exception, and the state's invariants hold after
every decision (bounded size, one shape, a queue stay exactly when unassigned, no survey beside an
open conversation, held actions only without one, unique output ids)."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from streams.rules.conversation.api import Decision
from streams.rules.conversation.state import ARMED_MAX, STATE_BUDGET, STATE_VERSION, migrate
from tests.rules.convo import SECOND, T0, Convo, cfg

CONFIG = """
[skills.billing]
auto_accept = true
auto_close_after_seconds = 60
auto_close_warning_after_seconds = 30
agent_not_responding_after_seconds = 20
waiting_for_agent_after_seconds = 15
expected_response_seconds = 600
[skills.billing.hours]
timezone = "Europe/Madrid"
mon = ["09:00-18:00"]
tue = ["09:00-18:00"]
wed = ["00:00-24:00"]
[skills.support]
waiting_for_agent_after_seconds = 15
[csat]
enabled = true
on_consumer_close = true
expire_after_seconds = 120
[messaging]
urgent_payloads = ["URGENT"]
not_urgent_payloads = ["CALM"]
[retention]
closed_state_seconds = 60
returning_days = 1
"""

AGENTS = ["ana", "bob", "sup"]


def step(c: Convo, rng: random.Random, at: int) -> Decision:
    agent = rng.choice(AGENTS)
    role = "manager" if agent == "sup" else "agent"
    roll = rng.randrange(20)
    cid = c.state["conv"]["id"] if c.state and c.state["conv"] else None
    if roll < 5:
        payload = rng.choice([None, None, "URGENT", "CALM", "CLOSE_CONVERSATION"])
        text = rng.choice(["hi", "5", "3", "help", "2"])
        if c.state and c.state["survey"] and rng.random() < 0.3:
            payload = f"CSAT:{c.state['survey']['conversation_id']}:{rng.randint(1, 5)}"
        return c.msg(text, at=at, quick_reply_payload=payload, standby=rng.random() < 0.05)
    if roll == 5:
        return c.postback(rng.choice(["GET_STARTED", "URGENT", "CLOSE_CONVERSATION"]), at=at)
    if roll == 6:
        kind = rng.choice(["delivery", "read"])
        return c.event(kind, at=at, watermark=at - rng.randrange(0, 5000))
    if roll == 7:
        outbox = list(c.state["outbox"]) if c.state else []
        if outbox and rng.random() < 0.7:
            return c.event("echo", at=at, mid=f"mid{at}", app_id="950864918368986", metadata=rng.choice(outbox))
        return c.event("echo", at=at, mid=f"mid{at}", app_id="263902037430900", text="page")
    if roll == 8:
        outbox = list(c.state["outbox"]) if c.state else ["none"]
        status = rng.choice(["sent", "failed"])
        return c.result(at=at, outbox_id=rng.choice(outbox or ["none"]), status=status, mid=f"r{at}", code=551)
    if roll <= 11:
        return c.tick(at)
    action: dict[str, Any] = {"agent": agent, "role": role}
    kind = rng.choice(["accept", "message", "message", "typing", "read", "close", "transfer", "return_to_queue",
                       "set_response_time", "join", "leave", "open"])
    if kind in ("message", "open"):
        action["text"] = "hello"
    if kind == "transfer":
        action["to_skill"] = rng.choice(["billing", "support", None])
        if rng.random() < 0.4 or action["to_skill"] is None:
            action["to_agent_id"] = rng.choice(AGENTS)
        action = {k: v for k, v in action.items() if v is not None}
    if kind == "set_response_time":
        action["seconds"] = rng.choice([60, 3600])
    if kind == "typing":
        action["on"] = True
    if rng.random() < 0.2 and cid:
        action["conversation_id"] = rng.choice([cid, "c-other"])
    return c.act(kind, at=at, **action)


def check(c: Convo, out: Decision) -> None:
    ids = [o.value["event_id"] for o in out.outputs if o.dest == "skill"]
    ids += [o.value["outbox_id"] for o in out.outputs if o.dest == "outbound"]
    assert len(ids) == len(set(ids))
    st = c.state
    if st is None:
        return
    assert st["v"] == STATE_VERSION and migrate(st) is st
    assert len(orjson.dumps(st)) <= STATE_BUDGET
    assert st["armed"] == sorted(st["armed"]) and len(st["armed"]) <= ARMED_MAX
    conv = st["conv"]
    if conv is not None:
        assert (conv["owner"] is None) == (conv["queue_since"] is not None)
        assert st["survey"] is None and st["held"] == [] and st["expire_at"] is None
        assert conv["turn"] in ("agent", "consumer")
    else:
        assert st["expire_at"] is not None


@pytest.mark.parametrize("seed", range(6))
def test_random_walk(seed: int) -> None:
    rng = random.Random(seed)
    c = Convo(cfg(CONFIG))
    at = T0 + seed * 86_400_000
    for _ in range(1500):
        at += rng.choice([SECOND, 5 * SECOND, 20 * SECOND, 70 * SECOND, 3_600_000])
        out = step(c, rng, at)
        check(c, out)

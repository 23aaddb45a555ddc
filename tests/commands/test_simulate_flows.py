"""#15 demo flows of `simulate`: bot hand-offs and checkouts, valid and in order."""

from __future__ import annotations

from collections import Counter

from schemas.commerce import Order
from streams.commands.simulate import Simulator
from streams.rules.normalize import split_body
from tests.rules.convo import cfg


def test_simulate_mixes_in_hand_offs_and_checkouts() -> None:
    sim = Simulator(cfg('\n[bots]\ndefault_app_id = "1111"\n'), seed=11, invalid_ratio=0.0)
    seen: Counter[str] = Counter()
    order_of: dict[str, int] = {}  # user_ref → position of its order
    optin_of: dict[str, int] = {}
    reply_of: dict[str, int] = {}
    for i in range(4000):
        rec = sim.step(1_700_000_000_000 + i)
        if rec.topic == "orders":
            order = Order.model_validate_json(rec.value)
            assert rec.key == order.order_id.encode() and order.user_ref
            order_of.setdefault(order.user_ref, i)
            seen["order"] += 1
            continue
        if rec.topic != "raw":
            continue
        result = split_body(rec.value)
        assert not result.rejected
        for ev in result.events:
            if ev.standby:
                seen["standby"] += 1
            if ev.kind == "handover":
                seen["handover"] += 1
            if ev.kind == "optin":
                optin_of[ev.data["user_ref"]] = i
            prior = ev.data.get("prior_message")
            if prior:
                reply_of[prior["identifier"]] = i
    assert seen["handover"] >= 10 and seen["standby"] >= 2 * seen["handover"]
    assert len(order_of) >= 10 and set(reply_of) <= set(optin_of) <= set(order_of)
    assert set(order_of) - set(optin_of)  # some checkouts never opt in: their orders are reported
    assert all(optin_of[u] < order_of[u] < reply_of[u] for u in reply_of)
    assert len(sim.consumers) == 50  # people who finished a flow replace others: the count stays fixed

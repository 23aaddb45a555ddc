"""#15 parts of the state at their largest, beside the lifecycle's and #17's profile: no stored
value over 16 KB.

The drive of tests/rules/test_state.py (thousands of inputs of every kind at their largest), plus a
bot talking on the standby channel with the longest lines, a checkout at the same PSID key (opt-ins,
claims of the longest user_refs, orders waiting with the most items that fit), order updates and a
key that forwards; the person's User Profile (#17) at its largest. Every stored value stays under
`STATE_BUDGET`."""

from __future__ import annotations

from typing import Any

import orjson

from streams.core.config_bots import TRANSCRIPT_LINES_MAX
from streams.rules.conversation.api import Input
from streams.rules.conversation.state import STATE_BUDGET
from streams.rules.conversation.state_bots import LINKED_MAX, ORDERS_MAX
from streams.rules.profile import URL_MAX
from tests.rules.convo import SECOND, T0, Convo, cfg

PAGE = "1691462197845448"


def _emoji(n: int) -> str:
    return "\U0001f600" * n


def _order(i: int, psid: str) -> dict[str, Any]:
    item = {"title": "T" * 200, "subtitle": "S" * 200, "quantity": 999_999, "price": 123456.78,
            "currency": "EUR", "image_url": "https://x.example/" + "i" * 900}
    return {"order_id": f"{i:04d}" + "o" * 124, "page_id": PAGE, "psid": psid, "ref": "r" * 250,
            "order_number": "N" * 128, "status": "S" * 64, "note": "n" * 300, "recipient_name": "R" * 128,
            "merchant_name": "M" * 128, "currency": "EUR", "payment_method": "P" * 128,
            "order_url": "https://x.example/" + "u" * 900, "created_at": T0, "items": [item] * 100,
            "totals": {"subtotal": 1e9, "shipping_cost": 1e9, "total_tax": 1e9, "total_cost": 1e9},
            "adjustments": [{"name": "A" * 100, "amount": 1.0}] * 20,
            "shipping_address": {"street_1": "s" * 200, "street_2": "s" * 200, "city": "c" * 100,
                                 "postal_code": "p" * 20, "state": "x" * 100, "country": "ES"}}


def test_bots_and_checkout_parts_keep_a_long_conversation_under_16_kb() -> None:
    config = cfg(
        "\n[limits]\nagent_text = 2000\nconsumer_text = 5000\n"
        "\n[skills.billing]\nauto_accept = true\nauto_close_after_seconds = 86400\n"
        "\n[skills.support]\nauto_accept = true\n"
        "\n[csat]\nenabled = true\n"
        f"\n[bots]\ndefault_app_id = \"1111\"\ntranscript_minutes = 1440\ntranscript_messages = {TRANSCRIPT_LINES_MAX}\n"
        "take_thread_on_agent_message = true\n"
        "\n[optin]\nmatch_window_seconds = 604800\n"
        "\n[profile]\nenabled = true\nfields = [\"first_name\", \"last_name\", \"gender\", \"profile_pic\", "
        "\"locale\", \"timezone\"]\n"
    )
    c = Convo(config)
    psid = c.psid
    longest = 0
    parts: dict[str, int] = {}
    at = T0
    agents = [f"agent-{i:03d}-" + "x" * 100 for i in range(40)]
    for i in range(3000):
        at += 7 * SECOND
        step = i % 16
        agent = agents[i % len(agents)]
        if step == 0:
            c.msg(_emoji(5000), at=at, mid=f"m{i}-" + "y" * 200,
                  data={"prior_message": {"source": "checkbox_plugin", "identifier": f"{i}-" + "u" * 250}})
        elif step == 1:
            c.act("message", at=at, agent=agent, role="manager", text=_emoji(2000), agent_nickname="N" * 200)
        elif step == 2:
            c.event("echo", at=at, mid=f"e{i}", app_id="263902037430900", text=_emoji(2000))
        elif step == 3:
            c.msg(_emoji(5000), at=at, mid=f"s{i}", standby=True)  # the bot's customer
        elif step == 4:
            c.event("echo", at=at, mid=f"b{i}", app_id="1111", standby=True, text=_emoji(2000))
        elif step == 5:
            c.act("transfer", at=at, agent=agent, role="manager", to_skill="support" if i % 32 < 16 else "billing",
                  to_agent_id=agent, to_agent_nickname="T" * 200)
        elif step == 6:
            c.event("delivery", at=at, watermark=at)
        elif step == 7 and i % 96 == 7:
            c.act("close", at=at, agent=agent, role="manager")
            for k in range(6):
                c.act("message", at=at + k, agent=agent, text=_emoji(600), conversation_id=f"later-{k}")
        elif step == 8:
            c.postback("P" * 1000, at=at, title="T" * 20)
        elif step == 9:
            c.tick(at)
        elif step == 10 and i % 480 == 410:  # rare: orders wait for it most of the time
            c.event("optin", at=at, data={"ref": f"{i}" + "r" * 240})
        elif step == 11:  # orders naming this PSID: waiting, matched, updated
            doc = _order(i % 40, psid or "")
            doc["status"] = f"s{i}"
            c.n += 1
            value = {"type": "order", "relay_id": f"order:{i}", "order": doc, "via": "merchant"}
            c.feed(Input("relay", f"order:{i}", at, value))
        elif step == 12:
            c.event("handover", at=at, data={"type": "take_thread_control", "previous_owner_app_id": "950864918368986"})
        elif step == 13 and i % 160 == 13:  # rare: the transcript fills up in between
            c.event("handover", at=at, data={"type": "pass_thread_control", "new_owner_app_id": "950864918368986",
                                              "metadata": "M" * 1000})
        elif step == 14:
            c.n += 1
            value = {"type": "handoff", "relay_id": f"h{i}", "user_ref": "u" * 256, "conversation": None,
                     "orders": []}
            c.feed(Input("relay", f"h{i}", at, value))
        elif step == 15 and i % 64 == 15:  # #17: the profile, every field at its longest
            c.result(at=at, outbox_id=f"pf{i}", status="sent", endpoint="user_profile", profile={
                "first_name": "F" * 150, "last_name": "L" * 150, "gender": "G" * 150,
                "profile_pic": "https://platform-lookaside.fbsbx.com/" + "p" * (URL_MAX - 38),
                "locale": "es_MX", "timezone": -11.5})
        else:
            c.act("set_response_time", at=at, agent=agent, role="manager", seconds=3600)
        size = len(orjson.dumps(c.state))
        longest = max(longest, size)
        assert size <= STATE_BUDGET, f"input {i}: {size} bytes"
        for part, value in (c.state or {}).items():
            parts[part] = max(parts.get(part, 0), len(orjson.dumps(value)))
    st = c.state
    assert st is not None
    assert len(st["thread"]["lines"]) <= TRANSCRIPT_LINES_MAX
    assert len(st["checkout"]["linked"]) <= LINKED_MAX and len(st["checkout"]["orders"]) <= ORDERS_MAX
    # even if every part were at its largest at once, the value would fit
    assert sum(parts.values()) <= STATE_BUDGET, parts
    assert parts["checkout"] > 1_500 and parts["thread"] > 800  # the drive did fill the #15 parts
    assert parts["profile"] > URL_MAX + 300  # and #17's
    assert longest > STATE_BUDGET // 2

"""#15 checkout opt-in rules across keys: opt-ins meet orders (either first, within the window),
the receipt to the user_ref, the re-keying to the PSID on the reply, updates, unmatched orders.

`Cluster` plays the part of the stage and of `conversations.relay`: every key has its own state,
relay outputs wait in a queue and are delivered when the test says (late, twice, in any order)."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from schemas.commerce import Order
from streams.rules.conversation.api import Decision, Input, Output
from streams.rules.conversation.checkout import checkout_conversation_id, order_relay
from streams.rules.conversation.decider import Decider
from streams.rules.receipt import compact_order, receipt_message
from tests.rules.convo import DAY, MINUTE, SECOND, T0, cfg

PAGE = "1691462197845448"
UREF = "cart-7f3a"
PSID = "24680"
H = f"{PAGE}:uref:{UREF}"
P = f"{PAGE}:{PSID}"
OPTIN = "\n[optin]\nmatch_window_seconds = 600\n[csat]\nenabled = false\n"


def order(order_id: str = "o-1", **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "order_id": order_id, "page_id": PAGE, "user_ref": UREF, "order_number": "A-1001",
        "recipient_name": "Ana Pérez", "currency": "EUR", "payment_method": "Visa 4242", "created_at": T0,
        "items": [{"title": "Blue shoes", "subtitle": "size 38", "quantity": 1, "price": 59.9},
                  {"title": "Socks", "quantity": 3, "price": 4.5}],
        "totals": {"subtotal": 73.4, "shipping_cost": 4.95, "total_tax": 0, "total_cost": 78.35},
        "shipping_address": {"street_1": "Calle Mayor 1", "city": "Madrid", "postal_code": "28013",
                             "state": "M", "country": "ES"},
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


class Cluster:
    """Keys, their states, and the relay topic between them."""

    def __init__(self, extra: str = "") -> None:
        self.d = Decider(cfg(OPTIN + extra))
        self.states: dict[str, dict[str, Any] | None] = {}
        self.relays: deque[Output] = deque()
        self.out: list[tuple[str, Output]] = []
        self.n = 0

    def feed(self, key: str, inp: Input) -> Decision:
        d = self.d.decide(self.states.get(key), inp, key)
        if not d.duplicate:
            self.states[key] = d.state
        for o in d.outputs:
            self.out.append((key, o))
            if o.dest == "relay":
                self.relays.append(o)
        return d

    def event(self, key: str, kind: str, at: int, **fields: Any) -> Decision:
        self.n += 1
        psid = key.partition(":")[2]
        ev = {"kind": kind, "page_id": PAGE, "psid": None if psid.startswith(("uref:", "ref:")) else psid,
              "timestamp": at, "standby": False, "conversation_key": key, "received_at": at,
              "idempotency_key": fields.pop("idem", f"{kind}:{key}:{self.n}"), "data": {}, **fields}
        return self.feed(key, Input("event", ev["idempotency_key"], at, ev))

    def checkbox_optin(self, at: int, user_ref: str = UREF, ref: str | None = None) -> Decision:
        data = {"user_ref": user_ref, **({"ref": ref} if ref else {})}
        return self.event(f"{PAGE}:uref:{user_ref}", "optin", at, data=data)

    def reply(self, at: int, text: str = "Thanks! When does it ship?", psid: str = PSID,
              user_ref: str | None = UREF, mid: str | None = None) -> Decision:
        data = {"prior_message": {"source": "checkbox_plugin", "identifier": user_ref}} if user_ref else {}
        self.n += 1
        mid = mid or f"m{self.n}"
        return self.event(f"{PAGE}:{psid}", "message", at, mid=mid, text=text, data=data, attachments=[],
                          idem=f"msg:{PAGE}:{mid}")

    def order(self, doc: dict[str, Any], at: int) -> Decision:
        key, value = order_relay(Order.model_validate(doc))
        return self.feed(key, Input("relay", value["relay_id"], at, value))

    def act(self, key: str, type_: str, at: int, agent: str = "ana", **fields: Any) -> Decision:
        self.n += 1
        psid = key.partition(":")[2]
        action = {"type": type_, "action_id": f"act{self.n}", "page_id": PAGE, "psid": psid, "agent_id": agent,
                  **fields}
        return self.feed(key, Input("action", f"action:act{self.n}", at, action))

    def tick(self, key: str, at: int) -> Decision:
        return self.feed(key, Input("timer", f"timer:{at}", at, {}))

    def deliver(self, at: int, n: int | None = None, twice: bool = False) -> list[Decision]:
        """Deliver queued relays (all, or the first n), each once or twice."""
        out = []
        count = len(self.relays) if n is None else n
        for _ in range(count):
            o = self.relays.popleft()
            for _ in range(2 if twice else 1):
                out.append(self.feed(o.key, Input("relay", o.value["relay_id"], at, o.value)))
        return out

    def settle(self, at: int) -> None:
        while self.relays:
            self.deliver(at)

    def console(self, key: str | None = None, type_: str | None = None) -> list[dict[str, Any]]:
        return [o.value for k, o in self.out if o.dest == "skill" and (key is None or k == key)
                and (type_ is None or o.value["type"] == type_)]

    def outbound(self, key: str | None = None) -> list[dict[str, Any]]:
        return [o.value for k, o in self.out if o.dest == "outbound" and (key is None or k == key)]

    def of(self, dest: str) -> list[Output]:
        return [o for _, o in self.out if o.dest == dest]

    def conv(self, key: str) -> dict[str, Any] | None:
        st = self.states.get(key)
        return st["conv"] if st else None


def receipts(c: Cluster, key: str) -> list[dict[str, Any]]:
    return [o["request"] for o in c.outbound(key)
            if o["request"].get("message", {}).get("attachment", {}).get("payload", {}).get("template_type")
            == "receipt"]


@pytest.mark.parametrize("order_first", [False, True])
def test_checkbox_optin_and_order_meet_in_either_order(order_first: bool) -> None:
    c = Cluster()
    if order_first:
        c.order(order(), T0)
        assert c.conv(H) is None  # waits for its opt-in
        c.checkbox_optin(T0 + 5 * MINUTE)
    else:
        c.checkbox_optin(T0)
        c.order(order(), T0 + 5 * MINUTE)
    conv = c.conv(H)
    assert conv is not None and conv["opened_by"] == "optin" and conv["skill"] == "billing"
    assert conv["id"] == checkout_conversation_id(PAGE, UREF)
    opened = c.console(H, "conversation_opened")[0]
    assert opened["user_ref"] == UREF and opened["psid"] == f"uref:{UREF}"
    (purchase,) = c.console(H, "purchase")
    assert purchase["order"]["order_number"] == "A-1001" and purchase["order"]["totals"]["total_cost"] == 78.35
    assert purchase["receipt_sent"] is True and purchase["conversation_id"] == conv["id"]
    (req,) = receipts(c, H)
    assert req["recipient"] == {"user_ref": UREF} and req["messaging_type"] == "RESPONSE"
    payload = req["message"]["attachment"]["payload"]
    assert payload["recipient_name"] == "Ana Pérez" and payload["currency"] == "EUR"
    assert [e["title"] for e in payload["elements"]] == ["Blue shoes", "Socks"]
    assert payload["summary"]["total_cost"] == 78.35 and payload["timestamp"] == str(T0 // 1000)
    assert [o.value["type"] for o in c.of("relay")] == []  # no ref: nothing crosses keys


def test_an_order_outside_the_window_is_reported_never_dropped() -> None:
    c = Cluster()
    d = c.order(order(), T0)
    assert T0 + 600 * SECOND in d.arms
    assert c.tick(H, T0 + 599 * SECOND).outputs == []
    out = c.tick(H, T0 + 600 * SECOND)
    (report,) = [o for o in out.outputs if o.dest == "orders_unmatched"]
    assert report.key == "o-1" and report.value["reason"] == "no_optin" and report.value["key"] == H
    assert report.value["total_cost"] == 78.35 and report.value["order"]["order_id"] == "o-1"
    assert [e["order_id"] for e in c.console(H, "order_unmatched")] == ["o-1"]
    assert ("order", "unmatched") in out.notes
    c.checkbox_optin(T0 + 601 * SECOND)  # too late: no conversation
    assert c.conv(H) is None and receipts(c, H) == []


def test_a_repeated_order_record_is_applied_once() -> None:
    c = Cluster()
    c.checkbox_optin(T0)
    c.order(order(), T0 + SECOND)
    again = c.order(order(), T0 + 2 * SECOND)
    assert again.outputs == [] and len(receipts(c, H)) == 1


def test_the_reply_continues_the_conversation_under_the_psid() -> None:
    c = Cluster()
    c.checkbox_optin(T0)
    c.order(order(), T0 + SECOND)
    c.act(H, "accept", T0 + MINUTE)  # an agent took the checkout conversation before the reply
    cid = c.conv(H)["id"]  # type: ignore[index]
    reply = c.reply(T0 + 10 * MINUTE)
    conv = c.conv(P)
    assert conv is not None and conv["id"] == cid and conv["opened_by"] == "optin"  # at once, no waiting
    (msg,) = [e for e in c.console(P, "consumer_message")]
    assert msg["conversation_id"] == cid and msg["text"] == "Thanks! When does it ship?"
    assert [o.value["type"] for o in reply.outputs if o.dest == "relay"] == ["claim"]
    c.settle(T0 + 10 * MINUTE + SECOND)
    assert c.conv(H) is None
    conv = c.conv(P)
    assert conv is not None and conv["owner"] == {"id": "ana", "nickname": None} and conv["opened_at"] == T0 + SECOND
    (relinked,) = c.console(P, "conversation_relinked")
    assert relinked["user_ref"] == UREF and relinked["conversation_id"] == cid and relinked["psid"] == PSID
    purchase = c.console(P, "purchase")
    assert [p["order"]["order_id"] for p in purchase] == ["o-1"] and purchase[0]["relinked"] is True
    # the agent answers under the PSID: inside the window the reply opened
    (sent,) = c.outbound(P)[-1:]
    ans = c.act(P, "message", T0 + 11 * MINUTE, text="It ships tomorrow")
    (req,) = [o.value["request"] for o in ans.outputs if o.dest == "outbound"]
    assert req["recipient"] == {"id": PSID} and req["messaging_type"] == "RESPONSE"
    assert sent  # the welcome on the reply
    # a stale console acting on the checkout key: forwarded to the PSID
    typing = c.act(H, "typing", T0 + 12 * MINUTE, on=True)
    assert [o.value["type"] for o in typing.outputs] == ["action"]
    c.settle(T0 + 12 * MINUTE)
    assert c.outbound(P)[-1]["request"]["sender_action"] == "typing_on"
    # closing under the PSID: one summary, with the checkout's counts
    closed = c.act(P, "close", T0 + 13 * MINUTE)
    (summary,) = [o.value for o in closed.outputs if o.dest == "history"]
    assert summary["conversation_id"] == cid and summary["opened_by"] == "optin" and summary["agents"] == ["ana"]
    assert summary["psid"] == PSID and summary["consumer_messages"] == 1


def test_a_checkout_key_asks_for_no_profile_its_reply_does() -> None:
    """#17 × #15: the User Profile is asked for a person (a PSID), never for a checkout key."""
    c = Cluster("\n[profile]\nenabled = true\n")
    c.checkbox_optin(T0)
    c.order(order(), T0 + SECOND)
    assert c.conv(H) is not None and len(receipts(c, H)) == 1
    assert [o for o in c.outbound(H) if o.get("endpoint") == "user_profile"] == []
    c.reply(T0 + 10 * MINUTE)
    (read,) = [o for o in c.outbound(P) if o.get("endpoint") == "user_profile"]
    assert read["psid"] == PSID and read["request"]["psid"] == PSID


def test_relays_late_twice_and_out_of_order_change_nothing() -> None:
    c = Cluster()
    c.checkbox_optin(T0)
    c.order(order(), T0 + SECOND)
    c.reply(T0 + MINUTE)
    c.reply(T0 + MINUTE + SECOND, text="hello?", user_ref=None)  # more lines before the handoff
    c.deliver(T0 + 2 * MINUTE, twice=True)  # the claim, twice
    c.deliver(T0 + 2 * MINUTE, twice=True)  # the handoff, twice
    assert not c.relays
    assert len(c.console(P, "conversation_relinked")) == 1 and len(c.console(P, "purchase")) == 1
    conv = c.conv(P)
    assert conv is not None and conv["counts"]["consumer"] == 2
    assert len([e for e in c.console(P) if e["type"] == "conversation_opened"]) == 1


def test_order_updates_follow_the_person_under_the_window_rules() -> None:
    c = Cluster()
    c.checkbox_optin(T0)
    c.order(order(), T0 + SECOND)
    early = c.order(order(status="packed"), T0 + 2 * SECOND)  # before the reply: no message may go
    (upd,) = [o.value for o in early.outputs if o.dest == "skill"]
    assert (upd["type"], upd["sent"], upd["reason"]) == ("order_update", False, "no_reply_yet")
    c.reply(T0 + MINUTE)
    c.settle(T0 + MINUTE)
    shipped = order(status="shipped", note="Tracking ES123")
    c.order(shipped, T0 + 2 * MINUTE)  # reaches the checkout key, which forwards it
    c.settle(T0 + 2 * MINUTE)
    (sent,) = [e for e in c.console(P, "order_update")]
    assert sent["sent"] is True and sent["text"] == "Update on your order A-1001: shipped"
    req = c.outbound(P)[-1]["request"]
    assert req["messaging_type"] == "UPDATE" and req["message"]["text"] == sent["text"]
    c.order(order(status="delivered", psid=PSID), T0 + 2 * DAY)  # a day later: the window is closed
    late = c.console(P, "order_update")[-1]
    assert (late["sent"], late["reason"]) == (False, "window_closed")


def test_send_to_messenger_with_an_order_that_names_only_the_ref() -> None:
    c = Cluster()
    c.event(P, "optin", T0, data={"ref": "checkout-991"})  # sender.id + optin.ref
    c.order(order(user_ref=None, ref="checkout-991"), T0 + MINUTE)  # waits at the ref key
    assert c.conv(P) is None
    c.settle(T0 + MINUTE)  # optin_ref → the ref key forwards the order home
    conv = c.conv(P)
    assert conv is not None and conv["opened_by"] == "optin"
    (req,) = receipts(c, P)
    assert req["recipient"] == {"id": PSID}
    # an update with only the ref follows the order to the person
    c.order(order(user_ref=None, ref="checkout-991", status="shipped"), T0 + 2 * MINUTE)
    c.settle(T0 + 2 * MINUTE)
    assert c.console(P, "order_update")[-1]["sent"] is True


def test_send_to_messenger_the_ref_key_learns_the_home_first() -> None:
    c = Cluster()
    c.event(P, "optin", T0, data={"ref": "r-2"})
    c.settle(T0)
    c.order(order(user_ref=None, ref="r-2"), T0 + MINUTE)
    c.settle(T0 + MINUTE)
    assert c.conv(P) is not None and len(receipts(c, P)) == 1


def test_a_key_with_too_many_waiting_orders_reports_the_next() -> None:
    c = Cluster()
    for i in range(3):
        c.order(order(f"o-{i}", items=[]), T0 + i)
    out = c.order(order("o-3", items=[]), T0 + 10)
    (report,) = [o.value for o in out.outputs if o.dest == "orders_unmatched"]
    assert report["reason"] == "too_many_orders"
    c.checkbox_optin(T0 + 20)
    assert len(c.console(H, "purchase")) == 3 and len(receipts(c, H)) == 1  # one message before the reply


def test_a_reply_while_another_conversation_is_open_merges_the_checkout_into_it() -> None:
    c = Cluster()
    c.checkbox_optin(T0)
    c.order(order(), T0 + SECOND)
    c.reply(T0 + 10 * SECOND, text="hi", user_ref=None, mid="early")  # a conversation of its own first
    own = c.conv(P)
    assert own is not None
    c.reply(T0 + MINUTE, text="about my order")
    c.settle(T0 + MINUTE)
    conv = c.conv(P)
    assert conv is not None and conv["id"] == own["id"]
    (closed,) = c.console(P, "conversation_closed")
    assert closed["reason"] == "merged" and closed["merged_into"] == own["id"]
    assert closed["conversation_id"] == checkout_conversation_id(PAGE, UREF)
    (summary,) = [o.value for o in c.of("history")]
    assert summary["close_reason"] == "merged"
    assert c.console(P, "purchase")[0]["conversation_id"] == own["id"]


def test_the_checkout_state_is_compacted_then_deleted() -> None:
    c = Cluster("\n[retention]\nclosed_state_seconds = 600\n")
    c.checkbox_optin(T0)
    c.order(order(), T0 + SECOND)
    c.reply(T0 + MINUTE)
    c.settle(T0 + MINUTE)
    st = c.states[H]
    assert st is not None and st["checkout"]["moved_to"] == PSID
    c.tick(H, T0 + MINUTE + 600 * SECOND)
    st = c.states[H]
    assert st is not None and st["checkout"]["moved_to"] == PSID  # forwarding kept for relink_days
    c.tick(H, T0 + MINUTE + 31 * DAY)
    assert c.states[H] is None


def test_receipt_within_metas_limits_and_the_state_budget() -> None:
    items = [{"title": f"Item {i} " + "very long name " * 12, "subtitle": "s" * 200, "quantity": i + 1,
              "price": 1.005 * i, "image_url": "https://shop.example/i/" + "p" * 300} for i in range(100)]
    big = Order.model_validate(order(items=items, order_url="https://shop.example/o/1"))
    kept = compact_order(big)
    assert len(__import__("orjson").dumps(kept)) <= 2_200
    assert kept["items_total"] == 100 and kept["items_omitted"] == 100 - len(kept["items"]) > 0
    payload = receipt_message(kept, "Card")["attachment"]["payload"]
    assert len(payload["elements"]) <= 100
    assert all(len(e["title"]) <= 80 and len(e.get("subtitle", "")) <= 80 for e in payload["elements"])
    assert payload["summary"]["total_cost"] == 78.35
    with pytest.raises(ValueError, match="user_ref, psid or ref"):
        Order.model_validate(order(user_ref=None))


def test_an_unanswered_checkout_conversation_closes_by_itself() -> None:
    c = Cluster()
    c.d = Decider(cfg(OPTIN.replace("match_window_seconds = 600",
                                    "match_window_seconds = 600\nclose_unanswered_after_hours = 48")))
    c.checkbox_optin(T0)
    c.order(order(), T0 + SECOND)
    # the wake-up armed at the opt-in (its key's retention) comes first; then the close is armed
    assert c.tick(H, T0 + 3_600_000).arms == [T0 + SECOND + 48 * 3_600_000]
    assert c.conv(H) is not None
    out = c.tick(H, T0 + SECOND + 48 * 3_600_000)
    closed = [o.value for o in out.outputs if o.dest == "skill" and o.value["type"] == "conversation_closed"]
    assert [(v["closed_by"], v["reason"]) for v in closed] == [("system", "no_reply")] and c.conv(H) is None
    assert [o.dest for o in out.outputs if o.dest == "outbound"] == []  # no window: nothing is sent


def test_an_older_version_of_an_order_arriving_late_is_ignored() -> None:
    c = Cluster()
    c.checkbox_optin(T0)
    c.order(order(updated_at=T0 + 1), T0 + SECOND)
    c.reply(T0 + MINUTE)
    c.settle(T0 + MINUTE)
    c.order(order(status="delivered", updated_at=T0 + 300), T0 + 2 * MINUTE)
    c.settle(T0 + 2 * MINUTE)
    stale = c.order(order(status="shipped", updated_at=T0 + 200), T0 + 3 * MINUTE)  # keyed apart: came late
    c.settle(T0 + 3 * MINUTE)
    assert [u["status"] for u in c.console(P, "order_update")] == ["delivered"]
    assert ("order", "forwarded") in stale.notes

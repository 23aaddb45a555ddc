"""Demo flows of #15 for `messenger-streams simulate`: bot hand-offs and checkout opt-ins.

- **Bot hand-off**: a customer talks to the page's bot on the standby channel, the bot answers,
  then passes the thread to our app (`pass_thread_control`, JSON metadata naming the page's skill).
  The person then joins the simulator's consumers: agents answer and close, the customer answers
  the survey, and the conversation rules pass the thread back to the bot.
- **Checkout**: a checkbox opt-in (`optin.user_ref`), the merchant's order on `commerce.orders`,
  then the customer's reply from Messenger with `prior_message`; the person then joins the
  consumers. One checkout in ten never gets its opt-in (its order shows in `GET /orders/unmatched`).

`Flows.next` yields the next step of the flows in progress (at most `MAX_ACTIVE`), starting new ones
now and then; each step is `(topic attribute, key, value)`.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from streams.core.config import ConnectorConfig

MAX_ACTIVE = 20  # flows in progress at once
DEFAULT_BOT = "1111"  # the demo bot when the config names none
Step = tuple[str, bytes | None, bytes]


def _body(page_id: str, now: int, *, messaging: list[dict[str, object]] | None = None,
          standby: list[dict[str, object]] | None = None) -> bytes:
    entry: dict[str, object] = {"id": page_id, "time": now}
    if messaging:
        entry["messaging"] = messaging
    if standby:
        entry["standby"] = standby
    return orjson.dumps({"object": "page", "entry": [entry]})


@dataclass
class _Flow:
    page_id: str
    psid: str
    steps: Iterator[Step]
    done: bool = False


@dataclass
class Flows:
    """Bot hand-offs and checkouts, interleaved with the rest of the traffic."""

    config: ConnectorConfig
    rng: random.Random
    start_ratio: float = 0.02  # chance per record to start a flow
    step_ratio: float = 0.25  # chance per record to advance a flow in progress
    active: deque[_Flow] = field(default_factory=deque)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (page, psid) ready to join the consumers
    _n: int = 0

    def next(self, now: int) -> Step | None:
        """The next flow record, or None (the caller sends its usual traffic)."""
        roll = self.rng.random()
        if roll < self.start_ratio and len(self.active) < MAX_ACTIVE:
            self.active.append(self._start())
        elif not self.active or roll > self.start_ratio + self.step_ratio:
            return None
        flow = self.active[0]
        step = next(flow.steps, None)
        if step is None:
            self.active.popleft()
            self.finished.append((flow.page_id, flow.psid))
            return None
        self.active.rotate(-1)
        return step

    def _start(self) -> _Flow:
        self._n += 1
        pages = [p.page_id for p in self.config.pages] or ["100000000000001"]
        page = self.rng.choice(pages)
        psid = str(8_000_000_000_000_000 + self.rng.randrange(10**12))
        tag = f"{self._n}-{self.rng.getrandbits(32):08x}"
        steps = self._handoff(page, psid, tag) if self._n % 2 else self._checkout(page, psid, tag)
        return _Flow(page, psid, steps)

    def _mid(self, tag: str, n: int) -> str:
        return f"m_flow{tag}-{n}"

    def _handoff(self, page: str, psid: str, tag: str) -> Iterator[Step]:
        bot = self.config.bots.app_for(page) or DEFAULT_BOT
        now = _now()
        yield "raw", None, _body(page, now, standby=[{"sender": {"id": psid}, "recipient": {"id": page},
                                                      "timestamp": now, "message": {
                                                          "mid": self._mid(tag, 1), "text": "Where is my parcel?"}}])
        now = _now()
        yield "raw", None, _body(page, now, standby=[{"sender": {"id": page}, "recipient": {"id": psid},
                                                      "timestamp": now, "message": {
                                                          "is_echo": True, "app_id": int(bot), "mid": self._mid(tag, 2),
                                                          "text": "I'm the shop bot. Let me find a person for you."}}])
        now = _now()
        skill = next((p.skill for p in self.config.pages if p.page_id == page and p.skill), None)
        metadata = orjson.dumps({"skill": skill, "reason": "asked for a human"} if skill else
                                {"reason": "asked for a human"}).decode()
        yield "raw", None, _body(page, now, messaging=[{"sender": {"id": psid}, "recipient": {"id": page},
                                                        "timestamp": now, "pass_thread_control": {
                                                            "new_owner_app_id": self.config.account.app_id,
                                                            "previous_owner_app_id": bot, "metadata": metadata}}])

    def _checkout(self, page: str, psid: str, tag: str) -> Iterator[Step]:
        user_ref = f"sim-cart-{tag}"
        opted_in = self._n % 10 != 0  # one in ten checkouts never opts in: its order is reported
        if opted_in:
            now = _now()
            yield "raw", None, _body(page, now, messaging=[{"recipient": {"id": page}, "timestamp": now,
                                                            "optin": {"ref": "checkout", "user_ref": user_ref}}])
        price = round(self.rng.uniform(5, 120), 2)
        order_id = f"sim-{tag}"
        order = {"order_id": order_id, "page_id": page, "user_ref": user_ref, "order_number": f"SIM-{self._n}",
                 "recipient_name": "Demo Customer", "currency": "EUR", "payment_method": "Visa 4242",
                 "created_at": _now(), "status": "placed",
                 "items": [{"title": self.rng.choice(("Blue shoes", "Rain jacket", "Coffee beans", "Desk lamp")),
                            "quantity": 1, "price": price}],
                 "totals": {"subtotal": price, "shipping_cost": 4.95, "total_cost": round(price + 4.95, 2)}}
        yield "orders", order_id.encode(), orjson.dumps(order)
        if not opted_in:
            return
        now = _now()
        yield "raw", None, _body(page, now, messaging=[{"sender": {"id": psid}, "recipient": {"id": page},
                                                        "timestamp": now,
                                                        "message": {"mid": self._mid(tag, 1),
                                                                    "text": "Thanks! When will it ship?"},
                                                        "prior_message": {"source": "checkbox_plugin",
                                                                          "identifier": user_ref}}])
        yield "orders", order_id.encode(), orjson.dumps({**order, "status": "shipped", "updated_at": _now()})


def _now() -> int:
    return int(time.time() * 1000)

"""Realistic demo and load traffic: Messenger webhook bodies and agent actions.

`Simulator` plays a population of consumers on the configured pages. Each step of a simulated
conversation yields one record: a consumer message, the page's own message (echo from the Page
Inbox), delivery and read receipts, an occasional redelivered body (a duplicate), and, with
`agents=True`, agent actions (accept, typing, reply, close) and CSAT answers. A small share of
bodies is invalid on purpose (`invalid_ratio`) so the dead-letter path shows in the demo.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from streams.commands.simulate_flows import Flows
from streams.core.config import ConnectorConfig
from streams.core.process import start_client
from streams.core.settings import Settings
from streams.core.topics import ensure_contract_topics
from streams.rules.normalize import conversation_key_of

PAGE_INBOX_APP_ID = "263902037430900"
CONSUMER_LINES = (
    "Hi, I have a question about my bill",
    "My order has not arrived yet",
    "Can I change my delivery address?",
    "Thanks!",
    "Is anyone there?",
    "The app keeps logging me out",
    "Hola, necesito ayuda con mi factura",
    "How do I reset my password?",
    "I would like a refund for my last order",
)
AGENT_LINES = (
    "Hi! Let me look into that for you.",
    "Thanks for waiting, I can see your account now.",
    "That is fixed. Anything else I can help with?",
)
TOPICS = (("Billing", "TOPIC_BILLING"), ("Delivery", "TOPIC_DELIVERY"), ("Other", "TOPIC_OTHER"))
CDN = "https://scontent.xx.fbcdn.net/v/t1.15752-9/sim"
# rich agent messages (#17): one of each kind, as a console would send them
RICH_MESSAGES: tuple[dict[str, object], ...] = (
    {"text": "What is it about?",
     "quick_replies": [{"title": title, "payload": payload} for title, payload in TOPICS]},
    {"text": "Here is your invoice", "attachment": {"type": "file", "url": "https://example.com/invoices/1234.pdf"}},
    {"attachment": {"type": "image", "url": "https://example.com/help/reset-password.png", "is_reusable": True}},
    {"template": {"template_type": "button", "text": "Would you like to track your order?", "buttons": [
        {"type": "web_url", "title": "Track order", "url": "https://example.com/orders/1234"},
        {"type": "postback", "title": "Talk to an agent", "payload": "AGENT"},
        {"type": "phone_number", "title": "Call us", "payload": "+15105551234"}]}},
    {"template": {"template_type": "generic", "elements": [
        {"title": "Blue shirt", "subtitle": "29.90 EUR", "image_url": "https://example.com/p/blue.jpg",
         "buttons": [{"type": "postback", "title": "Buy", "payload": "BUY_BLUE"}]},
        {"title": "Red shirt", "subtitle": "27.90 EUR", "image_url": "https://example.com/p/red.jpg",
         "buttons": [{"type": "postback", "title": "Buy", "payload": "BUY_RED"}]}]}},
    {"template": {"template_type": "media", "elements": [
        {"media_type": "image", "url": "https://www.facebook.com/acme/photos/a.1/1234567890/",
         "buttons": [{"type": "web_url", "title": "Shop now", "url": "https://example.com/shop"}]}]}},
)


@dataclass(frozen=True)
class Record:
    """One record to produce: topic attribute ("raw" or "actions"), key, value, headers."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def raw_record(body: bytes, now: int) -> Record:
    """A raw body as the `webhook` command writes it: keyed by its conversation when it holds one
    (so the conversation stage decides it in place), with its `received-at` header."""
    key = conversation_key_of(body)
    return Record("raw", key.encode() if key is not None else None, body, (("received-at", str(now).encode()),))


@dataclass
class _Consumer:
    page_id: str
    psid: str
    step: int = 0
    sent_mids: list[str] = field(default_factory=list)


def _body(page_id: str, items: list[dict[str, object]], now: int) -> bytes:
    return orjson.dumps({"object": "page", "entry": [{"id": page_id, "time": now, "messaging": items}]})


class Simulator:
    """Deterministic (seeded) traffic over the configured pages."""

    def __init__(
        self,
        config: ConnectorConfig,
        *,
        seed: int = 7,
        consumers: int = 50,
        agents: bool = True,
        invalid_ratio: float = 0.001,
        duplicate_ratio: float = 0.02,
    ) -> None:
        self.config = config
        self.rng = random.Random(seed)  # noqa: S311 - demo traffic, not security
        pages = [p.page_id for p in config.pages] or ["100000000000001"]
        self.consumers = [
            _Consumer(page_id=pages[i % len(pages)], psid=str(7_000_000_000_000_000 + seed * 100_000 + i))
            for i in range(consumers)
        ]
        self.agents = agents
        self.invalid_ratio = invalid_ratio
        self.duplicate_ratio = duplicate_ratio
        self.app_id = config.account.app_id
        self.flows = Flows(config, self.rng)  # #15: bot hand-offs and checkout opt-ins
        self._last_body: Record | None = None
        self._n = 0

    def _mid(self) -> str:
        self._n += 1
        return f"m_sim{uuid.UUID(int=self.rng.getrandbits(128)).hex}"

    def _raw(self, page_id: str, items: list[dict[str, object]], now: int) -> Record:
        rec = raw_record(_body(page_id, items, now), now)
        self._last_body = rec
        return rec

    def _action(self, c: _Consumer, kind: str, now: int, **extra: object) -> Record:
        action = {
            "type": kind,
            "action_id": f"act-{uuid.UUID(int=self.rng.getrandbits(128)).hex}",
            "page_id": c.page_id,
            "psid": c.psid,
            "agent_id": f"agent-{int(c.psid) % 4 + 1}",
            "timestamp": now,
            **extra,
        }
        return Record("actions", f"{c.page_id}:{c.psid}".encode(), orjson.dumps(action))

    def invalid(self, now: int) -> Record:
        """One of several kinds of broken body."""
        choice = self.rng.randrange(4)
        if choice == 0:
            value = b'{"object":"page","entry":[{"id":"1","messaging":[{"sender":'
        elif choice == 1:
            value = orjson.dumps({"object": "instagram", "entry": []})
        elif choice == 2:
            value = b"\xff\xfenot json at all"
        else:
            value = orjson.dumps({"object": "page", "entry": [{"id": None, "messaging": [{}]}]})
        return raw_record(value, now)

    def step(self, now: int | None = None) -> Record:
        """The next record of the traffic mix."""
        now = now or int(time.time() * 1000)
        roll = self.rng.random()
        if roll < self.invalid_ratio:
            return self.invalid(now)
        if roll < self.invalid_ratio + self.duplicate_ratio and self._last_body is not None:
            return self._last_body  # Meta redelivers: the very same bytes again
        flow = self.flows.next(now) if self.agents else None  # #15
        self._join_flows()
        if flow is not None:
            topic, key, value = flow
            return raw_record(value, now) if topic == "raw" else Record(topic, key, value)
        c = self.rng.choice(self.consumers)
        page, psid = c.page_id, c.psid
        script = (
            ("message", 3),
            ("delivery", 1),
            ("agent", 3),
            ("rich", 1),
            ("tap", 1),
            ("read", 1),
            ("page_echo", 1),
            ("message", 2),
            ("close", 1),
            ("csat", 1),
        )
        total = sum(w for _, w in script)
        pick = c.step % total
        c.step += 1
        name = script[-1][0]
        for step_name, weight in script:
            if pick < weight:
                name = step_name
                break
            pick -= weight
        if name in ("agent", "rich", "close", "csat") and not self.agents:
            name = "message"
        if name == "message":
            mid = self._mid()
            c.sent_mids.append(mid)
            item = {
                "sender": {"id": psid},
                "recipient": {"id": page},
                "timestamp": now,
                "message": self._consumer_content(mid),
            }
            return self._raw(page, [item], now)
        if name == "rich":
            return self._action(c, "message", now, **self.rng.choice(RICH_MESSAGES))
        if name == "tap":
            return self._raw(page, [self._tap(c, now)], now)
        if name in ("delivery", "read"):
            receipt: dict[str, object] = {"watermark": now - self.rng.randrange(0, 2000)}
            return self._raw(
                page, [{"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": now, name: receipt}], now
            )
        if name == "page_echo":
            item = {
                "sender": {"id": page},
                "recipient": {"id": psid},
                "timestamp": now,
                "message": {
                    "is_echo": True,
                    "app_id": int(PAGE_INBOX_APP_ID),
                    "mid": self._mid(),
                    "text": "Hi from the page team! (sent from the Page Inbox)",
                },
            }
            return self._raw(page, [item], now)
        if name == "agent":
            kind = self.rng.choice(("accept", "typing", "message", "message"))
            if kind == "message":
                return self._action(c, "message", now, text=self.rng.choice(AGENT_LINES))
            if kind == "typing":
                return self._action(c, "typing", now, on=True)
            return self._action(c, "accept", now)
        if name == "close":
            return self._action(c, "close", now)
        # a CSAT answer: a typed digit while the survey is pending
        score = self.rng.choice("5554443321")
        item = {
            "sender": {"id": psid},
            "recipient": {"id": page},
            "timestamp": now,
            "message": {"mid": self._mid(), "text": score},
        }
        return self._raw(page, [item], now)

    def _join_flows(self) -> None:
        """People whose flow ended take the place of a random consumer (their count stays fixed)."""
        while self.flows.finished:
            page, psid = self.flows.finished.pop()
            self.consumers[self.rng.randrange(len(self.consumers))] = _Consumer(page, psid, step=3)

    def _consumer_content(self, mid: str) -> dict[str, object]:
        """Mostly text; sometimes a photo, a shared location or a sticker (#17)."""
        roll = self.rng.random()
        if roll < 0.04:
            return {"mid": mid, "attachments": [{"type": "image", "payload": {"url": f"{CDN}/{mid}.jpg"}}]}
        if roll < 0.06:
            return {"mid": mid, "attachments": [{
                "type": "location", "title": "Pinned location", "url": "https://l.facebook.com/l.php?u=maps",
                "payload": {"coordinates": {"lat": round(self.rng.uniform(-60, 60), 6),
                                            "long": round(self.rng.uniform(-170, 170), 6)}}}]}
        if roll < 0.08:
            return {"mid": mid, "sticker_id": 369239263222822, "attachments": [
                {"type": "image", "payload": {"url": f"{CDN}/like.png", "sticker_id": 369239263222822}}]}
        return {"mid": mid, "text": self.rng.choice(CONSUMER_LINES)}

    def _tap(self, c: _Consumer, now: int) -> dict[str, object]:
        """The consumer taps a quick reply or a postback button of a rich message (#17)."""
        title, payload = self.rng.choice(TOPICS)
        base: dict[str, object] = {"sender": {"id": c.psid}, "recipient": {"id": c.page_id}, "timestamp": now}
        if self.rng.random() < 0.5:
            return {**base, "message": {"mid": self._mid(), "text": title, "quick_reply": {"payload": payload}}}
        return {**base, "postback": {"mid": self._mid(), "title": "Talk to an agent", "payload": "AGENT"}}

    def records(self, count: int) -> Iterator[Record]:
        for _ in range(count):
            yield self.step()


async def run_simulation(
    settings: Settings,
    config: ConnectorConfig,
    *,
    rate: float,
    count: int | None,
    duration: float | None,
    agents: bool,
    invalid_ratio: float,
    consumers: int,
    seed: int,
    quiet: bool = False,
) -> int:
    """Produce traffic at `rate` records/s until `count` records or `duration` seconds; returns count."""
    from aiokafka import AIOKafkaProducer

    sim = Simulator(config, seed=seed, consumers=consumers, agents=agents, invalid_ratio=invalid_ratio)
    await ensure_contract_topics(settings, "raw", "actions")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5, acks="all")
    await start_client(producer)
    topics = {"raw": settings.topics.name("raw"), "actions": settings.topics.name("actions"),
              "orders": settings.topics.name("orders")}  # #15: the merchant's orders
    sent = 0
    start = time.monotonic()
    last_report = start
    try:
        while (count is None or sent < count) and (duration is None or time.monotonic() - start < duration):
            rec = sim.step()
            await producer.send(topics[rec.topic], rec.value, key=rec.key, headers=list(rec.headers))
            sent += 1
            if rate > 0:
                delay = start + sent / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if not quiet and time.monotonic() - last_report >= 5:
                last_report = time.monotonic()
                print(f"simulate: {sent} records sent", file=sys.stderr)
        await producer.flush()
    finally:
        await producer.stop()
    return sent

"""Realistic, deterministic traffic with a known expected outcome.

Each conversation follows one script, each step sent when the previous step's effect is visible on
the skill topic (as a person and an agent console would react), so we know exactly what must come
out:

1. the consumer writes (one or two messages; now and then Meta redelivers the same body),
2. an agent accepts (after seeing the message), 3. may type, then answers,
4. the page team sometimes writes from the Page Inbox (an echo); delivery and read receipts,
5. the consumer writes again, 6. the agent closes, 7. the consumer answers the CSAT survey (its
`csat_received` on the console is checked after the run, by conversation id).

Conversations start on an open-loop schedule (`rate` per second), so a backlog builds while a worker
is down. Everything random comes from per-conversation seeded generators. `Probe`s are one consumer
message per partition, sent right after a fault, so every partition has input to show it is
processed again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from chaos.observe import Console, Observer, partition_of
from streams.rules.normalize import conversation_key_of

log = logging.getLogger("chaos")

PAGES = (("1691462197845448", "billing"), ("298733926841562", "support"), ("111899832631525", "general"))
PAGE_INBOX_APP_ID = 263902037430900
AGENTS = ("agent-1", "agent-2", "agent-3", "agent-4")
CONSUMER_LINES = (
    "Hi, I have a question about my bill",
    "My order has not arrived yet",
    "Can I change my delivery address?",
    "The app keeps logging me out",
    "Hola, necesito ayuda con mi factura",
    "How do I reset my password? 🔑",
)
AGENT_LINES = ("Hi! Let me look into that for you.", "Thanks for waiting, I can see your account now.")
SCORES = "5554443321"  # what people answer, roughly
# produce errors no retry can fix: the record is refused (a 2 MB body on a topic that does not take it)
PERMANENT = frozenset({"MessageSizeTooLargeError", "RecordTooLargeError", "InvalidTopicError"})


def body(page_id: str, items: list[dict[str, Any]], now: int) -> bytes:
    return orjson.dumps({"object": "page", "entry": [{"id": page_id, "time": now, "messaging": items}]})


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Sent:
    """A raw body we wrote: where it landed (partition, offset) and what it was."""

    kind: str  # "valid", "probe", "fuzz"
    partition: int
    offset: int
    value: bytes
    ref: int = -1  # fuzz case index


class Sender:
    """Our producer: raw bodies round-robin over the partitions (their offsets recorded), actions by key.
    A send that fails (the broker restarting) is retried; a retried record may land twice, which is
    what Meta's redelivery and a console's retry look like, and is counted."""

    def __init__(self, bootstrap: str, raw_topic: str, actions_topic: str, partitions: int) -> None:
        self.bootstrap = bootstrap
        self.raw_topic = raw_topic
        self.actions_topic = actions_topic
        self.partitions = partitions
        self.producer: AIOKafkaProducer | None = None
        self.raw: dict[tuple[int, int], Sent] = {}
        self.retries = 0
        self.refused: list[tuple[str, int, str]] = []  # (kind, ref, error): Kafka refused the record
        self._rr = 0

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, enable_idempotence=True,
            max_request_size=8 * 1024 * 1024, request_timeout_ms=30_000,
        )
        await self.producer.start()

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    def next_partition(self) -> int:
        self._rr += 1
        return self._rr % self.partitions

    async def _send(self, topic: str, value: bytes, key: bytes | None, partition: int | None,
                    headers: list[tuple[str, bytes]]) -> Any:
        assert self.producer is not None
        for attempt in range(1, 61):
            try:
                return await self.producer.send_and_wait(topic, value, key=key, partition=partition, headers=headers)
            except KafkaError as exc:
                if type(exc).__name__ in PERMANENT:
                    raise
                self.retries += 1
                log.debug("send to %s failed (%r), retry %d", topic, exc, attempt)
                await asyncio.sleep(min(2.0, 0.2 * attempt))
        raise RuntimeError(f"could not write to {topic} for a minute")

    async def send_raw(self, value: bytes, kind: str, ref: int = -1, partition: int | None = None) -> Sent | None:
        """Every other valid body is keyed by its conversation as the `webhook` command keys it (it
        lands on its conversation's partition and is decided there in place, one hop); the others go
        round-robin unkeyed and take two hops: one conversation's events come by both paths. Fuzzed
        bodies and probes go unkeyed (their events are accounted for on the split topic)."""
        part, key = partition, None
        if partition is None:
            part = self.next_partition()
            conversation = conversation_key_of(value) if kind == "valid" and self._rr % 2 else None
            if conversation is not None:
                part, key = None, conversation.encode()
        try:
            md = await self._send(self.raw_topic, value, key, part, [("received-at", str(now_ms()).encode())])
        except KafkaError as exc:
            self.refused.append((kind, ref, type(exc).__name__))
            return None
        sent = Sent(kind, md.partition, md.offset, value, ref)
        self.raw[(md.partition, md.offset)] = sent
        return sent

    async def send_action(self, key: str, action: dict[str, Any]) -> None:
        await self._send(self.actions_topic, orjson.dumps(action), key.encode(), None, [])


@dataclass
class Conversation:
    """One scripted conversation and what happened to it."""

    index: int
    page_id: str
    skill: str
    psid: str
    start_at: float
    rng: random.Random
    mids: dict[str, str] = field(default_factory=dict)  # mid → text sent (consumer messages, not CSAT)
    score: int | None = None  # the CSAT answer given (its body acknowledged by Kafka)
    csat_mid: str | None = None
    conversation_id: str = ""  # from the survey (csat_requested)
    step: str = "not started"
    done: bool = False
    stalled: str | None = None  # why the script could not go on
    actions: int = 0

    @property
    def key(self) -> str:
        return f"{self.page_id}:{self.psid}"


class Traffic:
    """Builds and runs the conversations of one scenario run."""

    def __init__(self, sender: Sender, observer: Observer, *, conversations: int, rate: float, seed: int,
                 tag: str, step_timeout: float) -> None:
        self.sender = sender
        self.observer = observer
        self.rate = rate
        self.step_timeout = step_timeout
        self.tag = tag
        self.convs: list[Conversation] = []
        self.planned = conversations
        self.seed = seed
        self._base = random.Random(f"{seed}:{tag}").randrange(10**6)
        self._t0 = time.time() + 0.5
        self.probe_mids: dict[str, tuple[str, str]] = {}  # mid → (key, text)
        self.redeliveries = 0
        self._probe_seq = 0
        self.started = time.time()

    def _make(self, i: int) -> Conversation:
        page_id, skill = PAGES[i % len(PAGES)]
        rng = random.Random(f"{self.seed}:{self.tag}:{i}")
        start = self._t0 + i / self.rate + rng.uniform(0, 0.5 / self.rate)
        return Conversation(i, page_id, skill, str(7_300_000_000_000_000 + self._base * 10_000 + i), start, rng)

    @property
    def arrival_window(self) -> float:
        """Seconds from the first to the last planned conversation start (more start while faults last)."""
        return max(0.0, (self.planned - 1) / self.rate)

    def pending(self) -> int:
        """Conversations not finished (done or stalled), counting those still to start."""
        running = sum(1 for c in self.convs if not c.done and c.stalled is None)
        return running + max(0, self.planned - len(self.convs))

    async def run(self, deadline: float, more: Callable[[], bool] = lambda: False) -> None:
        """Start conversation i at t0 + i/rate: the planned ones, and more while `more()` (the faults
        are not over yet); then wait until every one is done, stalled, or the deadline (epoch s)."""
        tasks: list[asyncio.Task[None]] = []
        try:
            i = 0
            while i < self.planned or (more() and time.time() < deadline):
                c = self._make(i)
                await asyncio.sleep(max(0.0, c.start_at - time.time()))
                self.convs.append(c)
                tasks.append(asyncio.create_task(self._conversation(c), name=f"conv {c.index}"))
                i += 1
            await asyncio.wait_for(asyncio.gather(*tasks), max(1.0, deadline - time.time()))
        except TimeoutError:
            pass
        finally:
            for c in self.convs:
                if not c.done and c.stalled is None:
                    c.stalled = f"deadline at step {c.step}"
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # one conversation ------------------------------------------------------------------------

    async def _think(self, c: Conversation) -> None:
        await asyncio.sleep(c.rng.uniform(0.05, 0.4))

    async def _consumer_says(self, c: Conversation, text: str, redeliver: bool = False) -> str:
        mid = f"m_chaos{self.tag}{c.index:05d}x{len(c.mids) + (1 if c.csat_mid else 0)}"
        now = now_ms()
        item = {"sender": {"id": c.psid}, "recipient": {"id": c.page_id}, "timestamp": now,
                "message": {"mid": mid, "text": text}}
        raw = body(c.page_id, [item], now)
        await self.sender.send_raw(raw, "valid")
        if redeliver:  # Meta redelivers: the very same bytes, on another partition
            self.redeliveries += 1
            await self.sender.send_raw(raw, "valid")
        return mid

    async def _act(self, c: Conversation, kind: str, agent: str, **extra: Any) -> str:
        c.actions += 1
        action_id = f"act-{self.tag}-{c.index}-{c.actions}"
        action = {"type": kind, "action_id": action_id, "page_id": c.page_id, "psid": c.psid, "agent_id": agent,
                  "timestamp": now_ms(), **extra}
        await self.sender.send_action(c.key, action)
        return action_id

    async def _expect(self, c: Conversation, step: str, pred: Any, action_id: str | None = None,
                      index: str | None = None) -> Console | None:
        """Wait for the console event of a step (on the conversation key, or another observer index,
        e.g. `chaos.observe.CID` + a conversation id); a rejection of our action ends the script."""
        c.step = step

        def match(v: dict[str, Any]) -> bool:
            if action_id is not None and v.get("type") == "action_rejected" and v.get("action_id") == action_id:
                return True
            return bool(pred(v))

        got = await self.observer.wait_for(index or c.key, match, self.step_timeout)
        if got is None:
            c.stalled = f"timeout at {step}"
            return None
        if got.value.get("type") == "action_rejected":
            c.stalled = f"rejected at {step}: {got.value.get('reason')}"
            return None
        return got

    async def _conversation(self, c: Conversation) -> None:
        await asyncio.sleep(max(0.0, c.start_at - time.time()))
        rng = c.rng
        agent = AGENTS[c.index % len(AGENTS)]
        c.step = "consumer writes"
        text = rng.choice(CONSUMER_LINES)
        first = await self._consumer_says(c, text, redeliver=rng.random() < 0.03)
        c.mids[first] = text
        wanted = [first]
        if rng.random() < 0.5:
            text2 = "Anyone there?"
            second = await self._consumer_says(c, text2)
            c.mids[second] = text2
            wanted.append(second)
        for mid in wanted:
            if not await self._expect(c, "consumer message shown",
                                      lambda v, m=mid: v.get("type") == "consumer_message" and v.get("mid") == m):
                return
        await self._think(c)
        act = await self._act(c, "accept", agent)
        if not await self._expect(c, "accepted", lambda v: v.get("type") == "conversation_accepted"
                                  and v.get("agent_id") == agent, act):
            return
        await self._think(c)
        if rng.random() < 0.3:
            await self._act(c, "typing", agent, on=True)
        reply = rng.choice(AGENT_LINES)
        act = await self._act(c, "message", agent, text=reply)
        if not await self._expect(c, "agent answer shown", lambda v: v.get("type") == "agent_message"
                                  and v.get("text") == reply and v.get("outbox_id"), act):
            return
        now = now_ms()
        receipts = [{"sender": {"id": c.psid}, "recipient": {"id": c.page_id}, "timestamp": now,
                     "delivery": {"watermark": now}}]
        if rng.random() < 0.5:
            receipts.append({"sender": {"id": c.psid}, "recipient": {"id": c.page_id}, "timestamp": now,
                             "read": {"watermark": now}})
        await self.sender.send_raw(body(c.page_id, receipts, now), "valid")
        if rng.random() < 0.2:
            echo = {"sender": {"id": c.page_id}, "recipient": {"id": c.psid}, "timestamp": now,
                    "message": {"is_echo": True, "app_id": PAGE_INBOX_APP_ID,
                                "mid": f"m_chaosecho{self.tag}{c.index:05d}", "text": "Hi from the page team!"}}
            await self.sender.send_raw(body(c.page_id, [echo], now), "valid")
        await self._think(c)
        text3 = "Great, thank you!"
        third = await self._consumer_says(c, text3)
        c.mids[third] = text3
        if not await self._expect(c, "second message shown",
                                  lambda v: v.get("type") == "consumer_message" and v.get("mid") == third):
            return
        await self._think(c)
        act = await self._act(c, "close", agent)
        asked = await self._expect(c, "survey asked", lambda v: v.get("type") == "csat_requested", act)
        if asked is None:
            return
        c.conversation_id = str(asked.value.get("conversation_id"))
        await self._think(c)
        score = int(rng.choice(SCORES))
        c.step = "answering the survey"
        c.csat_mid = f"m_chaos{self.tag}{c.index:05d}csat"
        now = now_ms()
        item = {"sender": {"id": c.psid}, "recipient": {"id": c.page_id}, "timestamp": now,
                "message": {"mid": c.csat_mid, "text": str(score)}}
        if await self.sender.send_raw(body(c.page_id, [item], now), "valid") is None:
            c.stalled = "the CSAT answer was refused by Kafka"
            return
        c.score = score
        # the script ends with the answer given; whether the console shows it (`csat_received`, found by
        # conversation id: another stage may emit it, keyed otherwise) is audited after the settle phase
        c.step = "done"
        c.done = True

    # probes ----------------------------------------------------------------------------------

    async def probe(self, partitions: int) -> list[str]:
        """One consumer message per partition from a new person whose conversation key lands on that
        partition, each body written to the raw partition of the same number; returns the mids."""
        out = []
        page_id = PAGES[0][0]
        n = 0
        for p in range(partitions):
            while True:
                self._probe_seq += 1
                n += 1
                psid = str(7_900_000_000_000_000 + zlib.crc32(self.tag.encode()) % 10**6 * 10**6 + self._probe_seq)
                if partition_of(f"{page_id}:{psid}", partitions) == p:
                    break
            mid = f"m_chaosprobe{self.tag}{self._probe_seq}"
            now = now_ms()
            text = f"probe {p}"
            item = {"sender": {"id": psid}, "recipient": {"id": page_id}, "timestamp": now,
                    "message": {"mid": mid, "text": text}}
            if await self.sender.send_raw(body(page_id, [item], now), "probe", partition=p) is not None:
                self.probe_mids[mid] = (f"{page_id}:{psid}", text)
                out.append(mid)
        return out

    # what should have come out --------------------------------------------------------------

    def consumer_mids(self) -> dict[str, tuple[str, str]]:
        """Every consumer message we sent (not CSAT answers): mid → (conversation key, text)."""
        out = {mid: (c.key, text) for c in self.convs for mid, text in c.mids.items()}
        out.update(self.probe_mids)
        return out

    def answers(self) -> Counter[tuple[str, int]]:
        """CSAT answers given: (skill, score) → count."""
        return Counter((c.skill, c.score) for c in self.convs if c.score is not None)

    def summary(self) -> dict[str, Any]:
        stalled = Counter(c.stalled for c in self.convs if c.stalled)
        return {
            "conversations_planned": self.planned,
            "conversations": len(self.convs),
            "completed": sum(1 for c in self.convs if c.done),
            "stalled": sum(stalled.values()),
            "stalled_by_reason": dict(stalled.most_common()),
            "consumer_messages_sent": len(self.consumer_mids()),
            "csat_answers_given": sum(1 for c in self.convs if c.score is not None),
            "agent_actions_sent": sum(c.actions for c in self.convs),
            "redelivered_bodies": self.redeliveries,
            "arrival_window_s": round(self.arrival_window, 1),
            "arrivals_s": round(self.convs[-1].start_at - self.convs[0].start_at, 1) if self.convs else 0.0,
        }

"""Whole conversations on real Kafka: two pages and skills, agents, echoes, receipts, restart."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.kafkatools import KafkaIO, Worker

pytestmark = pytest.mark.kafka

BILLING_PAGE, SUPPORT_PAGE = "1691462197845448", "298733926841562"
APP_ID = 950864918368986
NO_CSAT = "\n[csat]\nenabled = false\n"


def now_ms() -> int:
    return int(time.time() * 1000)


def body(page: str, *items: dict[str, Any]) -> bytes:
    return orjson.dumps({"object": "page", "entry": [{"id": page, "time": now_ms(), "messaging": list(items)}]})


def consumer_msg(page: str, psid: str, mid: str, text: str) -> dict[str, Any]:
    return {"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": now_ms(), "message": {"mid": mid, "text": text}}


def echo(page: str, psid: str, mid: str, text: str, app_id: int | None, metadata: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"is_echo": True, "mid": mid, "text": text}
    if app_id is not None:
        message["app_id"] = app_id
    if metadata is not None:
        message["metadata"] = metadata
    return {"sender": {"id": page}, "recipient": {"id": psid}, "timestamp": now_ms(), "message": message}


def receipt(page: str, psid: str, kind: str, watermark: int) -> dict[str, Any]:
    return {"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": now_ms(), kind: {"watermark": watermark}}


class Console:
    """Reads console events of one worker's skill topics."""

    def __init__(self, kafka: KafkaIO, worker: Worker) -> None:
        self.kafka = kafka
        self.w = worker

    async def events(self, skill: str, min_count: int = 0, settle: float = 1.5) -> list[dict[str, Any]]:
        return await self.kafka.read_json(self.w.topic(f"skill.{skill}"), min_count=min_count, settle=settle, timeout=60)

    async def wait_for(self, skill: str, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 45) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        evs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            evs = await self.kafka.read_json(self.w.topic(f"skill.{skill}"), settle=0.3, timeout=10)
            if pred(evs):
                return evs
        types = [e["type"] for e in evs]
        raise AssertionError(f"condition not met on skill.{skill}; got {len(types)} events, the last: {types[-30:]}")


async def action(kafka: KafkaIO, w: Worker, page: str, psid: str, type_: str, action_id: str, **fields: Any) -> None:
    value = {"type": type_, "action_id": action_id, "page_id": page, "psid": psid, "agent_id": "agent-7", **fields}
    await kafka.send(w.topic("agent.actions"), value, key=f"{page}:{psid}")


def of_type(evs: list[dict[str, Any]], t: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["type"] == t]


async def test_whole_conversations_across_two_pages(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    from tests.conftest import BASE_CONFIG

    w = make_worker(BASE_CONFIG + NO_CSAT)
    con = Console(kafka, w)
    raw = w.topic("messenger.webhook.raw")

    # two people, two pages → two skills
    first_body = body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "m-a1", "my bill is wrong"))
    await kafka.send(raw, first_body)
    await kafka.send(raw, body(SUPPORT_PAGE, consumer_msg(SUPPORT_PAGE, "bob", "m-b1", "hola")))
    # Meta redelivers alice's body: no duplicate console events
    await kafka.send(raw, first_body)
    # the page admin answers from the Page Inbox: an external message
    await kafka.send(raw, body(BILLING_PAGE, echo(BILLING_PAGE, "alice", "m-inbox", "Hi from the page", 263902037430900)))

    billing = await con.wait_for("billing", lambda e: len(of_type(e, "external_message")) == 1)
    support = await con.wait_for("support", lambda e: len(of_type(e, "consumer_message")) == 1)
    assert [e["type"] for e in billing] == ["conversation_opened", "system_message", "consumer_message", "external_message"]
    assert of_type(billing, "external_message")[0]["author"]["nickname"] == "FB External User"
    assert of_type(support, "conversation_opened")[0]["locale"] == "es_ES"
    conv_id = billing[0]["conversation_id"]
    assert all(e["conversation_id"] == conv_id for e in billing)

    # agent accepts and replies; the outbound request carries the outbox id as metadata
    await action(kafka, w, BILLING_PAGE, "alice", "accept", "act-1")
    await action(kafka, w, BILLING_PAGE, "alice", "message", "act-2", text="Let me check that")
    await action(kafka, w, BILLING_PAGE, "alice", "message", "act-2", text="Let me check that")  # redelivered
    await action(kafka, w, BILLING_PAGE, "alice", "message", "act-3", text="z" * 641)  # over the limit
    outbound = await kafka.read_json(w.topic("messenger.outbound"), min_count=4)
    agent_sends = [o for o in outbound if o["origin"] == "agent"]
    assert len(agent_sends) == 1
    send = agent_sends[0]
    assert send["request"]["messaging_type"] == "RESPONSE"
    assert send["request"]["message"] == {"text": "Let me check that", "metadata": send["outbox_id"]}

    # its echo comes back from our app: it gives the agent message its mid, never an external message
    await kafka.send(raw, body(BILLING_PAGE, echo(BILLING_PAGE, "alice", "m-agent", "Let me check that", APP_ID,
                                                  send["outbox_id"])))
    # receipts, out of order: the older read watermark after the newer one is ignored. One key, so one
    # raw partition: unkeyed bodies land on any partition and may be split in another order
    t = now_ms()
    alice = f"{BILLING_PAGE}:alice"
    await kafka.send(raw, body(BILLING_PAGE, receipt(BILLING_PAGE, "alice", "read", t)), key=alice)
    await kafka.send(raw, body(BILLING_PAGE, receipt(BILLING_PAGE, "alice", "read", t - 5000)), key=alice)
    await kafka.send(raw, body(BILLING_PAGE, receipt(BILLING_PAGE, "alice", "delivery", t - 1000)), key=alice)

    billing = await con.wait_for("billing", lambda e: len(of_type(e, "status")) == 2)
    agent_msgs = of_type(billing, "agent_message")
    assert [(m["outbox_id"], m["mid"]) for m in agent_msgs] == [(send["outbox_id"], None), (send["outbox_id"], "m-agent")]
    assert len(of_type(billing, "external_message")) == 1
    assert sorted((s["status"], s["watermark"]) for s in of_type(billing, "status")) == [("delivered", t - 1000), ("read", t)]
    rejected = of_type(billing, "action_rejected")
    assert [(r["action_id"], r["reason"]) for r in rejected] == [("act-3", "text_too_long")]
    assert len(of_type(billing, "conversation_accepted")) == 1

    # restart in the middle: state is recovered, nothing lost or doubled
    before = Counter(e["event_id"] for e in billing)
    w.restart()
    await action(kafka, w, BILLING_PAGE, "alice", "transfer", "act-4", to_skill="support")
    support = await con.wait_for("support", lambda e: len(of_type(e, "conversation_transferred")) == 1)
    billing = await con.wait_for("billing", lambda e: len(of_type(e, "conversation_transferred")) == 1)
    assert of_type(support, "conversation_transferred")[0]["conversation_id"] == conv_id
    after = Counter(e["event_id"] for e in billing)
    assert all(n == 1 for n in after.values()), "an event was emitted twice"
    assert set(before) <= set(after)

    # close and reopen: history gets the summary; the next message opens a new conversation,
    # routed by its page again (billing), while the transferred one was closed in support
    # lifecycle (#13): after a transfer to a skill the conversation waits in that skill's queue; only
    # its new owner may close it, so the agent accepts it there first
    await action(kafka, w, BILLING_PAGE, "alice", "accept", "act-4b")
    await action(kafka, w, BILLING_PAGE, "alice", "close", "act-5")
    await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "m-a2", "one more thing")))
    support = await con.wait_for("support", lambda e: len(of_type(e, "conversation_closed")) == 1)
    closed = of_type(support, "conversation_closed")[0]
    assert closed["conversation_id"] == conv_id and closed["closed_by"] == "agent"
    history = await kafka.read_json(w.topic("conversations.history"), min_count=1)
    assert [h["conversation_id"] for h in history] == [conv_id]
    assert history[0]["skills"] == ["billing", "support"] and history[0]["agents"] == ["agent-7"]
    assert history[0]["consumer_messages"] == 1 and history[0]["agent_messages"] == 1
    billing = await con.wait_for("billing", lambda e: len(of_type(e, "conversation_opened")) == 2)
    new_conv = of_type(billing, "conversation_opened")[-1]
    assert new_conv["conversation_id"] != conv_id and new_conv["returning"] is True

    # no console event was emitted twice anywhere
    for skill in ("billing", "support", "general"):
        ids = [e["event_id"] for e in await con.events(skill)]
        assert len(ids) == len(set(ids))


async def test_unknown_conversation_and_malformed_actions(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    w = make_worker()
    con = Console(kafka, w)
    await action(kafka, w, BILLING_PAGE, "nobody", "message", "x-1", text="hello?")
    await kafka.send(w.topic("agent.actions"), {"type": "accept", "page_id": BILLING_PAGE, "psid": "zed"},
                     key=f"{BILLING_PAGE}:zed")  # no action_id, no agent_id
    await kafka.send(w.topic("agent.actions"), b"not json", key=f"{BILLING_PAGE}:zed")
    await kafka.send(w.topic("agent.actions"), {"type": "accept"}, key=None)
    evs = await con.wait_for("billing", lambda e: len(of_type(e, "action_rejected")) == 2)
    assert sorted(e["reason"] for e in evs) == ["invalid_action", "unknown_conversation"]
    dlq = await kafka.read_json(w.topic("messenger.dlq"), min_count=2)
    assert sorted(d["reason"] for d in dlq) == ["invalid_action", "invalid_action"]
    assert {d["payload"] for d in dlq} == {"not json", '{"type":"accept"}'}


# --------------------------------------------------------------------------------------------
# crashes, backlogs and failover (issue 12)

def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a key (murmur2, as the producers use)."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def people_on(partition: int, partitions: int, prefix: str, count: int) -> list[str]:
    """`count` psids whose billing conversation key falls on `partition`."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        psid = f"{prefix}{i}"
        if partition_of(f"{BILLING_PAGE}:{psid}", partitions) == partition:
            out.append(psid)
        i += 1
    return out


def console_total(w: Worker, type_: str) -> float:
    """This worker's count of console events of one type (all skills), 0 when it cannot answer."""
    try:
        m = w.metrics()
    except OSError:
        return 0.0
    return sum(v for k, v in m.items() if k.startswith("messenger_console_events_total{") and f'type="{type_}"' in k)


def twin(w: Worker, tmp: Any) -> Worker:
    """A second worker of the same app (same topics and consumer group)."""
    from tests.kafkatools import free_port

    data = tmp / "twin-data"
    data.mkdir()
    env = {**w.env, "MESSENGER_STREAMS_WEB_PORT": str(free_port()), "MESSENGER_STREAMS_DATADIR": str(data)}
    return Worker(env=env, log_path=tmp / "twin.log")


async def test_failover_within_15_seconds(make_worker: Callable[..., Worker], kafka: KafkaIO, tmp_path: Any) -> None:
    """Two workers share the partitions; one is SIGKILLed: the other processes the killed worker's
    partitions again within 15 s (session timeout and heartbeat tuned, standby table copies)."""
    import signal

    from tests.conftest import BASE_CONFIG

    a = make_worker(BASE_CONFIG + NO_CSAT)
    b = twin(a, tmp_path)
    b.start()
    raw = a.topic("messenger.webhook.raw")
    con = Console(kafka, a)
    try:
        # until each worker processes one partition (a probe per partition per round)
        deadline = time.monotonic() + 120
        rnd = 0
        while True:
            for p in (0, 1):
                psid = people_on(p, 2, f"probe{rnd}-", 1)[0]
                await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, psid, f"{psid}-m", "hi")))
            await con.wait_for("billing", lambda e, r=rnd: sum(1 for x in of_type(e, "consumer_message")
                                                                if x["psid"].startswith(f"probe{r}-")) == 2)
            if console_total(a, "consumer_message") > 0 and console_total(b, "consumer_message") > 0:
                break
            assert time.monotonic() < deadline, "the two workers never shared the partitions"
            rnd += 1
        b.stop(signal.SIGKILL)
        killed_at = time.time()
        # keep writing to both partitions; the killed worker's messages wait for the takeover
        sent: dict[int, list[tuple[str, float]]] = {0: [], 1: []}
        for i in range(60):
            for p in (0, 1):
                psid = people_on(p, 2, f"after{i}-", 1)[0]
                sent[p].append((f"{psid}-m", time.time()))
                await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, psid, f"{psid}-m", "hi")))
            await asyncio.sleep(0.5)
            if i >= 10 and i % 5 == 0:
                recs = await kafka.read_all(a.topic("skill.billing"), settle=0.2, timeout=10)
                done = {orjson.loads(r.value).get("mid") for r in recs}
                if all(any(m in done for m, _ in sent[p]) for p in (0, 1)):
                    break
        # every message sent after the kill arrives (the last ones may still be in flight: wait for them)
        want = {m for p in (0, 1) for m, _ in sent[p]}
        at: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while True:
            for r in await kafka.read_all(a.topic("skill.billing"), settle=1.0, timeout=30):
                v = orjson.loads(r.value)
                if v["type"] == "consumer_message":
                    at.setdefault(v["mid"], r.timestamp / 1000)
            if want <= at.keys() or time.monotonic() > deadline:
                break
        # per partition: when the first message written after the kill was processed
        takeover = max(min(at[m] for m, _ in sent[p] if m in at) - killed_at for p in (0, 1))
        print(f"every partition processed again {takeover:.1f} s after the SIGKILL")
        assert takeover <= 15.0, f"partitions processed again only {takeover:.1f} s after the kill"
        assert all(m in at for p in (0, 1) for m, _ in sent[p]), "a message was lost in the takeover"
    finally:
        b.stop()


async def send_many(kafka: KafkaIO, topic: str, records: list[tuple[bytes, bytes | None]],
                    headers: list[tuple[str, bytes]] | None = None, per_second: float = 0) -> None:
    """Produce many records (not one round trip each; at most `per_second` if given), then wait
    for all acks."""
    p = await kafka.producer()
    futs = []
    started = time.monotonic()
    for i, (value, key) in enumerate(records):
        if per_second and i % 10 == 0:
            await asyncio.sleep(max(0.0, started + i / per_second - time.monotonic()))
        futs.append(await p.send(topic, value, key=key, headers=headers or []))
    await asyncio.gather(*futs)


async def kill_mid_stream(w: Worker, type_: str, start: float, total: int, rng: Any) -> float:
    """SIGKILL the worker at a random point while `total` console events of `type_` (beyond
    `start`) are being produced; returns how many it had sent. Fails if not caught mid-stream."""
    import signal

    target = start + rng.uniform(0.1, 0.7) * total
    deadline = time.monotonic() + 120
    seen = start
    while seen < target:
        assert time.monotonic() < deadline, f"{type_}: only {seen - start} of {total} within 120 s"
        await asyncio.sleep(0.01)
        seen = console_total(w, type_)
    w.stop(signal.SIGKILL)
    assert start < seen < start + total, f"not mid-stream: {seen - start} of {total} {type_} when killed"
    return seen - start


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
async def test_sigkill_at_random_points_loses_nothing_and_shows_no_output_without_state(
    make_worker: Callable[..., Worker], kafka: KafkaIO, store: str
) -> None:
    """Three SIGKILLs, each at a random point verified mid-stream (some but not all of the wave's
    console events out): no consumer message is lost, every repeated event id carries the same
    event, and no output is visible whose state was lost: an agent accepts, right after the
    restart, the conversations it saw opened before the kill, and none is rejected as unknown.
    With `rocksdb://` the restarted worker reads the values its predecessor left on disk (the local
    copies `_settle` stripped of acknowledged pending entries) and replays the changelog after
    them."""
    import random

    from tests.conftest import BASE_CONFIG

    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    w = make_worker(BASE_CONFIG + NO_CSAT, MESSENGER_STREAMS_STORE=store)
    con = Console(kafka, w)
    raw = w.topic("messenger.webhook.raw")
    actions = w.topic("agent.actions")
    people = [f"p{i}" for i in range(300)]

    def act(psid: str, type_: str, action_id: str, **fields: Any) -> tuple[bytes, bytes]:
        value = {"type": type_, "action_id": action_id, "page_id": BILLING_PAGE, "psid": psid, "agent_id": "agent-7",
                 **fields}
        return orjson.dumps(value), f"{BILLING_PAGE}:{psid}".encode()

    # wave 1: everyone writes; killed while the conversations open
    bodies = [(body(BILLING_PAGE, consumer_msg(BILLING_PAGE, p, f"{p}-m1", "hello")), None) for p in people]
    sending = asyncio.create_task(send_many(kafka, raw, bodies, per_second=150))
    shown = await kill_mid_stream(w, "conversation_opened", 0, len(people), rng)
    await sending
    seen_open = {e["psid"] for e in of_type(await con.events("billing", settle=0.5), "conversation_opened")}
    assert len(seen_open) >= shown > 0
    w.start()
    # the agent accepts what it saw opened, at once: its state must exist
    await send_many(kafka, actions, [act(p, "accept", f"{p}-acc") for p in sorted(seen_open)])
    await con.wait_for("billing", lambda e: len({x["psid"] for x in of_type(e, "conversation_opened")}) == len(people)
                       and len(of_type(e, "conversation_accepted")) >= len(seen_open), timeout=120)

    # wave 2: everyone writes again, the others are accepted; killed mid-wave
    rest = [p for p in people if p not in seen_open]
    before = console_total(w, "consumer_message")
    sending = asyncio.gather(
        send_many(kafka, raw, [(body(BILLING_PAGE, consumer_msg(BILLING_PAGE, p, f"{p}-m2", "still there?")), None)
                               for p in people], per_second=150),
        send_many(kafka, actions, [act(p, "accept", f"{p}-acc") for p in rest], per_second=150),
    )
    await kill_mid_stream(w, "consumer_message", before, len(people), rng)
    await sending
    w.start()
    await con.wait_for("billing", lambda e: len({x["mid"] for x in of_type(e, "consumer_message")}) == 2 * len(people)
                       and len({x["psid"] for x in of_type(e, "conversation_accepted")}) == len(people), timeout=120)

    # wave 3: the agent answers everyone; killed mid-wave
    before = console_total(w, "agent_message")
    sending = asyncio.ensure_future(send_many(kafka, actions, [act(p, "message", f"{p}-say", text=f"hi {p}")
                                                               for p in people], per_second=150))
    await kill_mid_stream(w, "agent_message", before, len(people), rng)
    await sending
    w.start()
    evs = await con.wait_for("billing", lambda e: len({x["psid"] for x in of_type(e, "agent_message")}) == len(people),
                             timeout=120)

    by_id: dict[str, dict[str, Any]] = {}
    for e in evs:
        assert by_id.setdefault(e["event_id"], e) == e, "a repeated event id must carry the same event"
    unique = list(by_id.values())
    assert sorted(m["mid"] for m in of_type(unique, "consumer_message")) == sorted(
        f"{p}-{m}" for p in people for m in ("m1", "m2"))
    for type_ in ("conversation_opened", "conversation_accepted", "agent_message"):
        assert Counter(e["psid"] for e in of_type(unique, type_)) == dict.fromkeys(people, 1), type_
    assert of_type(unique, "action_rejected") == []
    assert len({e["conversation_id"] for e in unique}) == len(people)
    out = await kafka.read_json(w.topic("messenger.outbound"), min_count=len(people))
    sends: dict[str, dict[str, Any]] = {}
    for o in out:
        assert sends.setdefault(o["outbox_id"], o) == o
    assert Counter(o["psid"] for o in sends.values() if o["origin"] == "agent") == dict.fromkeys(people, 1)
    assert await kafka.read_all(w.topic("messenger.dlq"), settle=0.5) == []


async def test_timers_wait_for_input_still_queued(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    """The worker is down while a customer writes again, behind a backlog of other bodies, and comes
    back after the customer's idle time (counted from the agent's reply) has passed: the conversation
    is not closed before the queued message is processed (it joins the same conversation). The idle
    timer then fires on the stream's time after the agent's next reply."""
    from tests.conftest import BASE_CONFIG

    idle = 15
    w = make_worker(BASE_CONFIG + NO_CSAT + f"\n[skills.billing]\nauto_close_after_seconds = {idle}\n")
    con = Console(kafka, w)
    raw = w.topic("messenger.webhook.raw")
    await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "a-1", "my order?")))
    await con.wait_for("billing", lambda e: any(x["mid"] == "a-1" for x in of_type(e, "consumer_message")))
    await action(kafka, w, BILLING_PAGE, "alice", "accept", "acc-1")
    await action(kafka, w, BILLING_PAGE, "alice", "message", "say-1", text="Let me look")
    await con.wait_for("billing", lambda e: len(of_type(e, "agent_message")) == 1)
    replied_at = time.monotonic()  # the consumer's turn: idle in 15 s
    w.stop()
    others = [(body(BILLING_PAGE, consumer_msg(BILLING_PAGE, f"o{i}", f"o{i}-1", "hi")), None) for i in range(8500)]
    await send_many(kafka, raw, others[:8000])
    await send_many(kafka, raw, [(body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "alice", "a-2", "hello??")), None)],
                    headers=[("received-at", str(now_ms()).encode())])
    await send_many(kafka, raw, others[8000:])
    # back after the idle time (the customer's reply, queued, came before it)
    await asyncio.sleep(max(0.0, replied_at + idle + 1 - time.monotonic()))
    w.start()
    evs = await con.wait_for("billing", lambda e: any(x.get("mid") == "a-2" for x in e), timeout=180)
    alice = [e for e in evs if e["psid"] == "alice"]
    types = [e["type"] for e in alice]
    assert types.count("conversation_opened") == 1, types
    assert "conversation_closed" not in types, types
    second = next(e for e in alice if e.get("mid") == "a-2")
    assert second["conversation_id"] == alice[0]["conversation_id"]
    # the timer still runs on stream time: after the agent's next reply, the conversation closes idle
    await action(kafka, w, BILLING_PAGE, "alice", "message", "say-2", text="Found it")
    evs = await con.wait_for("billing", lambda e: any(x["type"] == "conversation_closed" and x["psid"] == "alice"
                                                      for x in e), timeout=120)
    closed = [e for e in evs if e["psid"] == "alice" and e["type"] == "conversation_closed"]
    assert len(closed) == 1 and closed[0]["reason"] == "idle"
    assert closed[0]["conversation_id"] == second["conversation_id"]

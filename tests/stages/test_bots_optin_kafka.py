"""#15 end to end on real Kafka: a worker, the dispatcher and the fake Graph API.

1. A bot hands a customer over (standby transcript, `pass_thread_control`): the agent sees the
   transcript, answers inside the window the standby messages opened, closes; the survey is
   answered; only then is the thread passed back to the bot (Graph `pass_thread_control`).
2. Checkbox checkout: opt-in then order, and order then opt-in (the reverse), each gets its
   conversation and its receipt template to `recipient.user_ref`; the reply with `prior_message`
   continues the same conversation under the PSID (the agent answers the PSID); an order that
   meets no opt-in is reported (`GET /orders/unmatched`, metric).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from streams.edges.dispatch import DispatchOptions, serve
from streams.rules.conversation.checkout import checkout_conversation_id
from streams.rules.csat import answer_payload
from streams.rules.sendapi import Backoff
from tests.conftest import BASE_CONFIG
from tests.fakegraph import FakeGraph, GraphRequest
from tests.kafkatools import KafkaIO, Worker
from tests.stages.test_conversations_kafka import BILLING_PAGE, Console, action, of_type

pytestmark = pytest.mark.kafka

OURS = "950864918368986"
BOT = "1111"
TOKEN = "EAAtokenForBillingPage0001"
CONFIG = BASE_CONFIG + f"""
[bots]
default_app_id = "{BOT}"
[bots.skills]
refunds = "billing"

[csat]
enabled = true
expire_after_seconds = 600

[optin]
match_window_seconds = 20
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def entry(page: str, messaging: list[dict[str, Any]] | None = None,
          standby: list[dict[str, Any]] | None = None) -> bytes:
    e: dict[str, Any] = {"id": page, "time": now_ms()}
    if messaging:
        e["messaging"] = messaging
    if standby:
        e["standby"] = standby
    return orjson.dumps({"object": "page", "entry": [e]})


def customer(psid: str, mid: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"sender": {"id": psid}, "recipient": {"id": BILLING_PAGE}, "timestamp": now_ms(),
            "message": {"mid": mid, "text": text, **extra.pop("message", {})}, **extra}


def bot_echo(psid: str, mid: str, text: str) -> dict[str, Any]:
    return {"sender": {"id": BILLING_PAGE}, "recipient": {"id": psid}, "timestamp": now_ms(),
            "message": {"is_echo": True, "app_id": int(BOT), "mid": mid, "text": text}}


class Dispatch:
    """The real dispatcher, in this process, against the worker's topics and the fake Graph."""

    def __init__(self, w: Worker, graph: FakeGraph) -> None:
        self.opts = DispatchOptions(
            bootstrap_servers=w.env["KAFKA_BOOTSTRAP_SERVERS"],
            outbound_topic=w.topic("messenger.outbound"),
            results_topic=w.topic("messenger.send.results"),
            sent_topic=w.topic("messenger.dispatch.sent"),
            dlq_topic=w.topic("messenger.dlq"),
            group_id=f"{w.env['MESSENGER_STREAMS_APP_ID']}-dispatch",
            tokens={BILLING_PAGE: TOKEN},
            graph_url=graph.url,
            backoff=Backoff(base=0.05, cap=0.2, max_attempts=3, jitter=0.0),
            request_timeout=2.0,
            partitions=int(w.env["MESSENGER_STREAMS_PARTITIONS"]),
            shutdown_timeout=5.0,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready = asyncio.Event()

        async def on_ready() -> None:
            ready.set()

        self.task = asyncio.create_task(serve(self.opts, self.stop, on_ready=on_ready))
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait([self.task, waiter], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()
        assert ready.is_set(), "the dispatcher did not start"

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 60)


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    g = FakeGraph()
    await g.start()
    try:
        yield g
    finally:
        await g.stop()


async def until(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def to(graph: FakeGraph, edge: str, **recipient: str) -> list[GraphRequest]:
    return [r for r in graph.requests if r.edge == edge and r.body.get("recipient") == recipient]


async def test_bot_to_agent_and_back_after_the_survey(make_worker: Callable[..., Worker], kafka: KafkaIO,
                                                      graph: FakeGraph) -> None:
    w = make_worker(CONFIG)
    dispatch = Dispatch(w, graph)
    await dispatch.start()
    started = time.monotonic()
    try:
        con = Console(kafka, w)
        raw = w.topic("messenger.webhook.raw")
        psid = f"b{uuid.uuid4().hex[:6]}"
        # the bot owns the thread: we see the standby channel only
        # (raw bodies have no key: separate bodies may be split in any order; the transcript is in
        # Meta's time order, and the hand-over is sent once the standby lines were seen)
        t0 = now_ms()
        lines = [customer(psid, "s1", "I was charged twice"),
                 bot_echo(psid, "s2", "Sorry! What is your order number?"), customer(psid, "s3", "A-4242")]
        for i, line in enumerate(lines):
            await kafka.send(raw, entry(BILLING_PAGE, standby=[{**line, "timestamp": t0 + i}]))
        await con.wait_for("billing", lambda e: len([x for x in e if x["type"] == "standby_event"
                                                     and x["psid"] == psid]) == 3)
        handover = {"sender": {"id": psid}, "recipient": {"id": BILLING_PAGE}, "timestamp": now_ms(),
                    "pass_thread_control": {"new_owner_app_id": OURS, "previous_owner_app_id": BOT,
                                            "metadata": "refunds"}}
        await kafka.send(raw, entry(BILLING_PAGE, messaging=[handover]))
        await kafka.send(raw, entry(BILLING_PAGE, messaging=[handover]))  # Meta redelivers it
        evs = await con.wait_for("billing", lambda e: any(x["type"] == "handover_context" and x["psid"] == psid
                                                          for x in e))
        mine = [e for e in evs if e["psid"] == psid]
        (opened,) = of_type(mine, "conversation_opened")
        assert opened["opened_by"] == "bot"
        (ctx,) = of_type(mine, "handover_context")
        assert ctx["metadata"] == "refunds" and ctx["from_app_id"] == BOT
        assert [(line["by"], line["text"]) for line in ctx["transcript"]] == [
            ("customer", "I was charged twice"), ("bot", "Sorry! What is your order number?"),
            ("customer", "A-4242")]
        cid = opened["conversation_id"]

        # the agent answers at once: the standby messages opened Meta's window
        await action(kafka, w, BILLING_PAGE, psid, "accept", f"{psid}-acc")
        await action(kafka, w, BILLING_PAGE, psid, "message", f"{psid}-msg", text="Refunded, sorry!")
        await until(lambda: any(r.text == "Refunded, sorry!" for r in to(graph, "messages", id=psid)), "the reply")
        reply = next(r for r in to(graph, "messages", id=psid) if r.text == "Refunded, sorry!")
        assert reply.body["messaging_type"] == "RESPONSE"

        await action(kafka, w, BILLING_PAGE, psid, "close", f"{psid}-close")
        await until(lambda: any("quick_replies" in (r.body.get("message") or {}) for r in to(graph, "messages", id=psid)),
                    "the survey")
        assert to(graph, "pass_thread_control", id=psid) == []  # not before the answer
        answer = customer(psid, "a1", "5", message={"quick_reply": {"payload": answer_payload(cid, 5)}})
        await kafka.send(raw, entry(BILLING_PAGE, messaging=[answer]))
        await until(lambda: bool(to(graph, "pass_thread_control", id=psid)), "the pass back to the bot")
        (passed,) = to(graph, "pass_thread_control", id=psid)
        assert passed.body["target_app_id"] == BOT and passed.query == {"access_token": TOKEN}
        assert orjson.loads(passed.body["metadata"]) == {"conversation_id": cid, "closed_by": "agent",
                                                         "close_reason": "agent"}
        thanks = [r for r in to(graph, "messages", id=psid) if r.text and "Thank" in r.text]
        assert thanks and graph.requests.index(thanks[0]) < graph.requests.index(passed)
        # the dispatcher's result of the pass came back: the thread is the bot's, agents are told
        results = await kafka.read_json(w.topic("messenger.send.results"), settle=0.5)
        assert [r["status"] for r in results if r.get("endpoint") == "pass_thread_control"] == ["sent"]
        late = await con.events("billing")
        assert len(of_type([e for e in late if e["psid"] == psid], "conversation_opened")) == 1
        assert of_type([e for e in late if e["psid"] == psid], "thread_control")[0]["to_app_id"] == BOT
        assert graph.duplicates() == {}
        metrics = w.metrics()
        assert metrics['messenger_bot_handoffs_total{direction="in"}'] == 1.0
        assert metrics['messenger_bot_handoffs_total{direction="to_bot"}'] == 1.0
        assert metrics['messenger_thread_control_calls_total{endpoint="pass_thread_control"}'] == 1.0
    finally:
        await dispatch.close()
    print(f"bot → agent → survey → bot: {time.monotonic() - started:.1f} s")


def order(order_id: str, **ids: str) -> dict[str, Any]:
    return {"order_id": order_id, "page_id": BILLING_PAGE, "order_number": f"N-{order_id}",
            "recipient_name": "Ana Pérez", "currency": "EUR", "payment_method": "Visa 4242",
            "created_at": now_ms(), "items": [{"title": "Blue shoes", "quantity": 1, "price": 59.9}],
            "totals": {"total_cost": 59.9}, **ids}


async def test_checkout_opt_in_receipt_and_reply_under_the_psid(make_worker: Callable[..., Worker], kafka: KafkaIO,
                                                                graph: FakeGraph) -> None:
    w = make_worker(CONFIG, partitions=4)
    dispatch = Dispatch(w, graph)
    await dispatch.start()
    started = time.monotonic()
    try:
        con = Console(kafka, w)
        raw = w.topic("messenger.webhook.raw")
        orders = w.topic("commerce.orders")
        tag = uuid.uuid4().hex[:6]
        first, second, lonely = f"cart-{tag}-1", f"cart-{tag}-2", f"cart-{tag}-3"

        def optin(user_ref: str) -> bytes:
            return entry(BILLING_PAGE, messaging=[{"recipient": {"id": BILLING_PAGE}, "timestamp": now_ms(),
                                                   "optin": {"ref": "checkout", "user_ref": user_ref}}])

        # opt-in first, then its order; order first (merchant key: anything), then its opt-in
        await kafka.send(raw, optin(first))
        await kafka.send(orders, order(f"{tag}-1", user_ref=first), key="merchant-key-a")
        await kafka.send(orders, order(f"{tag}-2", user_ref=second), key=None)
        await kafka.send(orders, order(f"{tag}-2", user_ref=second), key="merchant-key-b")  # sent twice
        await kafka.send(raw, optin(second))
        await kafka.send(orders, order(f"{tag}-3", user_ref=lonely), key="merchant-key-c")  # never meets one
        await kafka.send(orders, b'{"order_id": "broken"}', key="merchant-key-d")

        for user_ref in (first, second):
            await until(lambda u=user_ref: len(to(graph, "messages", user_ref=u)) == 1, f"the receipt to {user_ref}")
            (receipt,) = to(graph, "messages", user_ref=user_ref)
            payload = receipt.body["message"]["attachment"]["payload"]
            assert payload["template_type"] == "receipt" and payload["recipient_name"] == "Ana Pérez"
            assert payload["summary"] == {"total_cost": 59.9} and payload["elements"][0]["title"] == "Blue shoes"
        evs = await con.wait_for("billing", lambda e: len([x for x in of_type(e, "purchase")
                                                           if x.get("user_ref") in (first, second)]) == 2)
        opened = {e["user_ref"]: e for e in of_type(evs, "conversation_opened") if e.get("user_ref")}
        assert opened[first]["opened_by"] == "optin" and opened[first]["psid"] == f"uref:{first}"
        assert opened[first]["conversation_id"] == checkout_conversation_id(BILLING_PAGE, first)

        # the person answers the receipt from Messenger: prior_message links the two keys
        psid = f"p{tag}"
        reply = customer(psid, f"r-{tag}", "When will it arrive?",
                         prior_message={"source": "checkbox_plugin", "identifier": first})
        await kafka.send(raw, entry(BILLING_PAGE, messaging=[reply]))
        evs = await con.wait_for("billing", lambda e: any(x["type"] == "conversation_relinked" and x["psid"] == psid
                                                          for x in e))
        under_psid = [e for e in evs if e["psid"] == psid]
        cid = checkout_conversation_id(BILLING_PAGE, first)
        assert {e["conversation_id"] for e in under_psid} == {cid}
        assert [e["text"] for e in of_type(under_psid, "consumer_message")] == ["When will it arrive?"]
        assert [p["order"]["order_id"] for p in of_type(under_psid, "purchase")] == [f"{tag}-1"]
        await action(kafka, w, BILLING_PAGE, psid, "accept", f"{tag}-acc")
        await action(kafka, w, BILLING_PAGE, psid, "message", f"{tag}-msg", text="Tomorrow!")
        await until(lambda: any(r.text == "Tomorrow!" for r in to(graph, "messages", id=psid)), "the reply to the PSID")

        # the lonely order is reported, never dropped; the broken one is dead-lettered
        await until(lambda: any(o["order_id"] == f"{tag}-3" for o in w.get_json("/orders/unmatched")["orders"]),
                    "the unmatched order", timeout=90)
        listed = w.get_json("/orders/unmatched")
        (lone,) = [o for o in listed["orders"] if o["order_id"] == f"{tag}-3"]
        assert lone["reason"] == "no_optin" and lone["user_ref"] == lonely and lone["total_cost"] == 59.9
        dlq = await kafka.read_json(w.topic("messenger.dlq"), settle=0.3)
        assert [d["reason"] for d in dlq] == ["invalid_order"]
        metrics = w.metrics()
        assert metrics['messenger_orders_total{result="matched"}'] == 2.0
        assert metrics['messenger_orders_total{result="unmatched"}'] == 1.0
        assert metrics['messenger_checkout_optins_total{event="relinked"}'] == 1.0
        assert len(to(graph, "messages", user_ref=second)) == 1  # the repeated order: one receipt
        assert graph.duplicates() == {}
    finally:
        await dispatch.close()
    print(f"checkout opt-ins: {time.monotonic() - started:.1f} s")

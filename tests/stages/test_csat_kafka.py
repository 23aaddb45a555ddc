"""CSAT end to end on real Kafka: close → survey → answers (duplicate, typed, late, non-answer),
a restart mid-way, and /csat and /metrics against counts computed here independently.

The conversation rules emit the facts (`csat.facts`, keyed by skill), `csat.responses` and the
thank-you; `csat_received` with the skill's CSAT % is the CSAT stage's to emit (decision C), so
this test asserts what the rules emit and what `/csat` counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from streams.rules.csat import answer_payload
from tests.conftest import BASE_CONFIG
from tests.kafkatools import KafkaIO, Worker
from tests.stages.test_conversations_kafka import (
    BILLING_PAGE,
    SUPPORT_PAGE,
    Console,
    action,
    body,
    consumer_msg,
    now_ms,
    of_type,
)

pytestmark = pytest.mark.kafka

CONFIG = BASE_CONFIG + """
[csat]
enabled = true
expire_after_seconds = 20  # long enough for a worker restart on a loaded 2-core machine
"""
PEOPLE = {"p1": BILLING_PAGE, "p2": BILLING_PAGE, "p5": BILLING_PAGE, "p3": SUPPORT_PAGE, "p4": SUPPORT_PAGE}
SKILL = {BILLING_PAGE: "billing", SUPPORT_PAGE: "support"}


async def wait_responses(kafka: KafkaIO, w: Worker, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(await kafka.read_json(w.topic("csat.responses"), settle=0.3, timeout=10)) >= n:
            return
    raise AssertionError(f"fewer than {n} csat.responses")


def tap(page: str, psid: str, mid: str, cid: str, score: int) -> bytes:
    item = consumer_msg(page, psid, mid, f"{score} ⭐")
    item["message"]["quick_reply"] = {"payload": answer_payload(cid, score)}
    return body(page, item)


async def test_surveys_and_answers_counted_exactly_once(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    w = make_worker(CONFIG)
    con = Console(kafka, w)
    raw = w.topic("messenger.webhook.raw")
    for psid, page in PEOPLE.items():
        await kafka.send(raw, body(page, consumer_msg(page, psid, f"{psid}-hi", "I need help")))
    for skill, n in (("billing", 3), ("support", 2)):
        await con.wait_for(skill, lambda e, n=n: len(of_type(e, "conversation_opened")) == n)
    for psid, page in PEOPLE.items():
        await action(kafka, w, page, psid, "accept", f"{psid}-acc", agent_id="ana")
        await action(kafka, w, page, psid, "close", f"{psid}-close", agent_id="ana")
    surveys: dict[str, dict[str, Any]] = {}
    for skill, n in (("billing", 3), ("support", 2)):
        evs = await con.wait_for(skill, lambda e, n=n: len(of_type(e, "csat_requested")) == n)
        surveys.update({e["psid"]: e for e in of_type(evs, "csat_requested")})
    assert surveys["p3"]["question"] == "How would you rate your conversation with us?"
    sent_at = now_ms()

    # p1 taps 5; Meta redelivers that body; p1 taps again (a new mid): counted once
    first_tap = tap(BILLING_PAGE, "p1", "p1-a", surveys["p1"]["conversation_id"], 5)
    await kafka.send(raw, first_tap)
    await kafka.send(raw, first_tap)
    await kafka.send(raw, tap(BILLING_PAGE, "p1", "p1-b", surveys["p1"]["conversation_id"], 4))
    # p4 writes something that is not an answer: a new conversation, no score
    await kafka.send(raw, body(SUPPORT_PAGE, consumer_msg(SUPPORT_PAGE, "p4", "p4-x", "wait, one more question")))
    await wait_responses(kafka, w, 1)

    w.restart()  # mid-way: surveys pending for p2, p3, p5

    await kafka.send(raw, body(BILLING_PAGE, consumer_msg(BILLING_PAGE, "p2", "p2-a", "4")))  # typed digit
    await kafka.send(raw, tap(SUPPORT_PAGE, "p3", "p3-a", surveys["p3"]["conversation_id"], 2))
    await asyncio.sleep(max(0.0, (sent_at + 21_000 - now_ms()) / 1000))
    await kafka.send(raw, tap(BILLING_PAGE, "p5", "p5-a", surveys["p5"]["conversation_id"], 5))  # expired
    # p1's answer again, after the restart
    await kafka.send(raw, first_tap)

    await wait_responses(kafka, w, 3)
    await asyncio.sleep(2)
    billing, support = await con.events("billing"), await con.events("support")

    # counted independently: surveys 3 + 2, answers p1=5 p2=4 (billing), p3=2 (support)
    expected = {"billing": {"surveys": 3, "scores": {"5": 1, "4": 1}}, "support": {"surveys": 2, "scores": {"2": 1}}}
    # the CSAT stage tells the console once per answer (a re-sent copy keeps its event_id), with the
    # skill's exact CSAT % after counting it
    received = {e["event_id"]: e for e in of_type(billing + support, "csat_received")}
    by_psid = {e["psid"]: e for e in received.values()}
    assert len(received) == 3 and sorted(by_psid) == ["p1", "p2", "p3"]
    assert [(by_psid[p]["score"], by_psid[p]["csat_percent"]) for p in ("p1", "p2", "p3")] == [
        (5, 100.0), (4, 100.0), (2, 0.0)
    ]
    assert {e["agent_id"] for e in received.values()} == {"ana"}
    assert by_psid["p3"]["skill"] == "support" and by_psid["p1"]["skill"] == "billing"
    facts = [(r.key.decode(), orjson.loads(r.value)) for r in await kafka.read_all(w.topic("csat.facts"))]
    assert {key for key, _ in facts} == {"billing", "support"} and all(f["skill"] == key for key, f in facts)
    answers = {f["psid"]: f["score"] for _, f in facts if f["fact"] == "answer"}
    assert answers == {"p1": 5, "p2": 4, "p3": 2}
    assert sorted(f["psid"] for _, f in facts if f["fact"] == "survey_sent") == sorted(PEOPLE)
    responses = await kafka.read_json(w.topic("csat.responses"))
    assert sorted((r["psid"], r["score"]) for r in responses) == [("p1", 5), ("p2", 4), ("p3", 2)]
    assert {r["conversation_id"] for r in responses} == {surveys[p]["conversation_id"] for p in ("p1", "p2", "p3")}
    thanks = [e for e in of_type(billing + support, "system_message") if e["trigger"] == "csat_thanks"]
    assert len(thanks) == 3
    # p4's non-answer opened a new conversation; p5's late tap opened nothing and counted nothing
    assert len([e for e in of_type(support, "conversation_opened") if e["psid"] == "p4"]) == 2
    assert [e for e in of_type(billing, "conversation_opened") if e["psid"] == "p5"][1:] == []

    report = w.get_json("/csat")
    assert report["complete"] is True
    for skill, exp in expected.items():
        totals = report["totals"]["skill"][skill]
        answers = sum(exp["scores"].values())
        positive = sum(n for s, n in exp["scores"].items() if int(s) >= 4)
        assert totals["surveys_sent"] == exp["surveys"]
        assert totals["answers"] == answers
        assert {k: v for k, v in totals["scores"].items() if v} == exp["scores"]
        assert totals["csat_percent"] == pytest.approx(100.0 * positive / answers, abs=0.01)
        assert totals["response_rate"] == pytest.approx(answers / exp["surveys"], abs=0.0001)
    assert report["totals"]["agent"]["ana"]["answers"] == 3
    assert report["totals"]["page"][SUPPORT_PAGE]["surveys_sent"] == 2

    metrics = w.metrics()
    assert metrics['messenger_csat_aggregate_answers{score="5",skill="billing"}'] == 1.0
    assert metrics['messenger_csat_aggregate_answers{score="4",skill="billing"}'] == 1.0
    assert metrics['messenger_csat_aggregate_answers{score="2",skill="support"}'] == 1.0
    assert metrics['messenger_csat_aggregate_surveys{skill="billing"}'] == 3.0
    assert metrics['messenger_csat_percent{skill="billing"}'] == 100.0
    assert metrics['messenger_csat_percent{skill="support"}'] == 0.0

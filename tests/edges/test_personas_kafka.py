"""The dispatcher's #17 paths on a real broker against the fake Graph API: personas created once per
page and remembered (also across dispatchers), one found at Meta reused, failures sent without a
persona, a persona Meta refuses dropped; User Profile reads answered as SendResults."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from streams.core.config_rich import Personas
from tests.dispatchtools import outbound
from tests.edges.test_dispatch_kafka import PAGE, Harness, harness, metric  # noqa: F401 - the fixture
from tests.fakegraph import Answer, graph_error

pytestmark = pytest.mark.kafka

PERSONAS = Personas(enabled=True, system_name="Acme Assistant", system_picture_url="https://x.io/bot.png",
                    agents=True, agent_picture_url="https://x.io/agent.png", retry_after_seconds=1)


def system(psid: str, outbox_id: str, text: str) -> dict[str, Any]:
    return {**outbound(psid, outbox_id, text), "origin": "system", "agent_id": None}


def agent(psid: str, outbox_id: str, text: str, nickname: str | None) -> dict[str, Any]:
    value = outbound(psid, outbox_id, text)
    if nickname:
        value["agent_nickname"] = nickname
    return value


async def until(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def persona_of(h: Harness, text: str) -> str | None:
    [req] = [r for r in h.graph.requests if r.text == text]
    return req.body.get("persona_id")


async def test_personas_once_per_page_found_failed_and_refused(harness: Harness) -> None:  # noqa: F811
    h = harness
    topic = h.opts.outbound_topic.replace("messenger.outbound", "messenger.personas")
    # a persona for the system exists at Meta already (created before a crash, never remembered)
    h.graph.people.personas[PAGE] = [{"id": "500", "name": "Acme Assistant", "profile_picture_url": "x"}]
    first = await h.start(personas=PERSONAS, personas_topic=topic)
    await h.send(system("p1", "ob-1", "Welcome!"))
    await h.send(agent("p1", "ob-2", "Hi, I am Maria", "Maria G."))
    await h.send(agent("p2", "ob-3", "Hello", "Maria G."))
    await h.send(agent("p2", "ob-4", "No nickname", None))
    await h.send({**outbound("p2", "ob-5", request={"recipient": {"id": "p2"}, "sender_action": "typing_on"})})
    await h.results(5)
    assert persona_of(h, "Welcome!") == "500"  # found by name, not created again
    maria = persona_of(h, "Hi, I am Maria")
    assert maria is not None and persona_of(h, "Hello") == maria
    assert persona_of(h, "No nickname") is None
    assert [r.body for r in h.graph.requests if "sender_action" in r.body][0].get("persona_id") is None
    assert h.graph.people.persona_creations(PAGE) == ["Acme Assistant", "Maria G."]  # one POST: Maria
    assert [m for m, p, _ in h.graph.people.calls if m == "POST"] == ["POST"]
    records = await h.kafka.read_json(topic, min_count=2)
    remembered = {r["key"]: r["persona_id"] for r in records}
    assert remembered["system"] == "500" and len(remembered) == 2
    assert [k for k, v in remembered.items() if v == maria][0].startswith("agent:")

    # another dispatcher remembers them from the topic: no Graph call for personas at all
    await first.close()
    calls = len(h.graph.people.calls)
    await h.start(personas=PERSONAS, personas_topic=topic)
    await h.send(system("p3", "ob-6", "Welcome again!"))
    await h.send(agent("p3", "ob-7", "Maria here", "Maria G."))
    await h.results(7)
    assert (persona_of(h, "Welcome again!"), persona_of(h, "Maria here")) == ("500", maria)
    assert len(h.graph.people.calls) == calls

    # Meta refuses the remembered persona (deleted there): the message goes again, without it
    h.graph.script("p4", Answer(400, graph_error(100, "(#100) Invalid persona_id")))
    await h.send(system("p4", "ob-8", "Refused persona"))
    results = await h.results(8)
    sends = [r for r in h.graph.requests if r.text == "Refused persona"]
    assert [r.body.get("persona_id") for r in sends] == ["500", None]
    assert [r["status"] for r in results if r["outbox_id"] == "ob-8"] == ["sent"]

    # a new agent persona cannot be had now: sent without one, and not asked again within retry_after
    h.graph.people.persona_failures = 1
    await h.send(agent("p5", "ob-9", "From Luis", "Luis"))
    await h.send(agent("p5", "ob-10", "From Luis again", "Luis"))
    await h.results(10)
    assert (persona_of(h, "From Luis"), persona_of(h, "From Luis again")) == (None, None)
    assert "Luis" not in h.graph.people.persona_creations(PAGE)
    book = h.running[-1].dispatcher.personas
    assert book is not None and book.failed_until  # the failure is remembered for retry_after_seconds
    await until(lambda: max(book.failed_until.values()) <= time.monotonic(), timeout=5)  # the window has passed
    await h.send(agent("p5", "ob-11", "Luis, later", "Luis"))
    await h.results(11)
    assert persona_of(h, "Luis, later") is not None and "Luis" in h.graph.people.persona_creations(PAGE)


async def test_profile_reads_answer_as_send_results(harness: Harness) -> None:  # noqa: F811
    h = harness
    h.graph.people.profiles["7000000000000001"] = {"first_name": "Ana", "locale": "es_MX", "gender": "female"}
    h.graph.people.profile_errors["7000000000000003"] = (400, graph_error(551, "This person isn't available"))
    await h.start(profile_timeout=0.5)

    def ask(psid: str, outbox_id: str) -> dict[str, Any]:
        return {**outbound(psid, outbox_id), "origin": "system", "endpoint": "user_profile",
                "request": {"psid": psid, "fields": ["first_name", "locale"]}}

    for i in (1, 2, 3):
        await h.send(ask(f"700000000000000{i}", f"pf-{i}"))
    results = {r["outbox_id"]: r for r in await h.results(3)}
    ana = results["pf-1"]
    assert (ana["status"], ana["endpoint"], ana["profile"]) == (
        "sent", "user_profile", {"id": "7000000000000001", "first_name": "Ana", "locale": "es_MX"})
    assert (results["pf-2"]["status"], results["pf-2"]["code"], results["pf-2"]["subcode"]) == (
        "failed", 100, 2018218)  # "No profile available for this user."
    assert (results["pf-3"]["status"], results["pf-3"]["code"]) == ("failed", 551)
    assert all(r["endpoint"] == "user_profile" for r in results.values())
    assert h.graph.requests == []  # no Send API call for a profile read
    assert [q["fields"] for m, p, q in h.graph.people.calls] == ["first_name,locale"] * 3

    # a slow Graph: the read fails after profile_timeout, nothing waits longer
    h.graph.people.profile_delay = 2.0
    started = time.monotonic()
    await h.send(ask("7000000000000001", "pf-4"))
    late = {r["outbox_id"]: r for r in await h.results(4)}["pf-4"]
    assert late["status"] == "failed" and late["reason"] == "timeout"
    assert time.monotonic() - started < 10

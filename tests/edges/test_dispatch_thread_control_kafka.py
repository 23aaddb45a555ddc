"""#15: the dispatcher calls the thread-control edge an outbound record names, once, and reports
it with its endpoint; an endpoint it does not know fails without a Graph call."""

from __future__ import annotations

import pytest

from tests.dispatchtools import outbound
from tests.edges.test_dispatch_kafka import PAGE, TOKENS, Harness, harness  # noqa: F401 - the fixture

pytestmark = pytest.mark.kafka

EDGES = ("pass_thread_control", "take_thread_control", "request_thread_control", "release_thread_control")


async def test_thread_control_edges(harness: Harness) -> None:  # noqa: F811 - the fixture
    await harness.start()
    bodies = {
        "pass_thread_control": {"recipient": {"id": "u1"}, "target_app_id": "1111", "metadata": '{"c": 1}'},
        "take_thread_control": {"recipient": {"id": "u1"}, "metadata": "agent replies"},
        "request_thread_control": {"recipient": {"id": "u1"}, "metadata": "agent wants to reply"},
        "release_thread_control": {"recipient": {"id": "u1"}},
    }
    for i, edge in enumerate(EDGES):
        await harness.send(outbound("u1", f"tc-{i}", request=bodies[edge], endpoint=edge, origin="system"))
    await harness.send(outbound("u1", "tc-x", request={"recipient": {"id": "u1"}}, endpoint="nope"))
    await harness.send(outbound("u1", "tc-m", text="and a message", endpoint="messages"))
    results = {r["outbox_id"]: r for r in await harness.results(6)}
    calls = await harness.graph.wait_for(5)
    assert [(c.edge, c.body) for c in calls] == [(e, bodies[e]) for e in EDGES] + [
        ("messages", {"recipient": {"id": "u1"}, "messaging_type": "RESPONSE",
                      "message": {"text": "and a message", "metadata": "tc-m"}})]
    assert all(c.query == {"access_token": TOKENS[PAGE]} for c in calls)
    for i, edge in enumerate(EDGES):
        assert (results[f"tc-{i}"]["status"], results[f"tc-{i}"]["endpoint"]) == ("sent", edge)
        assert results[f"tc-{i}"]["mid"] is None
    assert results["tc-x"]["status"] == "failed" and results["tc-x"]["reason"] == "unknown_endpoint"
    assert results["tc-m"]["status"] == "sent" and results["tc-m"]["mid"].startswith("m_")
    # redelivered records are answered from the sent log: no second call
    await harness.send(outbound("u1", "tc-0", request=bodies["pass_thread_control"], endpoint=EDGES[0]))
    await harness.results(7)
    assert len(harness.graph.requests) == 5

"""#15: the dispatcher calls the thread-control edge an outbound record names, once, and reports
it with its endpoint; an endpoint it does not know fails without a Graph call. With the page
directory's credentials (#14) thread-control calls are sent, refused and marked like sends."""

from __future__ import annotations

import dataclasses

import pytest

from streams.core.config import parse_config
from streams.core.credentials import DirectoryCredentials
from streams.core.tokens import Secret
from streams.edges.dispatch import Dispatcher
from tests.conftest import BASE_CONFIG
from tests.dispatchtools import directory_pages, outbound, serving
from tests.edges.test_dispatch_kafka import PAGE, PAGE2, TOKENS, Harness, harness  # noqa: F401 - the fixture
from tests.edges.test_dispatch_pages_kafka import read_sent_log, until

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


async def test_thread_control_with_the_page_directorys_credentials(
    harness: Harness, monkeypatch: pytest.MonkeyPatch  # noqa: F811 - the fixture
) -> None:
    """#14 × #15: thread-control calls carry the directory's token and its appsecret_proof, a page
    switched off is refused before any call, a 190 on a thread-control edge marks the page like a send's."""
    graph = harness.graph
    token = "EAAstoredPageTokenTC01"
    async with directory_pages(harness, monkeypatch, token) as pages:
        creds = DirectoryCredentials(pages.settings, parse_config(BASE_CONFIG), pages.cipher,
                                     Secret(graph.app_secret), {})
        opts = dataclasses.replace(harness.opts, tokens={})
        async with serving(opts, Dispatcher(opts, creds)):
            passed = {"recipient": {"id": "u1"}, "target_app_id": "1111", "metadata": "back to the bot"}
            await harness.send(outbound("u1", "tc-1", request=passed, endpoint="pass_thread_control", origin="system"))
            await harness.send(outbound("u2", "tc-2", page=PAGE2, request={"recipient": {"id": "u2"}},
                                        endpoint="take_thread_control", origin="system"))
            res = {r["outbox_id"]: r for r in await harness.results(2)}
            assert (res["tc-1"]["status"], res["tc-1"]["endpoint"]) == ("sent", "pass_thread_control")
            assert (res["tc-2"]["status"], res["tc-2"]["reason"], res["tc-2"]["attempts"]) == (
                "failed", "page_disabled", 0)
            assert [(c.edge, c.psid) for c in graph.requests] == [("pass_thread_control", "u1")]
            assert graph.requests[0].query["access_token"] == token and graph.proof_ok(graph.requests[0].query)

            # Meta rejects the token on a thread-control call: the page needs re-authorization everywhere
            graph.rejected_tokens.add(token)
            await harness.send(outbound("u1", "tc-3", request={"recipient": {"id": "u1"}},
                                        endpoint="release_thread_control", origin="system"))
            res = {r["outbox_id"]: r for r in await harness.results(3)}
            assert (res["tc-3"]["code"], res["tc-3"]["reason"], res["tc-3"]["endpoint"]) == (
                190, "reauth_required", "release_thread_control")
            assert [c.edge for c in graph.requests] == ["pass_thread_control", "release_thread_control"]
            await until("the page shows needs_reauth", lambda: getattr(creds.directory.view(PAGE), "status", "")
                        == "needs_reauth")
            await harness.send(outbound("u1", "tc-4", request={"recipient": {"id": "u1"}},
                                        endpoint="request_thread_control", origin="system"))
            res = {r["outbox_id"]: r for r in await harness.results(4)}
            assert (res["tc-4"]["code"], res["tc-4"]["attempts"]) == (190, 0) and len(graph.requests) == 2
        convs = {"tc-1": f"{PAGE}:u1", "tc-2": f"{PAGE2}:u2", "tc-3": f"{PAGE}:u1", "tc-4": f"{PAGE}:u1"}
        assert await read_sent_log(opts, convs) == {"tc-1": "sent", "tc-2": "failed", "tc-3": "failed",
                                                    "tc-4": "failed"}

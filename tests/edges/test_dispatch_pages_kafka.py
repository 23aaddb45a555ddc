"""The dispatcher with the page directory's credentials (issue 14) on a real broker, in process:
tokens decrypted from `connector.pages` and sent with their `appsecret_proof`; pages switched off
refused before any Graph call; a 190 marks the page `needs_reauth` for every process (a `reauth:`
record and a `page_status` console event) and refuses its later sends; reconnecting (a new token)
resumes sending without a restart. The sent log decides as for static tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from schemas.pages import PageRecord
from streams.core.config import parse_config
from streams.core.config_rich import Personas
from streams.core.credentials import DirectoryCredentials
from streams.core.pages import PageDirectory
from streams.core.tokens import Secret
from streams.edges.dispatch import Dispatcher
from streams.edges.sentlog import SentLedger
from tests.conftest import BASE_CONFIG
from tests.dispatchtools import directory_pages, serving
from tests.edges.test_dispatch_kafka import PAGE, PAGE2, Harness, harness, outbound

__all__ = ["harness"]  # the fixture, shared with the dispatcher's own tests

pytestmark = pytest.mark.kafka


async def until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


async def test_tokens_refusals_190_and_reconnect_from_the_page_directory(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = harness.graph
    token1, token2 = "EAAstoredPageToken0001", "EAAstoredPageToken0002"
    async with directory_pages(harness, monkeypatch, token1) as pages:
        settings, cipher, writer = pages.settings, pages.cipher, pages.writer
        creds = DirectoryCredentials(settings, parse_config(BASE_CONFIG), cipher, Secret(graph.app_secret), {})
        opts = dataclasses.replace(harness.opts, tokens={})
        async with serving(opts, Dispatcher(opts, creds)) as task:
            # a stored token, with its proof; a page switched off: refused without a Graph call
            await harness.send(outbound("u1", "o-1"))
            await harness.send(outbound("u2", "o-2", page=PAGE2))
            res = {r["outbox_id"]: r for r in await harness.results(2)}
            assert res["o-1"]["status"] == "sent"
            assert res["o-2"]["status"] == "failed" and res["o-2"]["reason"] == "page_disabled"
            assert res["o-2"]["attempts"] == 0
            assert [r.psid for r in graph.requests] == ["u1"]
            assert graph.requests[0].query["access_token"] == token1 and graph.proof_ok(graph.requests[0].query)

            # Meta rejects the token: 190, then the page's next send is refused at once
            graph.rejected_tokens.add(token1)
            await harness.send(outbound("u1", "o-3"))
            await harness.send(outbound("u1", "o-4"))
            res = {r["outbox_id"]: r for r in await harness.results(4)}
            assert res["o-3"]["code"] == 190 and res["o-3"]["reason"] == "reauth_required"
            assert res["o-4"]["code"] == 190 and res["o-4"]["reason"] == "reauth_required"
            assert res["o-4"]["attempts"] == 0 and len(graph.requests) == 2
            # … and every process sees it: the reauth mark in connector.pages, a page_status console event
            await until("the page shows needs_reauth", lambda: getattr(creds.directory.view(PAGE), "status", "")
                        == "needs_reauth")
            events = await harness.kafka.read_json(settings.topics.skill("billing"), min_count=1, settle=0.2)
            assert [(e["type"], e["page_id"], e["status"]) for e in events] == [("page_status", PAGE, "needs_reauth")]
            assert token1 not in str(events)

            # reconnecting stores a new token: sending resumes, nothing restarted
            await writer.put_page(PageRecord(page_id=PAGE, skill="billing", token=cipher.encrypt(Secret(token2)),
                                             token_id="t2"))
            await until("the new token is seen", lambda: getattr(creds.directory.record(PAGE), "token_id", "") == "t2")
            await harness.send(outbound("u1", "o-5"))
            res = {r["outbox_id"]: r for r in await harness.results(5)}
            assert res["o-5"]["status"] == "sent" and graph.requests[-1].query["access_token"] == token2
            assert not task.done()
        assert creds.directory._mirror is None  # the directory stopped with the dispatcher  # noqa: SLF001

        # the sent log holds a final outcome for every outbox id, refusals included: a redelivery replays
        convs = {"o-1": f"{PAGE}:u1", "o-2": f"{PAGE2}:u2", "o-3": f"{PAGE}:u1", "o-4": f"{PAGE}:u1", "o-5": f"{PAGE}:u1"}
        assert await read_sent_log(opts, convs) == {
            "o-1": "sent", "o-2": "failed", "o-3": "failed", "o-4": "failed", "o-5": "sent"}


async def read_sent_log(opts: Any, ids: dict[str, str]) -> dict[str, str | None]:
    """outbox id → its state in the sent log (`ids`: outbox id → conversation), read as a new owner would."""
    producer = AIOKafkaProducer(bootstrap_servers=opts.bootstrap_servers)
    await producer.start()
    try:
        ledger = SentLedger(opts.bootstrap_servers, opts.sent_topic, producer, opts.sent_log)
        await ledger.start()
        try:
            await ledger.acquire({0, 1})
            found: dict[str, str | None] = dict.fromkeys(ids)
            for p in (0, 1):
                for oid, conv in ids.items():
                    entry = ledger.log(p).get(conv, oid)
                    if entry is not None:
                        found[oid] = entry.state
            return found
        finally:
            await ledger.stop()
    finally:
        await producer.stop()


async def test_profile_reads_and_personas_use_the_directory_credentials(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#17 on #14: User Profile reads and persona calls go with the stored token and its proof; a
    profile read of a page switched off is refused as a profile read (the conversation rules back off,
    no `send_failed`), and a profile read is no send for `pages list`."""
    graph = harness.graph
    token = "EAAstoredPageToken0003"
    ana, nobody = "7000000000000001", "7000000000000002"
    graph.people.profiles[ana] = {"first_name": "Ana", "locale": "es_MX"}
    async with directory_pages(harness, monkeypatch, token) as pages:
        config = parse_config(BASE_CONFIG)
        # activity is only flushed when asked: the test reads what the dispatcher noted
        directory = PageDirectory(config, pages.settings, track_activity=True, activity_interval=3600)
        creds = DirectoryCredentials(pages.settings, config, pages.cipher, Secret(graph.app_secret), {},
                                     directory=directory)
        personas = Personas(enabled=True, system_name="Acme Assistant", system_picture_url="https://x.io/bot.png")
        opts = dataclasses.replace(harness.opts, tokens={}, personas=personas,
                                   personas_topic=f"{pages.prefix}messenger.personas")

        def ask(psid: str, outbox_id: str, page: str = PAGE) -> dict[str, Any]:
            return {**outbound(psid, outbox_id, page=page), "origin": "system", "endpoint": "user_profile",
                    "request": {"psid": psid, "fields": ["first_name", "locale"]}}

        async with serving(opts, Dispatcher(opts, creds)):
            await harness.send({**outbound(ana, "o-1", text="Welcome!"), "origin": "system", "agent_id": None})
            await harness.results(1)
            directory.drain_activity()  # the message's send noted; now only the profile reads follow
            await harness.send(ask(ana, "pf-1"))
            await harness.send(ask(nobody, "pf-2"))
            await harness.send(ask("7000000000000009", "pf-3", page=PAGE2))
            res = {r["outbox_id"]: r for r in await harness.results(4)}
            assert res["o-1"]["status"] == "sent"
            assert graph.requests[0].body.get("persona_id") == graph.people.personas[PAGE][0]["id"]
            assert (res["pf-1"]["status"], res["pf-1"]["profile"]) == (
                "sent", {"id": ana, "first_name": "Ana", "locale": "es_MX"})
            assert (res["pf-2"]["status"], res["pf-2"]["code"]) == ("failed", 100)  # no profile for this user
            assert (res["pf-3"]["status"], res["pf-3"]["reason"], res["pf-3"]["attempts"]) == (
                "failed", "page_disabled", 0)
            assert all(res[o]["endpoint"] == "user_profile" for o in ("pf-1", "pf-2", "pf-3"))
            assert "endpoint" not in res["o-1"] or res["o-1"]["endpoint"] is None
            # every Graph call (persona list and create, profile reads) with the stored token and its proof
            calls = graph.people.calls
            assert [m for m, _, _ in calls] == ["GET", "POST", "GET", "GET"]
            assert all(q["access_token"] == token and graph.proof_ok(q) for _, _, q in calls)
            assert sorted(graph.people.profile_reads()) == [ana, nobody]
            assert directory.drain_activity() == []  # profile reads are no sends: `pages list` keeps o-1's

"""`messenger-streams pages` against a running worker, as an operator would use it (#14).

A page that is not connected is dead-lettered (page_not_connected); `pages set --token-stdin`
checks the token, subscribes the app and connects the page to a NEW skill while the worker runs:
the worker applies the page within 5 s, no restart, and the next consumer message lands on the new
skill topic within 5 s. `pages disable` (applied within 5 s, as every change) sends the next event
to the dead-letter topic (page_disabled); after `pages enable`, `dlq replay --reason page_disabled`
brings it back. The token is stored encrypted, never printed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from streams.core.tokens import generate_key
from tests.conftest import BASE_CONFIG
from tests.fakegraph import FakeGraph
from tests.kafkatools import KafkaIO, Worker
from tests.onboardingtools import TopicWatch, arun_cli, message_body

pytestmark = pytest.mark.kafka

NEW_PAGE = "4242424242"
CONFIG = BASE_CONFIG.replace('default_skill = "general"', 'default_skill = "general"\nunknown_pages = "dead_letter"')


def pages_in(w: Worker, status: str) -> float:
    """The worker's `messenger_pages{status=...}`: pages its live directory has applied, by status."""
    return w.metrics().get(f'messenger_pages{{status="{status}"}}', 0.0)


async def applied(w: Worker, status: str, count: float, since: float) -> None:
    """Until the worker's live directory holds `count` pages of `status`: within 5 s of `since`."""
    while await asyncio.to_thread(pages_in, w, status) != count:
        assert time.monotonic() - since < 5.0, f"the worker did not apply the change within 5 s ({status})"
        await asyncio.sleep(0.1)


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    g = FakeGraph(require_proof=True)
    await g.start()
    try:
        yield g
    finally:
        await g.stop()


async def test_connect_a_page_to_a_new_skill_live_then_switch_it_off_and_replay(
    make_worker: Callable[..., Worker], kafka: KafkaIO, graph: FakeGraph
) -> None:
    token = graph.add_page(NEW_PAGE, "Acme Returns")
    w = make_worker(CONFIG)
    env = {**w.env, "MESSENGER_STREAMS_PAGES_KEY": generate_key(), "MESSENGER_STREAMS_APP_SECRET": graph.app_secret,
           "MESSENGER_STREAMS_GRAPH_URL": graph.url}
    raw = w.topic("messenger.webhook.raw")
    async with TopicWatch(kafka.bootstrap, w.topic("messenger.dlq")) as dlq, \
            TopicWatch(kafka.bootstrap, w.topic("skill.returns")) as returns:
        # not connected yet: dead-lettered with the raw body
        await kafka.send(raw, message_body(NEW_PAGE, "p1", "anyone there?"))
        _, letter = await dlq.wait(lambda v: v["reason"] == "page_not_connected")
        assert NEW_PAGE in letter["error"] and "anyone there?" in letter["payload"]

        active = await asyncio.to_thread(pages_in, w, "active")
        proc = await arun_cli(env, "pages", "set", NEW_PAGE, "--skill", "returns", "--token-stdin", stdin=token + "\n")
        assert proc.returncode == 0, proc.stderr
        changed = time.monotonic()
        assert "app subscribed" in proc.stdout and "created topic for skill returns" in proc.stdout
        assert token not in proc.stdout + proc.stderr
        assert set(graph.subscriptions[NEW_PAGE]) >= {"messages", "message_echoes", "standby", "messaging_handovers"}

        # the worker applies the page once its skill's topic is there: live, within 5 s, no restart
        # (a message sent before that is a page_not_connected dead letter, like the first one)
        await applied(w, "active", active + 1, changed)
        sent = time.monotonic()
        await kafka.send(raw, message_body(NEW_PAGE, "p1", "where is my parcel?"))
        at, ev = await returns.wait(lambda v: v.get("type") == "consumer_message" and v.get("text") == "where is my parcel?")
        assert at - sent < 5.0, f"the new page's message reached skill.returns after {at - sent:.1f}s"
        assert ev["page_id"] == NEW_PAGE and ev["skill"] == "returns"

        proc = await arun_cli(env, "pages", "disable", NEW_PAGE)
        assert proc.returncode == 0, proc.stderr
        await applied(w, "active", active, time.monotonic())
        await kafka.send(raw, message_body(NEW_PAGE, "p1", "hello again", mid="m_disabled_1"))
        _, letter = await dlq.wait(lambda v: v["reason"] == "page_disabled")
        assert "hello again" in letter["payload"]

        proc = await arun_cli(env, "pages", "enable", NEW_PAGE)
        assert proc.returncode == 0, proc.stderr
        await applied(w, "active", active + 1, time.monotonic())
        proc = await arun_cli(env, "dlq", "replay", "--reason", "page_disabled")
        assert proc.returncode == 0 and "replayed 1 records" in proc.stdout, proc.stdout + proc.stderr
        await returns.wait(lambda v: v.get("type") == "consumer_message" and v.get("text") == "hello again")

    # the stored record: encrypted token, never the token itself
    records = await kafka.read_all(w.topic("connector.pages"), min_count=1)
    assert records and all(token.encode() not in r.value for r in records if r.value)
    page = [orjson.loads(r.value) for r in records if r.key == NEW_PAGE.encode()][-1]
    assert page["token"] and page["token_id"] and page["skill"] == "returns" and page["enabled"] is True

    # pages list: status, skill, and the last event (the worker writes it every 5 s)
    deadline = time.monotonic() + 30
    while True:
        proc = await arun_cli(env, "pages", "list", "--json")
        assert proc.returncode == 0, proc.stderr
        doc = orjson.loads(proc.stdout)
        row = next(p for p in doc["pages"] if p["page_id"] == NEW_PAGE)
        if row["last_event_at"] or time.monotonic() > deadline:
            break
    assert row["status"] == "active" and row["skill"] == "returns" and row["token"] == "stored"
    assert row["last_event_at"], row
    assert token not in proc.stdout
    table = await arun_cli(env, "pages", "list")
    assert NEW_PAGE in table.stdout and "Acme Returns" in table.stdout and "active" in table.stdout
    assert token not in w.log_text()


async def test_bad_input_is_one_line_and_exit_2(make_worker: Callable[..., Worker], graph: FakeGraph) -> None:
    w = make_worker(CONFIG, start=False)
    env = {**w.env, "MESSENGER_STREAMS_APP_SECRET": graph.app_secret, "MESSENGER_STREAMS_GRAPH_URL": graph.url}
    proc = await arun_cli(env, "pages", "set", NEW_PAGE, "--skill", "x", "--token-stdin", stdin="tok\n")
    assert proc.returncode == 2 and "MESSENGER_STREAMS_PAGES_KEY is not set" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    env["MESSENGER_STREAMS_PAGES_KEY"] = "not-a-key"
    proc = await arun_cli(env, "pages", "set", NEW_PAGE, "--skill", "x", "--token-stdin", stdin="tok\n")
    assert proc.returncode == 2 and "not a Fernet key" in proc.stderr
    env["MESSENGER_STREAMS_PAGES_KEY"] = generate_key()
    proc = await arun_cli(env, "pages", "set", "abc", "--skill", "x")
    assert proc.returncode == 2 and "must be digits" in proc.stderr
    # a token of a page the fake Graph does not know: exactly what is wrong, nothing written
    proc = await arun_cli(env, "pages", "set", NEW_PAGE, "--skill", "x", "--token-stdin", stdin="EAAbogus\n")
    assert proc.returncode == 2 and "the token is not valid" in proc.stderr and "EAAbogus" not in proc.stderr
    graph.scopes = ["pages_messaging"]
    token = graph.add_page(NEW_PAGE, "Acme")
    proc = await arun_cli(env, "pages", "set", NEW_PAGE, "--skill", "x", "--token-stdin", stdin=token + "\n")
    assert proc.returncode == 2 and "lacks the permission pages_manage_metadata" in proc.stderr
    assert NEW_PAGE not in graph.subscriptions

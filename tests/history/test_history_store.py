"""The history store against a real (embedded) PostgreSQL: writes, idempotency, search, forget, retention."""

from __future__ import annotations

import asyncio
import random
import zlib
from typing import Any

import psycopg
import pytest

from streams.history.store import SCHEMA_VERSION, HistoryStore, StoreError, transcript_order
from streams.rules.history import Batch, Src, parse_search, subject
from tests.historysamples import PAGE_EN, PAGE_ES, Rec, conversation_records
from tests.pgtools import all_text, dump, new_database

Consumed = tuple[str, dict[str, Any], Src]


def consumed(records: list[Rec], partitions: int = 2) -> list[Consumed]:
    """The records as a sink would read them: topic, partition by key, offsets per partition."""
    offsets: dict[tuple[str, int], int] = {}
    out: list[Consumed] = []
    for rec in records:
        topic = rec.kind.replace("skill:", "skill.") if rec.kind.startswith("skill:") else rec.kind
        part = zlib.crc32(rec.key.encode()) % partitions
        off = offsets.get((topic, part), 0)
        offsets[(topic, part)] = off + 1
        kind = "skill" if rec.kind.startswith("skill:") else rec.kind
        out.append((kind, rec.value, Src(topic, part, off)))
    return out


def interleave(items: list[Consumed], seed: int) -> list[Consumed]:
    """Another order a sink could read them in: partitions interleaved, each partition in order."""
    rnd = random.Random(seed)
    queues: dict[tuple[str, int], list[Consumed]] = {}
    for item in items:
        queues.setdefault((item[2].topic, item[2].partition), []).append(item)
    lanes = [list(reversed(q)) for q in queues.values()]
    out: list[Consumed] = []
    while lanes:
        lane = rnd.choice(lanes)
        out.append(lane.pop())
        if not lane:
            lanes.remove(lane)
    return out


async def write_all(store: HistoryStore, items: list[Consumed], seed: int = 0, max_batch: int = 60) -> None:
    rnd = random.Random(seed)
    i = 0
    while i < len(items):
        n = rnd.randint(1, max_batch)
        batch = Batch()
        for kind, value, src in items[i : i + n]:
            batch.add(kind, value, src)  # type: ignore[arg-type]
        await store.write(batch)
        i += n


@pytest.fixture
async def store(history_dsn: str) -> Any:
    async with HistoryStore(history_dsn) as s:
        yield s


RECORDS = conversation_records(24)


async def test_migrations_apply_once_and_a_newer_schema_is_refused(history_dsn: str) -> None:
    async with HistoryStore(history_dsn) as s:
        assert await s.schema_version() == SCHEMA_VERSION
        assert await s.migrate() == []  # a second start applies nothing
    with psycopg.connect(history_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, 'future')", [SCHEMA_VERSION + 1])
    with pytest.raises(StoreError, match="newer than this program"):
        async with HistoryStore(history_dsn):
            pass


async def test_conversation_messages_and_events_are_stored(store: HistoryStore, history_dsn: str) -> None:
    await write_all(store, consumed(RECORDS))
    counts = await store.table_counts()
    assert counts["conversations"] == 24
    # per conversation: consumer, welcome, agent reply (one row for the reply and its mid update), external,
    # and a second agent's reply after each transfer
    assert counts["messages"] == 24 * 4 + 8
    assert counts["csat_responses"] == 12

    found = await store.transcript("c-1-00001")  # transferred, closed by the system
    assert found is not None
    conv = found["conversation"]
    assert conv["skill"] == "billing" and conv["skills"] == ["billing", "support"]  # moved support → billing
    assert conv["agents"] == sorted({conv["agents"][0], "agent9"})
    assert conv["closed_by"] == "system" and conv["close_reason"] == "idle"
    assert conv["first_agent_response_ms"] == 30_000 and conv["queue_ms"] == 20_000 and conv["abandoned"] is False
    assert conv["ts_config"] == "english"
    items = found["transcript"]
    assert [i["at"] for i in items] == sorted(i["at"] for i in items)
    kinds = [(i["kind"], i["type"]) for i in items]
    assert kinds[:3] == [("event", "conversation_opened"), ("message", "consumer_message"),
                         ("message", "system_message")]
    assert kinds.count(("event", "conversation_transferred")) == 1  # one copy, not one per topic
    reply = next(i for i in items if i["type"] == "agent_message" and i["outbox_id"].endswith("-a1"))
    assert reply["mid"] == "m.c-1-00001.2" and reply["text"] == "Happy to help with 1"
    assert reply["delivered_at"] == reply["sent_at"] + 900 and reply["read_at"] == reply["sent_at"] + 9_000
    consumer = next(i for i in items if i["type"] == "consumer_message")
    assert consumer["attachments"] == [{"type": "image", "url": "https://cdn.example/1.jpg?oe=1"}]
    assert consumer["delivered_at"] is None
    unknown = next(i for i in items if i["type"] == "handover_context")
    assert unknown["from_app"] == "263902037430900" and unknown["metadata"] == {"note": "bot said hi"}
    external = next(i for i in items if i["type"] == "external_message")
    assert external["author"] == "external" and external["agent_id"] == "connector"

    scored = (await store.transcript("c-1-00002"))["conversation"]  # type: ignore[index]
    assert scored["csat_score"] == 1 + (2 * 7) % 5 and scored["closed_by"] == "agent"
    text = all_text(history_dsn)
    assert "SECRET" not in text and "access_token" not in text


async def test_replaying_the_topics_leaves_the_same_rows(history_dsn: str, pg_server: str) -> None:
    items = consumed(RECORDS)
    async with HistoryStore(history_dsn) as s:
        await write_all(s, items, seed=1)
        once = dump(history_dsn)
        await write_all(s, interleave(items, 2), seed=3, max_batch=7)  # re-read, in other batches and order
        assert dump(history_dsn) == once
    other = new_database(pg_server)
    async with HistoryStore(other) as s:  # read once, in yet another interleaving of the partitions
        await write_all(s, interleave(items, 9), seed=5, max_batch=200)
    assert dump(other) == once


async def test_two_sinks_racing_leave_the_same_rows(history_dsn: str, pg_server: str) -> None:
    items = consumed(conversation_records(40, seed=2))
    reference = new_database(pg_server)
    async with HistoryStore(reference) as s:
        await write_all(s, items)
    async with HistoryStore(history_dsn) as a, HistoryStore(history_dsn) as b:
        await asyncio.gather(write_all(a, interleave(items, 1), seed=1, max_batch=25),
                             write_all(b, interleave(items, 2), seed=2, max_batch=25))
    assert dump(history_dsn) == dump(reference)


async def test_search_finds_a_conversation_by_a_word_its_customer_wrote(store: HistoryStore) -> None:
    await write_all(store, consumed(RECORDS))
    english = await store.search(parse_search({"q": "refund"}))  # the customer wrote "refunds": stemmed
    ids = {c["conversation_id"] for c in english["conversations"]}
    want = {f"c-1-{i:05d}" for i in range(24) if i % 5 == 0 and i % 4 != 3}
    assert ids >= want and want
    assert all("<b>" in c["match"] for c in english["conversations"])
    spanish = await store.search(parse_search({"q": "reembolso"}))  # "reembolsos" in Spanish conversations
    assert {c["conversation_id"] for c in spanish["conversations"]} == {f"c-1-{i:05d}" for i in range(24) if i % 4 == 3}
    assert (await store.search(parse_search({"q": "pineapple"})))["conversations"] == []
    both = await store.search(parse_search({"q": "refund", "page": PAGE_EN, "closed_by": "agent"}))
    assert {c["conversation_id"] for c in both["conversations"]} == {i for i in want if int(i[-5:]) % 2 == 0}


async def test_filters_and_cursor_paging(store: HistoryStore) -> None:
    await write_all(store, consumed(RECORDS))

    async def ids(**params: str) -> list[str]:
        got: list[str] = []
        cursor = None
        while True:
            page = await store.search(parse_search({**params, "limit": "5", **({"cursor": cursor} if cursor else {})}))
            got += [c["conversation_id"] for c in page["conversations"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return got

    everything = await ids()
    assert len(everything) == 24 == len(set(everything))
    assert everything == [f"c-1-{i:05d}" for i in reversed(range(24))]  # newest first
    assert set(await ids(skill="support")) == {f"c-1-{i:05d}" for i in range(24) if i % 2 == 1 or i % 3 == 1}
    assert set(await ids(page=PAGE_ES)) == {f"c-1-{i:05d}" for i in range(24) if i % 4 == 3}
    assert set(await ids(agent="agent9")) == {f"c-1-{i:05d}" for i in range(24) if i % 3 == 1}
    assert set(await ids(closed_by="system", close_reason="idle")) == {f"c-1-{i:05d}" for i in range(1, 24, 2)}
    scores = {f"c-1-{i:05d}": 1 + (i * 7) % 5 for i in range(0, 24, 2)}
    assert set(await ids(csat_min="4")) == {c for c, s in scores.items() if s >= 4}
    assert set(await ids(csat_min="2", csat_max="3")) == {c for c, s in scores.items() if 2 <= s <= 3}
    start = RECORDS[0].value["timestamp"]
    window = await ids(**{"from": str(start + 3 * 1_200_000 - 600_000), "to": str(start + 7 * 1_200_000 - 600_000)})
    assert set(window) == {f"c-1-{i:05d}" for i in range(3, 7)}


async def test_forget_leaves_nothing_of_that_person(store: HistoryStore, history_dsn: str) -> None:
    items = consumed(RECORDS)
    await write_all(store, items)
    victim = RECORDS[0].value
    page_id, psid = victim["page_id"], victim["psid"]
    before = all_text(history_dsn)
    assert psid in before and "refunds for order 0" in before
    erased = await store.forget(page_id, psid)
    assert erased["conversation_ids"] == ["c-1-00000"]
    assert erased["conversations"] == 1 and erased["messages"] == 4 and erased["events"] >= 8
    assert erased["csat_responses"] == 1
    after = all_text(history_dsn)
    assert psid not in after and "c-1-00000" not in after and "refunds for order 0" not in after
    assert subject(page_id, psid) in after  # only the digest, which names nobody
    assert "c-1-00001" in after  # the others stay
    # re-reading the topics does not bring the person back...
    await write_all(store, items, seed=4)
    assert psid not in all_text(history_dsn)
    # ...nor does anything later about an erased conversation (the processor's answer to the forget)...
    late = Batch()
    late.add("skill", {**victim, "type": "action_rejected", "event_id": "ev-late", "action": "forget",
                       "timestamp": 4_102_444_800_000}, Src("skill.billing", 0, 9_999))
    assert (await store.write(late)).dropped_forgotten == 2  # the event and its conversation
    assert psid not in all_text(history_dsn)
    # ...but what they write after being forgotten, in a new conversation, is stored
    later = Batch()
    later.add("skill", {**RECORDS[1].value, "event_id": "ev-new", "conversation_id": "c-new",
                        "timestamp": 4_102_444_800_000}, Src("skill.billing", 0, 10_000))
    await store.write(later)
    assert (await store.transcript("c-new")) is not None


async def test_retention_deletes_idle_conversations_and_their_rows(store: HistoryStore) -> None:
    await write_all(store, consumed(RECORDS))
    last = max(r.value.get("timestamp") or r.value.get("closed_at") or 0 for r in RECORDS)
    cutoff_day = 86_400_000
    now = RECORDS[0].value["timestamp"] + 12 * 1_200_000 + 3 * cutoff_day  # half of them idle 3 days
    erased = await store.retain(3, now_ms=now, chunk=4)
    assert 0 < erased["conversations"] < 24 and erased["messages"] >= 4 * erased["conversations"]
    left = await store.search(parse_search({"limit": "100"}))
    assert all(c["last_event_at"] >= now - 3 * cutoff_day for c in left["conversations"])
    assert len(left["conversations"]) == 24 - erased["conversations"]
    assert (await store.retain(3, now_ms=last + 10 * cutoff_day))["conversations"] == len(left["conversations"])
    counts = await store.table_counts()
    assert counts["conversations"] == counts["messages"] == counts["events"] == counts["csat_responses"] == 0


async def test_text_with_nul_bytes_and_unknown_types_are_kept(store: HistoryStore) -> None:
    batch = Batch()
    base = {"conversation_id": "c-x", "page_id": PAGE_EN, "psid": "p", "skill": "billing", "timestamp": 1}
    batch.add("skill", {**base, "type": "consumer_message", "event_id": "e1", "text": "a\x00b"}, Src("skill.b", 0, 0))
    batch.add("skill", {**base, "type": "media_stored", "event_id": "e2", "url": "https://x/y?token=t&k=v",
                        "nested": {"api_key": "k", "n": [1, {"secret": 2, "ok": 3}]}}, Src("skill.b", 0, 1))
    await store.write(batch)
    found = await store.transcript("c-x")
    assert found is not None
    msg, event = found["transcript"]
    assert msg["text"] == "ab"
    assert event["type"] == "media_stored" and event["url"] == "https://x/y?k=v"
    assert event["nested"] == {"n": [1, {"ok": 3}]}


def test_transcript_keeps_each_partition_in_log_order_and_merges_them_by_time() -> None:
    def row(topic: str, offset: int, at: int, name: str) -> tuple[dict[str, Any], int, dict[str, Any]]:
        return ({"src_topic": topic, "src_partition": 0, "src_offset": offset, "event_id": name}, at, {"n": name})

    rows = [
        row("skill.a", 2, 1000, "welcome"),  # written after the message, stamped a few ms earlier
        row("skill.a", 1, 1003, "message"),
        row("skill.a", 3, 2000, "transferred"),
        row("skill.b", 0, 2000, "transferred-copy"),
        row("skill.b", 1, 3000, "reply"),
        row("skill.a", 4, 4000, "late-receipt"),
    ]
    order = [item["n"] for item in transcript_order(rows)]
    assert order == ["message", "welcome", "transferred", "transferred-copy", "reply", "late-receipt"]

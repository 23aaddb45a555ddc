"""Pure rules of the history store: records → rows, merges, query parameters, privacy helpers."""

from __future__ import annotations

import base64
import itertools
from functools import reduce

import pytest

from streams.rules.history import (
    LOCK_BASE,
    LOCK_BUCKETS,
    BadParam,
    Batch,
    ConversationRow,
    RecordError,
    Src,
    admin_authorized,
    decode,
    decode_cursor,
    encode_cursor,
    merge_conversations,
    parse_search,
    parse_time,
    scrub,
    skill_rank,
    subject,
    subject_lock,
    ts_config_for,
)

BASE = {"conversation_id": "c1", "page_id": "p", "psid": "u", "skill": "billing", "timestamp": 1000}


def test_the_reply_and_its_mid_update_are_one_message_in_any_order() -> None:
    first = {**BASE, "type": "agent_message", "event_id": "e1", "agent_id": "a", "text": "hi", "outbox_id": "o1",
             "mid": None}
    update = {**first, "event_id": "e2", "timestamp": 1500, "mid": "m.2", "via": "echo"}
    rows = []
    for order in ((first, update), (update, first)):
        batch = Batch()
        for i, ev in enumerate(order):
            batch.add("skill", ev, Src("skill.billing", 0, 5 + i if ev is first else 9 - i))
        assert list(batch.messages) == ["ob:o1"]
        rows.append(batch.messages["ob:o1"])
    a, b = rows
    assert (a.mid, a.sent_at, a.event_id, a.text) == (b.mid, b.sent_at, b.event_id, b.text) == ("m.2", 1000, "e1", "hi")
    assert a.data == b.data == {"via": "echo"}


def test_conversation_merge_is_the_same_in_every_order() -> None:
    facts = [
        ConversationRow("c", "p", "u", "billing", skill_rank(False, 10, "billing"), 10, 10, skills=["billing"],
                        locale="es_ES", opened_by="consumer", opened_at=10),
        ConversationRow("c", "p", "u", "support", skill_rank(False, 50, "support"), 50, 50,
                        skills=["billing", "support"]),
        ConversationRow("c", "p", "u", "billing", skill_rank(False, 50, "billing"), 50, 50, skills=["billing"],
                        agents=["a1"]),
        ConversationRow("c", "p", "u", "support", skill_rank(True, 90, "support"), 9, 90, skills=["support"],
                        agents=["a2"], closed_at=90, closed_by="agent", summary={"csat_score": None}),
        ConversationRow("c", "p", "u", "support", skill_rank(True, 90, "support"), 9, 90, csat_score=4,
                        summary={"csat_score": 4}),
    ]
    merged = {repr(reduce(merge_conversations, order)) for order in itertools.permutations(facts)}
    assert len(merged) == 1
    row = reduce(merge_conversations, facts)
    assert (row.skill, row.skills, row.agents, row.started_at, row.last_event_at) == (
        "support", ["billing", "support"], ["a1", "a2"], 9, 90)
    assert row.csat_score == 4 and row.summary == {"csat_score": 4} and row.locale == "es_ES"


def test_transfer_sets_the_new_skill_and_unknown_types_are_kept_whole() -> None:
    batch = Batch()
    batch.add("skill", {**BASE, "type": "conversation_transferred", "event_id": "t1", "from_skill": "billing",
                        "to_skill": "support", "agent_id": "a"}, Src("skill.billing", 0, 1))
    batch.add("skill", {**BASE, "type": "brand_new", "event_id": "n1", "x": {"y": [1, 2]}, "secret_key": "s"},
              Src("skill.billing", 0, 2))
    assert batch.conversations["c1"].skill == "support"
    assert batch.events["t1"].columns == {"from_skill": "billing", "to_skill": "support", "agent_id": "a"}
    assert batch.events["n1"].type == "brand_new" and batch.events["n1"].data == {"x": {"y": [1, 2]}}


@pytest.mark.parametrize("value, problem", [
    (b"not json", "not JSON"), (b"[1]", "not a JSON object"), (None, "empty"),
])
def test_undecodable_records_are_record_errors(value: bytes | None, problem: str) -> None:
    with pytest.raises(RecordError, match=problem):
        decode(value)


@pytest.mark.parametrize("event, problem", [
    ({**BASE, "type": "consumer_message"}, "event_id is missing"),
    ({**BASE, "event_id": "e", "type": "status", "timestamp": "soon"}, "timestamp is not a number"),
    ({**BASE, "event_id": "e", "type": "status", "page_id": ""}, "page_id is missing"),
])
def test_console_events_without_their_fields_are_record_errors(event: dict[str, object], problem: str) -> None:
    with pytest.raises(RecordError, match=problem):
        Batch().add("skill", event, Src("t", 0, 0))


def test_csat_response_scores_are_checked() -> None:
    with pytest.raises(RecordError, match="score"):
        Batch().add("csat", {"conversation_id": "c", "page_id": "p", "psid": "u", "skill": "s", "score": 9,
                             "timestamp": 1}, Src("csat.responses", 0, 0))


def test_scrub_drops_secrets_and_token_parameters() -> None:
    value = {"page_access_token": "EAAB", "Authorization": "Bearer x", "ok": "https://h/p?access_token=T&a=1",
             "list": [{"client_secret": 1, "keep": "v\x00w"}], "sig": "https://h/p?appsecret_proof=z"}
    assert scrub(value) == {"ok": "https://h/p?a=1", "list": [{"keep": "vw"}], "sig": "https://h/p"}


def test_forgotten_people_are_dropped_up_to_their_erasure_time() -> None:
    batch = Batch()
    batch.add("skill", {**BASE, "type": "consumer_message", "event_id": "old", "text": "x"}, Src("s", 0, 0))
    batch.add("skill", {**BASE, "type": "consumer_message", "event_id": "new", "timestamp": 3000, "text": "y",
                        "conversation_id": "c2"}, Src("s", 0, 1))
    assert subject("p", "u") in batch.subjects()
    assert batch.drop_forgotten({("p", "u"): 2000}) == 2  # the old message and its conversation
    assert list(batch.messages) == ["new"] and list(batch.conversations) == ["c2"]


@pytest.mark.parametrize("locale, config", [
    ("en_US", "english"), ("es_ES", "spanish"), ("pt-BR", "portuguese"), ("zh_CN", "simple"), (None, "simple"),
])
def test_languages(locale: str | None, config: str) -> None:
    assert ts_config_for(locale) == config
    assert ts_config_for(locale, available={"simple"}) == "simple"


def test_search_parameters() -> None:
    s = parse_search({"skill": "billing", "page": "1", "agent": "a", "from": "2026-01-01", "to": "1767312000000",
                      "closed_by": "agent", "close_reason": "idle", "csat_min": "2", "csat_max": "4",
                      "q": " refund ", "limit": "10"})
    assert (s.skill, s.from_ms, s.to_ms, s.csat_min, s.csat_max, s.q, s.limit) == (
        "billing", 1_767_225_600_000, 1_767_312_000_000, 2, 4, "refund", 10)
    cursor = encode_cursor(123, "c-9")
    assert decode_cursor(cursor) == (123, "c-9") and parse_search({"cursor": cursor}).after == (123, "c-9")
    assert parse_time("2026-01-01T01:00:00+01:00", "from") == 1_767_225_600_000


@pytest.mark.parametrize("params, param", [
    ({"from": "yesterday"}, "from"),
    ({"to": "2026-01-01T10:00:00"}, "to"),  # no time zone
    ({"from": "2026-02-01", "to": "2026-01-01"}, "to"),
    ({"csat_min": "0"}, "csat_min"),
    ({"csat_max": "five"}, "csat_max"),
    ({"csat_min": "4", "csat_max": "2"}, "csat_max"),
    ({"closed_by": "robot"}, "closed_by"),
    ({"limit": "0"}, "limit"),
    ({"limit": "5000"}, "limit"),
    ({"cursor": "!!!"}, "cursor"),
    ({"cursor": base64.urlsafe_b64encode(b'{"a":1}').decode()}, "cursor"),
    ({"q": "x" * 201}, "q"),
    ({"skil": "billing"}, "skil"),
])
def test_bad_search_parameters_name_the_parameter(params: dict[str, str], param: str) -> None:
    with pytest.raises(BadParam) as info:
        parse_search(params)
    assert info.value.param == param and str(info.value).startswith(f"{param}: ")


def test_admin_password_check() -> None:
    basic = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    assert admin_authorized("Bearer s3cret", "s3cret")
    assert admin_authorized(basic, "s3cret")
    assert not admin_authorized("Bearer wrong", "s3cret")
    assert not admin_authorized("Basic !!!", "s3cret")
    assert not admin_authorized("Token s3cret", "s3cret")
    assert not admin_authorized(None, "s3cret")
    assert not admin_authorized("Bearer ", "")  # no password configured: nobody is admin


def test_people_share_a_bounded_set_of_lock_keys() -> None:
    keys = {subject_lock(subject("p", f"u{i}")) for i in range(5000)}
    assert len(keys) == LOCK_BUCKETS and min(keys) >= LOCK_BASE and max(keys) < LOCK_BASE + LOCK_BUCKETS
    assert subject_lock(subject("p", "u1")) == subject_lock(subject("p", "u1"))

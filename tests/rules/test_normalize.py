"""Unit tests of splitting and normalizing webhook bodies: every sample, and hostile input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.rules.normalize import conversation_key_of, split_body
from tests.kafkatools import envelope

SAMPLES = Path(__file__).parents[1] / "samples"
WEBHOOK_SAMPLES = sorted(p for p in SAMPLES.glob("*.json") if not p.name.startswith(("28_", "29_")))

# sample → (kind, page_id, psid, mid) of its one event
EXPECTED: dict[str, tuple[str, str, str | None, str | None]] = {
    "01_text_message.json": ("message", "298733926841562", "1396353687096793", "mid.1485138696677:f3eb499f83"),
    "03_quick_reply.json": ("message", "1691462197845448", "1134343043305865", "mid.1472028637817:ae2763cc036a664b43"),
    "04_postback_with_title.json": ("postback", "298733926841562", "1396353687096793", None),
    "05_postback_with_referral.json": ("postback", "1691462197845448", "1134343043305865", None),
    "06_echo_from_app.json": ("echo", "1691462197845448", "1134343043305865", "mid.1472026868734:832ecbdfc1ffc30139"),
    "07_echo_from_app_with_metadata.json": ("echo", "PAGE_ID", "PAGE_ID", "mid.1457764197618:41d102a3e1ae206a38"),
    "09_read.json": ("read", "1691462197845448", "1134343043305865", None),
    "10_delivery.json": ("delivery", "1691462197845448", "1134343043305865", None),
    "11_attachment_image.json": ("message", "298733926841562", "1396353687096793", "mid.1485138994684:de9ac97e92"),
    "12_attachment_location.json": ("message", "298763206848561", "1296332687296794", "mid.1486805183939:9a54bad501"),
    "14_referral_shortlink.json": ("referral", "1691462197845448", "1134343043305865", None),
    "17_pass_thread_control.json": ("handover", "fakeId", "fakeId", None),
    "18_take_thread_control.json": ("handover", "fakeId", "fakeId", None),
    "19_request_thread_control.json": ("handover", "fakeId", "fakeId", None),
    "21_reaction.json": ("reaction", "PAGE_ID", "USER_ID", None),
    "23_account_linking.json": ("account_linking", "1691462197845448", "1134343043305865", None),
    "26_text_with_nlp_datetime.json": ("message", "111899832631525", "1433960459967306", "mid.$cAABlxfDuVgpkzP8I5Fem7nAgTm_7"),
}


def body_of(path: Path) -> bytes:
    doc = json.loads(path.read_text())
    if "object" not in doc:  # samples 07 and 21 are single items
        doc = envelope(doc)
    return orjson.dumps(doc)


def one(doc: dict[str, Any]) -> Any:
    result = split_body(orjson.dumps(doc))
    assert not result.rejected, result.rejected
    assert len(result.events) == 1
    return result.events[0]


def item(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1700000000000}
    base.update(fields)
    return base


def body(*items: dict[str, Any], page: Any = "p1", standby: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": page, "time": 1700000000001, "messaging": list(items)}
    if standby is not None:
        entry["standby"] = standby
    return {"object": "page", "entry": [entry]}


def test_every_webhook_sample_has_an_expectation() -> None:
    assert {p.name for p in WEBHOOK_SAMPLES} == set(EXPECTED)


@pytest.mark.parametrize("path", WEBHOOK_SAMPLES, ids=lambda p: p.name)
def test_samples_normalize(path: Path) -> None:
    result = split_body(body_of(path))
    assert not result.rejected
    assert len(result.events) == 1
    ev = result.events[0]
    kind, page, psid, mid = EXPECTED[path.name]
    assert (ev.kind, ev.page_id, ev.psid, ev.mid) == (kind, page, psid, mid)
    assert ev.conversation_key == f"{page}:{psid}"
    assert isinstance(ev.timestamp, int)
    assert ev.standby is False
    assert ev.idempotency_key
    # the JSON form has string ids only
    doc = orjson.loads(ev.model_dump_json())
    for field in ("page_id", "psid", "sender_id", "recipient_id", "app_id"):
        assert doc[field] is None or isinstance(doc[field], str)


def test_numeric_ids_become_exact_strings() -> None:
    ev = one(body(item(sender={"id": 1696785613739982}, recipient={"id": 1691462197845448},
                       message={"mid": "m1", "text": "hi"}), page=1691462197845448))
    assert ev.page_id == "1691462197845448"
    assert ev.psid == "1696785613739982"
    assert ev.conversation_key == "1691462197845448:1696785613739982"


def test_echo_is_keyed_by_recipient_and_keeps_app_id_and_metadata() -> None:
    ev = one(body(item(sender={"id": "p1"}, recipient={"id": "u9"},
                       message={"is_echo": True, "app_id": 950864918368986, "metadata": "outbox-1", "mid": "m2"})))
    assert ev.kind == "echo"
    assert ev.psid == "u9"
    assert ev.conversation_key == "p1:u9"
    assert ev.app_id == "950864918368986"
    assert ev.metadata == "outbox-1"


def test_quick_reply_attachments_and_receipts() -> None:
    qr = one(orjson.loads(body_of(SAMPLES / "03_quick_reply.json")))
    assert qr.quick_reply_payload == "PICK_ACTION" and qr.text == "Action"
    img = one(orjson.loads(body_of(SAMPLES / "11_attachment_image.json")))
    assert img.attachments[0].type == "image" and img.attachments[0].url.startswith("https://scontent")
    loc = one(orjson.loads(body_of(SAMPLES / "12_attachment_location.json")))
    assert loc.attachments[0].type == "location" and loc.attachments[0].title == "My Place"
    dlv = one(orjson.loads(body_of(SAMPLES / "10_delivery.json")))
    assert dlv.watermark == 1472028395190 and dlv.mids == ["mid.1472028395154:917e24ea99bc7d8f11"]
    assert dlv.timestamp == 1472028396029  # timestamp 0 in the capture: the entry time stands in


def test_standby_items_are_kept_with_the_flag() -> None:
    doc = body(item(message={"mid": "m1", "text": "a"}),
               standby=[item(postback={}), item(message={"mid": "m3", "text": "b"})])
    result = split_body(orjson.dumps(doc))
    assert [(e.kind, e.standby) for e in result.events] == [
        ("message", False), ("postback", True), ("message", True)]
    assert result.items == 3


def test_items_without_sender_are_valid() -> None:
    roles = one(body({"recipient": {"id": "p1"}, "timestamp": 1, "app_roles": {"123": ["primary_receiver"]}}))
    assert roles.kind == "app_roles" and roles.psid is None and roles.conversation_key == "p1"
    pe = one(body({"recipient": {"id": "p1"}, "timestamp": 1, "policy_enforcement": {"action": "block", "reason": "x"}}))
    assert pe.kind == "policy_enforcement" and pe.psid is None
    legacy = one(body({"recipient": {"id": "p1"}, "timestamp": 1, "policy-enforcement": {"action": "unblock"}}))
    assert legacy.kind == "policy_enforcement"
    optin = one(body({"recipient": {"id": "p1"}, "timestamp": 1, "optin": {"ref": "r", "user_ref": "ur-1"}}))
    assert optin.kind == "optin" and optin.psid is None and optin.data["user_ref"] == "ur-1"


def test_other_kinds() -> None:
    edit = one(body(item(message_edit={"mid": "m1", "text": "fixed", "num_edit": "2"})))
    assert (edit.kind, edit.mid, edit.text, edit.data["num_edit"]) == ("message_edit", "m1", "fixed", 2)
    game = one(body(item(game_play={"game_id": 1, "player_id": "p", "score": 5})))
    assert game.kind == "game_play"
    unknown = one(body(item(speech={"text": "?"})))
    assert unknown.kind == "unknown" and unknown.data == {"speech": {"text": "?"}}


def test_idempotency_keys_follow_the_reference() -> None:
    m = one(body(item(message={"mid": "m1", "text": "a"})))
    again = one(body(item(timestamp=1800000000000, message={"mid": "m1", "text": "a"})))
    assert m.idempotency_key == again.idempotency_key
    e1 = one(body(item(message_edit={"mid": "m1", "num_edit": 1})))
    e2 = one(body(item(message_edit={"mid": "m1", "num_edit": 2})))
    assert e1.idempotency_key != e2.idempotency_key
    r1 = one(body(item(read={"watermark": 5})))
    r2 = one(body(item(read={"watermark": 6})))
    assert r1.idempotency_key != r2.idempotency_key


def test_several_entries_and_items() -> None:
    doc = {"object": "page", "entry": [
        {"id": "p1", "time": 1, "messaging": [item(message={"mid": "a"}), item(read={"watermark": 1})]},
        {"id": "p2", "time": 1, "messaging": [item(recipient={"id": "p2"}, message={"mid": "b"})]},
    ]}
    result = split_body(orjson.dumps(doc))
    assert [e.conversation_key for e in result.events] == ["p1:u1", "p1:u1", "p2:u1"]
    assert result.items == 3


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"object":"page","entry":[{"id":"1","messaging":[{"sender":', "invalid_json"),
        (b"", "invalid_json"),
        (b"\xff\xfe\x00garbage", "invalid_json"),
        (b"[1,2,3]", "invalid_envelope"),
        (b'"page"', "invalid_envelope"),
        (b'{"object":"instagram","entry":[]}', "not_page_object"),
        (b'{"entry":[]}', "not_page_object"),
        (b'{"object":"page"}', "invalid_envelope"),
        (b'{"object":"page","entry":{"id":"1"}}', "invalid_envelope"),
        (b'{"object":"page","entry":"nope"}', "invalid_envelope"),
        (b"[" * 5000 + b"]" * 5000, "invalid_json"),
    ],
)
def test_bad_bodies_are_rejected_whole(raw: bytes, reason: str) -> None:
    result = split_body(raw)
    assert result.events == []
    assert [r.reason for r in result.rejected] == [reason]
    assert result.rejected[0].error


def test_deep_nesting_inside_an_item_is_contained() -> None:
    deep: Any = "x"
    for _ in range(200):
        deep = {"n": deep}
    result = split_body(orjson.dumps(body(item(message={"mid": "m1", "text": "ok", "nested": deep}))))
    assert len(result.events) == 1


def test_oversized_body_goes_to_dead_letters() -> None:
    raw = orjson.dumps(body(item(message={"mid": "m1", "text": "x" * 2_000_000})))
    result = split_body(raw, max_bytes=1_048_576)
    assert [r.reason for r in result.rejected] == ["body_too_large"]


def test_huge_string_under_the_limit_is_kept() -> None:
    ev = one(body(item(message={"mid": "m1", "text": "y" * 500_000})))
    assert len(ev.text or "") == 500_000


def test_empty_entry_lists_give_nothing_and_no_error() -> None:
    for doc in ({"object": "page", "entry": []}, body(), {"object": "page", "entry": [{"id": "1", "changes": [{}]}]}):
        result = split_body(orjson.dumps(doc))
        assert result.events == [] and result.rejected == []


def test_one_bad_item_spares_its_neighbours() -> None:
    doc = body(
        item(message={"mid": "good1", "text": "a"}),
        item(sender={"id": True}, message={"mid": "bad-id"}),
        item(sender={"id": 1.5}, message={"mid": "float-id"}),
        "not an object",  # type: ignore[arg-type]
        item(message={"text": "no mid"}),
        item(timestamp="yesterday", message={"mid": "bad-ts"}),
        item(message={"mid": "good2", "text": "b"}),
        item(read={"watermark": "soon"}),
        {"recipient": {"id": "p1"}, "message": {"mid": "no-sender"}},
    )
    result = split_body(orjson.dumps(doc))
    assert [e.mid for e in result.events] == ["good1", "good2"]
    assert len(result.rejected) == 7
    assert all(r.reason == "invalid_item" for r in result.rejected)
    assert [r.item_index for r in result.rejected] == [f"entry[0].messaging[{i}]" for i in (1, 2, 3, 4, 5, 7, 8)]
    assert result.items == len(result.events) + len(result.rejected)


def test_bad_entry_spares_other_entries() -> None:
    doc = {"object": "page", "entry": [{"id": None, "messaging": [item(message={"mid": "x"})]},
                                       {"id": "p1", "messaging": [item(message={"mid": "y"})]}]}
    result = split_body(orjson.dumps(doc))
    assert [e.mid for e in result.events] == ["y"]
    assert [(r.reason, r.item_index) for r in result.rejected] == [("invalid_item", "entry[0]")]


@pytest.mark.parametrize("value", [{"id": 12}, {"id": "12"}])
def test_ids_as_numbers_and_strings_agree(value: dict[str, Any]) -> None:
    ev = one(body(item(sender=value, message={"mid": "m"})))
    assert ev.psid == "12"


def test_second_timestamps_are_scaled_to_ms() -> None:
    ev = one(body(item(timestamp="1527459824", postback={"payload": "P"})))
    assert ev.timestamp == 1527459824000


def test_conversation_key_of_a_body() -> None:
    """The key the webhook gives a raw record: the one conversation its events belong to, else None.
    An echo belongs to the consumer it was sent to; bad items do not count."""
    for name, (_kind, page, psid, _) in EXPECTED.items():
        assert conversation_key_of(body_of(SAMPLES / name)) == f"{page}:{psid}", name
    one = {"sender": {"id": "u1"}, "recipient": {"id": "P"}, "timestamp": 1, "message": {"mid": "m1", "text": "a"}}
    echo = {"sender": {"id": "P"}, "recipient": {"id": "u1"}, "timestamp": 2,
            "message": {"mid": "m2", "text": "b", "is_echo": True}}
    other = {**one, "sender": {"id": "u2"}}
    doc = {"object": "page", "entry": [{"id": "P", "time": 1, "messaging": [one, echo, 42]}]}
    assert conversation_key_of(orjson.dumps(doc)) == "P:u1"
    doc["entry"][0]["messaging"].append(other)
    assert conversation_key_of(orjson.dumps(doc)) is None
    assert conversation_key_of(b"not json") is None
    assert conversation_key_of(orjson.dumps({"object": "page", "entry": []})) is None

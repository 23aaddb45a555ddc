"""Inbound attachments whole (#17): location coordinates and title, sticker ids in both forms,
fallback shares, and the ad referral on a first message; malformed parts are left out, never a
reason to lose the message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from schemas.events import Coordinates, NormalizedEvent
from streams.rules.normalize import split_body

SAMPLES = Path(__file__).parents[1] / "samples"


def only_event(raw: bytes) -> NormalizedEvent:
    result = split_body(raw)
    assert not result.rejected, result.rejected
    assert len(result.events) == 1
    return result.events[0]


def sample(name: str) -> NormalizedEvent:
    path = SAMPLES / name if (SAMPLES / name).exists() else SAMPLES / "rich" / name
    return only_event(path.read_bytes())


def message(**msg: Any) -> NormalizedEvent:
    body = {"object": "page", "entry": [{"id": "p1", "time": 1700000000001, "messaging": [
        {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1700000000000,
         "message": {"mid": "m1", **msg}}]}]}
    return only_event(orjson.dumps(body))


def test_location_keeps_coordinates_title_and_url() -> None:
    ev = sample("12_attachment_location.json")
    [loc] = ev.attachments
    assert loc.type == "location"
    assert loc.title == "My Place"
    assert loc.url == "https://l.facebook.com/l.php?u=my-place"
    assert loc.coordinates == Coordinates(lat=45.531449166167, long=-93.555047062628)


def test_sticker_in_the_transition_form() -> None:
    ev = sample("30_sticker_transition.json")
    assert [(a.type, a.sticker_id) for a in ev.attachments] == [
        ("sticker", "369239263222822"), ("image", "369239263222822")
    ]
    assert ev.sticker_id == "369239263222822"
    assert all(a.url and a.url.startswith("https://scontent.xx.fbcdn.net/") for a in ev.attachments)


def test_sticker_in_the_legacy_form() -> None:
    ev = sample("31_sticker_legacy.json")
    assert ev.sticker_id == "369239263222822"
    [img] = ev.attachments
    assert (img.type, img.sticker_id) == ("image", "369239263222822")


def test_fallback_shares_keep_title_and_url_or_nothing() -> None:
    ev = sample("32_fallback_share.json")
    share, bare = ev.attachments
    assert share.type == "fallback" and share.title == "Order 1234 - Example Shop"
    assert share.url and share.url.startswith("https://l.facebook.com/l.php?u=")
    assert (bare.type, bare.url, bare.title) == ("fallback", None, None)
    assert ev.text == "look at this https://www.example.com/orders/1234"


def test_ad_referral_rides_on_the_message() -> None:
    ev = sample("33_message_with_ad_referral.json")
    assert ev.referral is not None
    assert (ev.referral.ad_id, ev.referral.ref, ev.referral.source, ev.referral.type) == (
        "6045246247433", "spring-sale", "ADS", "OPEN_THREAD")
    assert ev.referral.ads_context_data == {
        "ad_title": "Spring sale: shirts",
        "photo_url": "https://scontent.xx.fbcdn.net/v/t45.1600-4/ad.png",
        "post_id": "682498302938465_1234567890",
    }
    assert orjson.loads(ev.model_dump_json())["referral"]["ad_id"] == "6045246247433"


def test_postback_and_referral_events_carry_the_referral_too() -> None:
    pb = sample("05_postback_with_referral.json")
    assert pb.referral is not None and pb.referral.source == "SHORTLINK"
    ref = sample("14_referral_shortlink.json")
    assert ref.kind == "referral" and ref.referral is not None and ref.referral.ref


def test_a_plain_message_has_no_referral_or_sticker() -> None:
    ev = sample("01_text_message.json")
    assert ev.referral is None and ev.sticker_id is None


def test_malformed_parts_are_left_out_not_fatal() -> None:
    ev = message(attachments=[
        {"type": "location", "payload": {"coordinates": {"lat": "45.5", "long": -93.5}, "title": 7}},
        {"type": "location", "payload": {"coordinates": {"lat": 95.0, "long": 10.0}}},
        {"type": "location", "payload": {"coordinates": {"lat": True, "long": 10.0}}},
        {"type": "image", "payload": {"url": 12, "sticker_id": {"x": 1}}},
        {"type": "sticker", "payload": {"sticker_id": True}},
    ], referral={"ad_id": [1], "ref": None, "source": "ADS", "ads_context_data": "x"})
    assert [a.coordinates for a in ev.attachments[:3]] == [None, None, None]
    assert ev.attachments[0].title is None
    assert (ev.attachments[3].url, ev.attachments[3].sticker_id) == (None, None)
    assert (ev.attachments[4].type, ev.attachments[4].sticker_id) == ("sticker", None)
    assert ev.referral is not None and ev.referral.source == "ADS" and ev.referral.ad_id is None
    assert ev.referral.ads_context_data is None


def test_a_referral_of_the_wrong_type_is_ignored() -> None:
    assert message(text="hi", referral="ADS").referral is None
    assert message(text="hi", referral={}).referral is None

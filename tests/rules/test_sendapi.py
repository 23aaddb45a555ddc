"""Unit tests of the Send API rules: splitting, limits, error classification, backoff, token bucket."""

from __future__ import annotations

import pytest

from streams.rules.sendapi import (
    Backoff,
    Limits,
    TokenBucket,
    classify_error,
    parse_error_body,
    prepare_requests,
    redact,
    split_text,
    transport_error,
    truncate,
    units,
)
from tests.fakegraph import SAMPLES


def test_short_text_is_one_unchanged_part() -> None:
    assert split_text("hello") == ["hello"]
    assert split_text("") == [""]
    assert split_text("  spaced  out  ") == ["  spaced  out  "]


def test_exactly_2000_is_one_part_2001_is_two() -> None:
    assert split_text("a" * 2000) == ["a" * 2000]
    words = ("abcd " * 400).rstrip()  # 1999 chars
    assert split_text(words + "e") == [words + "e"]  # 2000
    parts = split_text(words + "ef")  # 2001: last word moves to the second part
    assert parts == [words[:-5], "abcdef"]


def test_split_on_word_boundaries_keeps_every_word_in_order() -> None:
    text = " ".join(f"word{i}" for i in range(1500))
    parts = split_text(text)
    assert len(parts) > 1
    assert all(units(p) <= 2000 for p in parts)
    assert " ".join(parts) == text
    for p in parts:
        assert not p.startswith(" ") and not p.endswith(" ")
        assert p.split(" ")[0].startswith("word")


def test_split_prefers_whitespace_at_the_limit_and_newlines() -> None:
    assert split_text("aaaa bbbb", 4) == ["aaaa", "bbbb"]
    assert split_text("aaa\nbbb ccc", 8) == ["aaa\nbbb", "ccc"]
    assert split_text("one two three four", 9) == ["one two", "three", "four"]


def test_very_long_word_is_cut_hard() -> None:
    parts = split_text("x" * 4500)
    assert parts == ["x" * 2000, "x" * 2000, "x" * 500]
    url = "https://example.com/" + "p" * 2500
    parts = split_text("see " + url + " ok")
    assert parts[0] == "see"
    assert "".join(parts[1:-1]) + parts[-1].removesuffix(" ok") == url
    assert all(units(p) <= 2000 for p in parts)


def test_unicode_counted_in_utf16_units_and_never_cut_inside() -> None:
    emoji = "😀" * 1500  # 3000 UTF-16 units
    parts = split_text(emoji)
    assert parts == ["😀" * 1000, "😀" * 500]
    assert [units(p) for p in parts] == [2000, 1000]
    # combining accents stay with their letter
    accented = "e\u0301" * 1500
    parts = split_text(accented)
    assert "".join(parts) == accented
    assert all(not p.startswith("\u0301") for p in parts)
    # non-Latin words split on spaces
    ru = " ".join(["привет"] * 500)
    parts = split_text(ru)
    assert " ".join(parts) == ru and all(len(p) <= 2000 for p in parts)
    # an odd limit never splits a surrogate pair (Python strings hold whole code points)
    assert split_text("😀😀😀", 3) == ["😀", "😀", "😀"]


def test_truncate() -> None:
    assert truncate("abc", 20) == "abc"
    assert truncate("a" * 30, 20) == "a" * 20
    assert truncate("😀" * 15, 20) == "😀" * 10


def req(text: str | None = "hi", **message: object) -> dict[str, object]:
    msg: dict[str, object] = dict(message)
    if text is not None:
        msg["text"] = text
    return {"recipient": {"id": "P1"}, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT", "message": msg}


def test_prepare_short_text_untouched() -> None:
    r = req("hello", metadata="outbox:1")
    parts, warnings = prepare_requests(r)
    assert parts == [r] and warnings == []


def test_prepare_long_text_parts_in_order_quick_replies_on_last() -> None:
    qrs = [{"content_type": "text", "title": f"Option {i}", "payload": f"P{i}"} for i in range(3)]
    text = " ".join(f"w{i:05d}" for i in range(700))  # 4899 chars
    parts, warnings = prepare_requests(req(text, quick_replies=qrs, metadata="m"))
    assert len(parts) == 3 and warnings
    assert " ".join(p["message"]["text"] for p in parts) == text  # type: ignore[index]
    for p in parts:
        assert p["recipient"] == {"id": "P1"} and p["messaging_type"] == "MESSAGE_TAG" and p["tag"] == "HUMAN_AGENT"
        assert p["message"]["metadata"] == "m"  # type: ignore[index]
    assert "quick_replies" not in parts[0]["message"] and "quick_replies" not in parts[1]["message"]  # type: ignore[operator]
    assert parts[2]["message"]["quick_replies"] == qrs  # type: ignore[index]


def test_prepare_quick_reply_limits() -> None:
    qrs = [{"content_type": "text", "title": f"A very long title number {i}", "payload": "x" * 1200} for i in range(16)]
    qrs.append({"content_type": "user_email"})
    parts, warnings = prepare_requests(req("pick one", quick_replies=qrs))
    out = parts[0]["message"]["quick_replies"]  # type: ignore[index]
    assert len(out) == 13
    assert all(units(q["title"]) <= 20 for q in out)
    assert out[0]["title"] == "A very long title nu"
    assert all(len(q["payload"]) == 1000 for q in out)
    assert any("dropped 4 quick replies" in w for w in warnings)
    assert any("title truncated" in w for w in warnings) and any("payload truncated" in w for w in warnings)
    assert len(qrs) == 17 and qrs[0]["title"].startswith("A very long title number")  # input untouched
    assert Limits().quick_replies == 13


def test_prepare_sender_action_as_is() -> None:
    parts, warnings = prepare_requests({"recipient": {"id": "P1"}, "sender_action": "typing_on"})
    assert parts == [{"recipient": {"id": "P1"}, "sender_action": "typing_on"}] and warnings == []
    parts, warnings = prepare_requests({"recipient": {"id": "P1"}, "messaging_type": "RESPONSE", "sender_action": "mark_seen"})
    assert parts == [{"recipient": {"id": "P1"}, "sender_action": "mark_seen"}] and warnings


def test_prepare_attachment_passes() -> None:
    r = req(None, attachment={"type": "image", "payload": {"url": "https://x/y.png"}})
    assert prepare_requests(r) == ([r], [])


# --- errors ---------------------------------------------------------------------------------------


def test_real_551_body_is_permanent() -> None:
    body = (SAMPLES / "28_send_api_error_551_person_unavailable.json").read_bytes()
    e = classify_error(400, body)
    assert (e.code, e.subcode, e.retryable, e.reauth) == (551, 1545041, False, False)
    assert e.message == "(#551) This person isn't available right now."
    assert e.reason == "person_unavailable"


def test_real_10_outside_window_body_is_permanent() -> None:
    body = (SAMPLES / "29_send_api_error_10_outside_window.json").read_bytes()
    e = classify_error(400, body)
    assert (e.code, e.subcode, e.retryable) == (10, 2018065, False)
    assert e.reason == "window_closed"
    assert e.message.startswith("(#10) This message is sent outside of allowed window")


@pytest.mark.parametrize(
    ("status", "code", "subcode", "retryable"),
    [
        (400, 613, None, True),
        (500, 2, None, True),
        (500, 1200, None, True),
        (400, 4, 2018022, True),
        (400, 10, 2018278, False),
        (400, 10, 2018108, False),
        (400, 100, 2018001, False),
        (403, 200, 2018028, False),
        (400, 190, 463, False),
        (500, 199, 11357046, False),
        (500, 9999, None, True),  # unknown code on a 5xx: retried
        (400, 9999, None, False),  # unknown code on a 4xx: not
    ],
)
def test_classification_table(status: int, code: int, subcode: int | None, retryable: bool) -> None:
    err: dict[str, object] = {"message": f"(#{code}) x", "type": "OAuthException", "code": code}
    if subcode is not None:
        err["error_subcode"] = subcode
    e = classify_error(status, {"error": err})
    assert e.retryable is retryable
    assert e.code == code and e.subcode == subcode
    assert e.reauth is (code == 190)


def test_non_graph_failures() -> None:
    assert classify_error(502, b"<html>Bad Gateway</html>").retryable
    assert classify_error(503, b"").retryable
    assert classify_error(429, b"slow down").retryable
    assert not classify_error(404, b"not found").retryable
    assert parse_error_body(b"not json") is None
    assert transport_error(TimeoutError()).retryable and transport_error(TimeoutError()).reason == "timeout"
    assert transport_error(ConnectionRefusedError()).reason == "connection_error"


def test_redact() -> None:
    assert redact("url?access_token=EAAB123secret&x", ["EAAB123secret"]) == "url?access_token=***&x"
    assert redact("nothing", ["", "ab"]) == "nothing"


# --- backoff and rate limit -------------------------------------------------------------------------


def test_backoff_schedule() -> None:
    b = Backoff(base=0.05, factor=2, cap=0.3, max_attempts=6, jitter=0.1)
    assert b.schedule() == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
    assert b.delay(1, lambda: 1.0) == pytest.approx(0.055)
    assert Backoff().schedule() == pytest.approx([0.5, 1, 2, 4, 8])
    assert Backoff(base=1, cap=30, max_attempts=2000).delay(1500, lambda: 0) == 30


def test_token_bucket() -> None:
    b = TokenBucket(rate=10, burst=2, now=0.0)
    assert b.reserve(0.0) == 0 and b.reserve(0.0) == 0
    assert b.reserve(0.0) == pytest.approx(0.1)
    assert b.reserve(0.0) == pytest.approx(0.2)
    assert b.reserve(1.0) == 0  # refilled
    b.pause_until(5.0)
    assert b.reserve(2.0) == pytest.approx(3.0)
    # default burst = rate: 300/s lets 300 go at once and then paces at 1/300 s
    b = TokenBucket(rate=300, now=0.0)
    waits = [b.reserve(0.0) for _ in range(600)]
    assert waits[299] == 0 and waits[599] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=0)

"""Media keeping decisions: which attachments are kept, hosts, content types, keys, the event."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streams.core.config_rich import Media
from streams.rules.media import (
    Stored,
    Wanted,
    content_type_allowed,
    host_allowed,
    media_stored_event,
    stored_key,
    wanted,
)

CFG = Media(store="/srv/media")
CDN = "https://scontent.xx.fbcdn.net/v/t1/a.png?oe=5F8DF5C9"


def event(*attachments: dict[str, object], type_: str = "consumer_message") -> dict[str, object]:
    return {"type": type_, "event_id": "ev-abc-1", "conversation_id": "c1", "page_id": "p1", "psid": "u1",
            "skill": "billing", "timestamp": 1700000000000, "mid": "m1", "attachments": list(attachments)}


def test_media_attachments_are_kept_links_are_not() -> None:
    keep, refused = wanted(event(
        {"type": "image", "url": CDN},
        {"type": "location", "url": "https://l.facebook.com/l.php?u=x"},
        {"type": "fallback", "url": "https://www.example.com/"},
        {"type": "file", "url": "https://cdn.fbsbx.com/v/t59/doc.pdf"},
        {"type": "video", "url": None},
        {"type": "sticker", "url": CDN},
    ), CFG)
    assert keep == [Wanted(0, "image", CDN), Wanted(3, "file", "https://cdn.fbsbx.com/v/t59/doc.pdf"),
                    Wanted(5, "sticker", CDN)]
    assert refused == []


def test_only_consumer_messages_and_only_allowed_hosts() -> None:
    assert wanted(event({"type": "image", "url": CDN}, type_="media_stored"), CFG) == ([], [])
    assert wanted(event({"type": "image", "url": CDN}, type_="agent_message"), CFG) == ([], [])
    keep, refused = wanted(event({"type": "image", "url": "http://169.254.169.254/latest/meta-data"},
                                 {"type": "image", "url": "https://fbcdn.net.evil.example/a.png"}), CFG)
    assert keep == [] and refused == ["host_not_allowed", "host_not_allowed"]


def test_malformed_attachment_lists_are_skipped() -> None:
    assert wanted({"type": "consumer_message", "attachments": "x"}, CFG) == ([], [])
    assert wanted(event("not an object"), CFG) == ([], [])  # type: ignore[arg-type]


def test_host_allowed() -> None:
    hosts = ["fbcdn.net", "127.0.0.1"]
    assert host_allowed("https://scontent.xx.fbcdn.net/a", hosts)
    assert host_allowed("https://fbcdn.net/a", hosts)
    assert host_allowed("http://127.0.0.1:8080/a", hosts)
    assert not host_allowed("https://notfbcdn.net/a", hosts)
    assert not host_allowed("ftp://scontent.xx.fbcdn.net/a", hosts)
    assert not host_allowed("https://[::1/a", hosts)


def test_content_types() -> None:
    prefixes = CFG.content_types
    assert content_type_allowed("image/png", prefixes)
    assert content_type_allowed("application/pdf; charset=binary", prefixes)
    assert content_type_allowed("VIDEO/MP4", prefixes)
    assert not content_type_allowed("application/x-msdownload", prefixes)
    assert not content_type_allowed("text/html", prefixes)
    assert not content_type_allowed(None, prefixes)


def test_keys_are_by_content_hash() -> None:
    sha = "ab" + "0" * 62
    assert stored_key(sha, "image/jpeg") == f"ab/{sha}.jpg"
    assert stored_key(sha, "application/pdf; q=1") == f"ab/{sha}.pdf"
    assert stored_key(sha, "application/x-unknown") == f"ab/{sha}.bin"


def test_the_event_is_stable_and_names_the_file() -> None:
    src = event({"type": "image", "url": CDN})
    stored = Stored("ab" + "1" * 62, 1234, "image/png", "ab/ab11.png")
    ev = media_stored_event(src, Wanted(0, "image", CDN), stored, "/srv/media/")
    assert ev == {
        "type": "media_stored", "event_id": "ev-abc-1:media:0", "conversation_id": "c1", "page_id": "p1",
        "psid": "u1", "skill": "billing", "timestamp": 1700000000000, "mid": "m1", "attachment_index": 0,
        "attachment_type": "image", "url": CDN, "sha256": "ab" + "1" * 62, "bytes": 1234,
        "content_type": "image/png", "key": "ab/ab11.png", "location": "/srv/media/ab/ab11.png",
    }
    assert media_stored_event(src, Wanted(0, "image", CDN), stored, "/srv/media") == ev


def test_media_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="is not a host name"):
        Media(allowed_hosts=["https://fbcdn.net"])
    assert Media(allowed_hosts=[".FBCDN.net"]).allowed_hosts == ["fbcdn.net"]
    assert Media().store is None

"""Media keeping, the decisions: which attachments of a console event to keep, whether a host and a
content type may be fetched, where a file goes, and the `media_stored` console event. Pure, no I/O;
`streams.edges.media` does the downloading.

Files are stored by content (SHA-256): `<store>/<first two hex digits>/<sha256><ext>`, so the
same picture sent twice (or a redelivered event) is one file. The event id is derived from the
source event's id and the attachment's place in it, so a redelivery yields the same event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from streams.core.config_rich import Media

SOURCE_TYPES = ("consumer_message",)  # console events whose attachments are kept

EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "audio/mpeg": ".mp3",
    "audio/mp4": ".m4a",
    "audio/aac": ".aac",
    "audio/ogg": ".ogg",
    "audio/wav": ".wav",
    "application/pdf": ".pdf",
}

# failure reasons (a bounded label set for the metric)
FAILURES = ("host_not_allowed", "type_not_allowed", "too_large", "http_error", "timeout", "connection_error",
            "write_error")


@dataclass(frozen=True, slots=True)
class Wanted:
    """One attachment to keep: its place in the event, its type and URL."""

    index: int
    type: str
    url: str


@dataclass(frozen=True, slots=True)
class Stored:
    """A kept file: its content hash, size, type and key (path under the store)."""

    sha256: str
    bytes: int
    content_type: str
    key: str


def host_allowed(url: str, hosts: Iterable[str]) -> bool:
    """Is the URL http(s) on one of `hosts` or a subdomain of one?"""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        return False
    return any(host == h or host.endswith("." + h) for h in hosts)


def content_type_allowed(content_type: str | None, prefixes: Iterable[str]) -> bool:
    """Does the server's Content-Type (parameters ignored) start with one of `prefixes`?"""
    if not content_type:
        return False
    mime = content_type.split(";")[0].strip().lower()
    return any(mime.startswith(p.lower()) for p in prefixes)


def wanted(event: Mapping[str, Any], cfg: Media) -> tuple[list[Wanted], list[str]]:
    """The attachments of a console event to keep, and failure reasons for those refused at once
    (host not allowed). Events of other types, and attachments of other types or without a URL,
    are not media to keep (a location's or a shared link's URL is a link, not a file)."""
    if event.get("type") not in SOURCE_TYPES:
        return [], []
    keep: list[Wanted] = []
    refused: list[str] = []
    attachments = event.get("attachments")
    for i, att in enumerate(attachments if isinstance(attachments, list) else []):
        if not isinstance(att, Mapping):
            continue
        kind, url = att.get("type"), att.get("url")
        if kind not in cfg.attachment_types or not isinstance(url, str) or not url:
            continue
        if not host_allowed(url, cfg.allowed_hosts):
            refused.append("host_not_allowed")
            continue
        keep.append(Wanted(i, str(kind), url))
    return keep, refused


def stored_key(sha256: str, content_type: str) -> str:
    """Where a file goes under the store: `ab/abcdef….jpg`."""
    mime = content_type.split(";")[0].strip().lower()
    return f"{sha256[:2]}/{sha256}{EXTENSIONS.get(mime, '.bin')}"


def media_stored_event(source: Mapping[str, Any], item: Wanted, stored: Stored, store: str) -> dict[str, Any]:
    """The `media_stored` console event for one kept attachment of `source` (a console event)."""
    return {
        "type": "media_stored",
        "event_id": f"{source.get('event_id')}:media:{item.index}",
        "conversation_id": source.get("conversation_id"),
        "page_id": source.get("page_id"),
        "psid": source.get("psid"),
        "skill": source.get("skill"),
        "timestamp": source.get("timestamp"),
        "mid": source.get("mid"),
        "attachment_index": item.index,
        "attachment_type": item.type,
        "url": item.url,
        "sha256": stored.sha256,
        "bytes": stored.bytes,
        "content_type": stored.content_type,
        "key": stored.key,
        "location": f"{store.rstrip('/')}/{stored.key}",
    }

"""Normalized Messenger events: one per webhook item, on the internal `messenger.events*` topics.

This is also what `messenger-streams inspect` prints, one JSON object per line.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

EventKind = Literal[
    "message",
    "echo",
    "delivery",
    "read",
    "postback",
    "referral",
    "optin",
    "reaction",
    "message_edit",
    "handover",
    "app_roles",
    "account_linking",
    "policy_enforcement",
    "game_play",
    "unknown",
]


class Source(BaseModel):
    """Where the raw webhook body was read from; `index` is the item's place in the body."""

    model_config = ConfigDict(frozen=True)

    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    index: str | None = None


class Coordinates(BaseModel):
    model_config = ConfigDict(frozen=True)

    lat: float
    long: float


class AttachmentRef(BaseModel):
    """One inbound attachment, whole: `url` (media CDN URL, which expires; or the shared link of a
    `fallback`/`location`), `title` (location name, shared link title), `sticker_id` (stickers, also on
    their legacy `image` form), `coordinates` (a shared location)."""

    model_config = ConfigDict(frozen=True)

    type: str
    url: str | None = None
    title: str | None = None
    sticker_id: str | None = None
    coordinates: Coordinates | None = None


class ReferralRef(BaseModel):
    """How the person came: an ad (`source` ADS, `ad_id`), an m.me link (`ref`, source SHORTLINK)…
    On a first message after a Click-to-Messenger ad it rides on the message itself."""

    model_config = ConfigDict(frozen=True)

    ref: str | None = None
    source: str | None = None
    type: str | None = None
    ad_id: str | None = None
    ads_context_data: dict[str, Any] | None = None


class NormalizedEvent(BaseModel):
    """One Messenger event, ids as strings, times in epoch ms, keyed by `conversation_key`."""

    model_config = ConfigDict(frozen=True)

    kind: EventKind
    page_id: str
    psid: str | None
    mid: str | None = None
    timestamp: int
    standby: bool = False
    conversation_key: str
    idempotency_key: str
    sender_id: str | None = None
    recipient_id: str | None = None
    received_at: int | None = None
    text: str | None = None
    attachments: list[AttachmentRef] = []
    quick_reply_payload: str | None = None
    sticker_id: str | None = None
    referral: ReferralRef | None = None
    app_id: str | None = None
    metadata: str | None = None
    watermark: int | None = None
    mids: list[str] | None = None
    data: dict[str, Any] = {}
    source: Source = Source()

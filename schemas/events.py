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


class AttachmentRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: str
    url: str | None = None
    title: str | None = None


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
    app_id: str | None = None
    metadata: str | None = None
    watermark: int | None = None
    mids: list[str] | None = None
    data: dict[str, Any] = {}
    source: Source = Source()

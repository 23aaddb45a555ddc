"""Dead letters (`messenger.dlq`): what could not be processed, why, and the original bytes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from schemas.events import Source

DeadLetterReason = Literal[
    "body_too_large",
    "invalid_json",
    "not_page_object",
    "invalid_envelope",
    "invalid_item",
    "invalid_action",
    "invalid_outbound",
    "processing_error",
    "history_invalid_record",  # the history sink: a skill/history/CSAT record it cannot read
    "history_write_error",  # the history sink: a record the database refuses
    "page_disabled",
    "page_not_connected",
]


class DeadLetter(BaseModel):
    """One dead letter. `payload` is the original record value: UTF-8 text, or base64 when
    `payload_encoding` is "base64". For a bad item inside a good body, `item_index` names it
    (e.g. "entry[0].messaging[2]") and `payload` is still the whole original body.

    A letter that would be too large for Kafka keeps only a prefix of the original bytes:
    `truncated` is then true, `original_size` is the size of the whole original in bytes and
    `original_sha256` its SHA-256 (hex), so the original can still be identified (not replayed)."""

    model_config = ConfigDict(frozen=True)

    reason: DeadLetterReason
    error: str
    source: Source
    payload: str
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    item_index: str | None = None
    dead_lettered_at: int
    truncated: bool = False
    original_size: int | None = None
    original_sha256: str | None = None

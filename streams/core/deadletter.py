"""Dead letters: a consumed record (or one item of it) that cannot be processed, with its original bytes."""

from __future__ import annotations

import time

from schemas.dlq import DeadLetter
from schemas.events import Source
from streams.core import serde


def now_ms() -> int:
    return int(time.time() * 1000)


def dead_letter(
    raw: bytes, reason: str, error: str, source: Source, item_index: str | None = None
) -> DeadLetter:
    """The dead letter of one record (or one item of it), keeping the original bytes."""
    payload, encoding = serde.encode_payload(raw)
    return DeadLetter(
        reason=reason,
        error=error[:2000],
        source=source,
        payload=payload,
        payload_encoding=encoding,
        item_index=item_index,
        dead_lettered_at=now_ms(),
    )


"""Dead letters: a consumed record (or one item of it) that cannot be processed, with its original bytes.

A letter always fits in one Kafka record: when the whole original would make it larger than
`max_bytes` (default `MAX_LETTER_BYTES`, below the 1,000,000-byte producer request limit and Kafka's
default 1,048,588-byte `max.message.bytes`, leaving room for the key and headers), it keeps the
longest prefix of the original that fits, and says so (`truncated`, `original_size`,
`original_sha256`). Size limits along the raw path are described in docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import time

from schemas.dlq import DeadLetter
from schemas.events import Source
from streams.core import serde

MAX_LETTER_BYTES = 900_000
MAX_ERROR_CHARS = 2_000


def now_ms() -> int:
    return int(time.time() * 1000)


def _utf8_prefix(raw: bytes, n: int) -> bytes:
    """The first `n` bytes of `raw`, shortened so as not to end inside a UTF-8 sequence."""
    prefix = raw[:n]
    for cut in range(min(3, len(prefix)) + 1):
        candidate = prefix[: len(prefix) - cut]
        try:
            candidate.decode("utf-8")
        except UnicodeDecodeError:
            continue
        return candidate
    return prefix


def dead_letter(
    raw: bytes,
    reason: str,
    error: str,
    source: Source,
    item_index: str | None = None,
    *,
    max_bytes: int = MAX_LETTER_BYTES,
) -> DeadLetter:
    """The dead letter of one record (or one item of it): the original bytes, or if the letter
    would exceed `max_bytes` once serialized, the longest prefix that fits plus the original's
    size and SHA-256."""
    payload, encoding = serde.encode_payload(raw)
    letter = DeadLetter(
        reason=reason,
        error=error[:MAX_ERROR_CHARS],
        source=source,
        payload=payload,
        payload_encoding=encoding,
        item_index=item_index,
        dead_lettered_at=now_ms(),
    )
    size = len(serde.dumps(letter))
    if size <= max_bytes:
        return letter
    digest = hashlib.sha256(raw).hexdigest()
    keep = len(raw)
    while True:
        # shrink in proportion to the overshoot (JSON escaping and base64 make the letter bigger
        # than the bytes it keeps); converges in two or three rounds
        keep = max(0, min(keep - 1, int(keep * max_bytes / size * 0.97)))
        part = _utf8_prefix(raw, keep) if encoding == "utf-8" else raw[:keep]
        payload, part_encoding = serde.encode_payload(part)
        letter = DeadLetter(
            reason=reason,
            error=error[:MAX_ERROR_CHARS],
            source=source,
            payload=payload,
            payload_encoding=part_encoding,
            item_index=item_index,
            dead_lettered_at=letter.dead_lettered_at,
            truncated=True,
            original_size=len(raw),
            original_sha256=digest,
        )
        size = len(serde.dumps(letter))
        if size <= max_bytes or keep == 0:
            return letter

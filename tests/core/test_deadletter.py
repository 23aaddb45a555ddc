"""Dead letters always fit in a Kafka record; a truncated one says so and identifies the original."""

from __future__ import annotations

import base64
import hashlib

import orjson
import pytest

from schemas.dlq import DeadLetter
from schemas.events import Source
from streams.core import serde
from streams.core.deadletter import MAX_LETTER_BYTES, dead_letter

SRC = Source(topic="raw", partition=1, offset=7)


def test_small_letter_keeps_everything() -> None:
    letter = dead_letter(b'{"object":"page"', "invalid_json", "truncated JSON", SRC, "entry[0]")
    assert letter.payload == '{"object":"page"' and letter.payload_encoding == "utf-8"
    assert not letter.truncated and letter.original_size is None and letter.original_sha256 is None
    assert letter.item_index == "entry[0]" and letter.source == SRC


@pytest.mark.parametrize(
    "raw",
    [
        b'{"object":"page","pad":"' + b"x" * 2_000_000 + b'"}',  # a 2 MB body
        b"\x01\x02\\\"" * 400_000,  # JSON escaping makes the letter ~4x the bytes
        "é€😀".encode() * 150_000,  # multi-byte UTF-8: the prefix must not split a character
        b"\xff\xfe" + bytes(range(256)) * 6_000,  # not UTF-8: base64
    ],
    ids=["2MB", "escapes", "utf8", "binary"],
)
def test_oversized_letter_keeps_a_bounded_prefix_size_and_hash(raw: bytes) -> None:
    letter = dead_letter(raw, "body_too_large", "e" * 5000, SRC)
    data = serde.dumps(letter)
    assert len(data) <= MAX_LETTER_BYTES
    assert len(data) > MAX_LETTER_BYTES * 0.8  # keeps as much as fits, not a token prefix
    assert letter.truncated and letter.original_size == len(raw)
    assert letter.original_sha256 == hashlib.sha256(raw).hexdigest()
    kept = base64.b64decode(letter.payload) if letter.payload_encoding == "base64" else letter.payload.encode()
    assert raw.startswith(kept) and 0 < len(kept) < len(raw)
    assert len(letter.error) == 2000
    assert DeadLetter.model_validate(orjson.loads(data)) == letter


def test_custom_limit() -> None:
    letter = dead_letter(b"y" * 50_000, "invalid_json", "bad", SRC, max_bytes=10_000)
    assert len(serde.dumps(letter)) <= 10_000 and letter.truncated

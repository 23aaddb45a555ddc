"""The one serde module: orjson options fixed once, dead letters, payload encoding."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from pydantic import BaseModel

OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    """JSON bytes of plain values or pydantic models."""
    if isinstance(value, BaseModel):
        return value.__pydantic_serializer__.to_json(value)
    return orjson.dumps(value, option=OPTIONS)


def loads(data: bytes | str) -> Any:
    """Parse JSON bytes; raises orjson.JSONDecodeError (a ValueError)."""
    return orjson.loads(data)


def encode_payload(raw: bytes) -> tuple[str, str]:
    """Original bytes for a dead letter: (text, encoding), UTF-8 when it decodes, else base64."""
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def decode_payload(payload: str, encoding: str) -> bytes:
    """The original bytes back from a dead letter's payload."""
    if encoding == "base64":
        return base64.b64decode(payload)
    return payload.encode("utf-8")

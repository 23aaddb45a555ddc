"""Fuzzed and malformed webhook bodies (deterministic from a seed) and what must become of each.

Families (`FAMILIES`): truncated JSON, wrong types in nested fields, 2 MB bodies, invalid UTF-8,
1,000-item entries (990 good receipts and 10 bad items), unknown event kinds and envelopes, and
over-long texts. Every body uses fuzz-only people on the configured pages, so whatever the
conversation stage does with the good parts cannot touch the scripted conversations.

The expectation of a body is the ingest stage's own pure function (`split_body`) on the same bytes
and source: which items must reach `messenger.events.split` (by item index) and which parts must be
dead-lettered (reason, item index). The audit checks the running pipeline against it: every part
ends as an event or a dead letter with the original bytes (or, for a body too large for the
dead-letter topic, its size and SHA-256).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from chaos.traffic import PAGES
from schemas.events import Source
from streams.rules.normalize import split_body

BIG_BODY_BYTES = 2 * 1024 * 1024
WIDE_ITEMS = 1000
WIDE_BAD_ITEMS = 10


@dataclass(frozen=True)
class FuzzBody:
    """One fuzzed body: its family, the mutation applied, and the bytes."""

    index: int
    family: str
    mutation: str
    value: bytes


def _item(psid: str, page_id: str, now: int, mid: str, text: str = "fuzz") -> dict[str, Any]:
    return {"sender": {"id": psid}, "recipient": {"id": page_id}, "timestamp": now,
            "message": {"mid": mid, "text": text}}


def _envelope(page_id: str, items: list[Any], now: int) -> dict[str, Any]:
    return {"object": "page", "entry": [{"id": page_id, "time": now, "messaging": items}]}


# wrong types in nested fields: (name, path, value) — the value replaces what is at the path
_WRONG: list[tuple[str, tuple[Any, ...], Any]] = [
    ("sender.id=object", ("entry", 0, "messaging", 0, "sender", "id"), {"id": "1"}),
    ("sender.id=list", ("entry", 0, "messaging", 0, "sender", "id"), [1, 2]),
    ("sender=string", ("entry", 0, "messaging", 0, "sender"), "somebody"),
    ("recipient=list", ("entry", 0, "messaging", 0, "recipient"), []),
    ("message=string", ("entry", 0, "messaging", 0, "message"), "hello"),
    ("message.text=int", ("entry", 0, "messaging", 0, "message", "text"), 12345),
    ("message.text=object", ("entry", 0, "messaging", 0, "message", "text"), {"body": "x"}),
    ("message.mid=list", ("entry", 0, "messaging", 0, "message", "mid"), ["m1"]),
    ("message.attachments=string", ("entry", 0, "messaging", 0, "message", "attachments"), "image.png"),
    ("message.attachments=ints", ("entry", 0, "messaging", 0, "message", "attachments"), [1, 2, 3]),
    ("attachment.type=int", ("entry", 0, "messaging", 0, "message", "attachments"), [{"type": 5, "payload": {}}]),
    ("attachment.payload=string", ("entry", 0, "messaging", 0, "message", "attachments"),
     [{"type": "image", "payload": "http://x"}]),
    ("attachment.payload.url=int", ("entry", 0, "messaging", 0, "message", "attachments"),
     [{"type": "image", "payload": {"url": 42}}]),
    ("quick_reply=string", ("entry", 0, "messaging", 0, "message", "quick_reply"), "YES"),
    ("quick_reply.payload=object", ("entry", 0, "messaging", 0, "message", "quick_reply"), {"payload": {"a": 1}}),
    ("reply_to=int", ("entry", 0, "messaging", 0, "message", "reply_to"), 7),
    ("reply_to.mid=object", ("entry", 0, "messaging", 0, "message", "reply_to"), {"mid": {"x": 1}}),
    ("is_echo=string", ("entry", 0, "messaging", 0, "message", "is_echo"), "yes"),
    ("app_id=object", ("entry", 0, "messaging", 0, "message", "app_id"), {"id": 1}),
    ("metadata=list", ("entry", 0, "messaging", 0, "message", "metadata"), ["ob-1"]),
    ("timestamp=string", ("entry", 0, "messaging", 0, "timestamp"), "yesterday"),
    ("timestamp=huge", ("entry", 0, "messaging", 0, "timestamp"), 10**30),
    ("timestamp=negative", ("entry", 0, "messaging", 0, "timestamp"), -5),
    ("entry.time=string", ("entry", 0, "time"), "now"),
    ("entry.id=object", ("entry", 0, "id"), {"page": 1}),
    ("entry.messaging=object", ("entry", 0, "messaging"), {"0": {}}),
    ("entry.messaging=string", ("entry", 0, "messaging"), "items"),
    ("entry=string", ("entry", 0), "an entry"),
    ("entry=list-of-null", ("entry",), [None]),
    ("item=null", ("entry", 0, "messaging", 0), None),
    ("item=list", ("entry", 0, "messaging", 0), [1, 2]),
    ("delivery.watermark=string", ("entry", 0, "messaging", 0), {"sender": {"id": "S"}, "recipient": {"id": "P"},
                                                                 "timestamp": 1, "delivery": {"watermark": "abc"}}),
    ("delivery.mids=string", ("entry", 0, "messaging", 0), {"sender": {"id": "S"}, "recipient": {"id": "P"},
                                                            "timestamp": 1, "delivery": {"watermark": 1,
                                                                                         "mids": "m1"}}),
    ("read=int", ("entry", 0, "messaging", 0), {"sender": {"id": "S"}, "recipient": {"id": "P"}, "timestamp": 1,
                                                "read": 5}),
    ("postback.payload=list", ("entry", 0, "messaging", 0), {"sender": {"id": "S"}, "recipient": {"id": "P"},
                                                             "timestamp": 1, "postback": {"payload": [1]}}),
    ("postback.referral=string", ("entry", 0, "messaging", 0), {"sender": {"id": "S"}, "recipient": {"id": "P"},
                                                                "timestamp": 1,
                                                                "postback": {"title": "t", "payload": "p",
                                                                             "referral": "ad"}}),
    ("reaction.mid=int", ("entry", 0, "messaging", 0), {"sender": {"id": "S"}, "recipient": {"id": "P"},
                                                        "timestamp": 1, "reaction": {"mid": 5, "action": "react"}}),
    ("optin=string", ("entry", 0, "messaging", 0), {"sender": {"id": "S"}, "recipient": {"id": "P"},
                                                    "timestamp": 1, "optin": "yes"}),
    ("message_edit.num_edit=string", ("entry", 0, "messaging", 0), {"sender": {"id": "S"}, "recipient": {"id": "P"},
                                                                    "timestamp": 1,
                                                                    "message_edit": {"mid": "m", "text": "t",
                                                                                     "num_edit": "two"}}),
    ("pass_thread_control=string", ("entry", 0, "messaging", 0), {"sender": {"id": "S"}, "recipient": {"id": "P"},
                                                                  "timestamp": 1, "pass_thread_control": "app"}),
    ("standby=object", ("entry", 0, "standby"), {"a": 1}),
]

_UNKNOWN: list[tuple[str, Callable[[str, str, int, str], Any]]] = [
    ("unknown item key", lambda page, psid, now, mid: _envelope(
        page, [{"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": now,
                "brand_new_event": {"id": mid, "flavour": "strawberry"}}], now)),
    ("unknown item, no sender", lambda page, psid, now, mid: _envelope(
        page, [{"recipient": {"id": page}, "timestamp": now, "future_feature": [1, 2, 3]}], now)),
    ("feed changes entry", lambda page, psid, now, mid: {
        "object": "page", "entry": [{"id": page, "time": now, "changes": [{"field": "feed", "value": {"x": 1}}]}]}),
    ("instagram object", lambda page, psid, now, mid: {"object": "instagram", "entry": []}),
    ("whatsapp object", lambda page, psid, now, mid: {"object": "whatsapp_business_account", "entry": [{"id": page}]}),
    ("object missing", lambda page, psid, now, mid: {"entry": [{"id": page, "messaging": []}]}),
    ("top-level list", lambda page, psid, now, mid: [_envelope(page, [], now)]),
    ("top-level string", lambda page, psid, now, mid: "page"),
    ("standby unknown kind", lambda page, psid, now, mid: {
        "object": "page", "entry": [{"id": page, "time": now, "standby": [
            {"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": now, "mystery": {"v": 1}}]}]}),
    ("game_play", lambda page, psid, now, mid: _envelope(
        page, [{"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": now,
                "game_play": {"game_id": "g", "player_id": "p", "score": 3}}], now)),
]

FAMILIES = ("truncated_json", "wrong_types", "invalid_utf8", "unknown_kinds", "long_text", "big_body", "wide_entry")


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    cur = doc
    for step in path[:-1]:
        cur = cur[step]
    cur[path[-1]] = value
    return doc


def family_counts(total: int) -> dict[str, int]:
    """How many bodies of each family a run of `total` bodies has (at least 2 of the rare ones)."""
    big = max(2, total // 1000)
    wide = max(2, total // 200)
    rest = total - big - wide
    weights = {"truncated_json": 0.22, "wrong_types": 0.32, "invalid_utf8": 0.16, "unknown_kinds": 0.22,
               "long_text": 0.08}
    counts = {k: int(rest * w) for k, w in weights.items()}
    counts["wrong_types"] += rest - sum(counts.values())
    counts["big_body"] = big
    counts["wide_entry"] = wide
    return counts


def generate(total: int, seed: int, tag: str, now: int) -> list[FuzzBody]:
    """`total` fuzzed bodies in a seeded random order."""
    rng = random.Random(f"{seed}:{tag}:fuzz")
    plan = [fam for fam, n in family_counts(total).items() for _ in range(n)]
    rng.shuffle(plan)
    out = []
    for i, fam in enumerate(plan):
        page, _ = PAGES[i % len(PAGES)]
        psid = str(7_600_000_000_000_000 + rng.randrange(10**6) * 1000 + i % 1000)
        mid = f"m_fuzz{tag}{i}"
        base = _envelope(page, [_item(psid, page, now, mid)], now)
        if fam == "truncated_json":
            raw = orjson.dumps(base)
            cut = rng.randrange(1, len(raw) - 1)
            out.append(FuzzBody(i, fam, f"cut at {cut}/{len(raw)}", raw[:cut]))
        elif fam == "wrong_types":
            name, path, value = _WRONG[rng.randrange(len(_WRONG))]
            doc = _set(copy.deepcopy(base), path, copy.deepcopy(value))
            out.append(FuzzBody(i, fam, name, json.dumps(doc, separators=(",", ":")).encode()))
        elif fam == "invalid_utf8":
            raw = orjson.dumps(base)
            how = rng.randrange(3)
            if how == 0:  # a bad byte inside the text
                raw = raw.replace(b'"fuzz"', b'"fu\xff\xfezz"', 1)
                name = "bad bytes in text"
            elif how == 1:  # a lone surrogate half, as CESU-8
                raw = raw.replace(b'"fuzz"', b'"\xed\xa0\x80"', 1)
                name = "surrogate in text"
            else:
                raw = b"\xff\xfe" + raw.decode().encode("utf-16-le")
                name = "UTF-16 body"
            out.append(FuzzBody(i, fam, name, raw))
        elif fam == "unknown_kinds":
            name, make = _UNKNOWN[rng.randrange(len(_UNKNOWN))]
            out.append(FuzzBody(i, fam, name, orjson.dumps(make(page, psid, now, mid))))
        elif fam == "long_text":
            doc = _envelope(page, [_item(psid, page, now, mid, "x" * rng.choice((5001, 20_000)))], now)
            out.append(FuzzBody(i, fam, "text over the consumer limit", orjson.dumps(doc)))
        elif fam == "big_body":
            doc = _envelope(page, [_item(psid, page, now, mid, "y" * BIG_BODY_BYTES)], now)
            out.append(FuzzBody(i, fam, "2 MB text", orjson.dumps(doc)))
        else:
            items: list[Any] = [
                {"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": now + k,
                 "delivery": {"watermark": now + k}} for k in range(WIDE_ITEMS)
            ]
            for k in rng.sample(range(WIDE_ITEMS), WIDE_BAD_ITEMS):
                items[k] = {"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": now,
                            "delivery": {"watermark": "not a number"}}
            out.append(FuzzBody(i, fam, f"{WIDE_ITEMS} items, {WIDE_BAD_ITEMS} bad",
                                orjson.dumps(_envelope(page, items, now))))
    return out


@dataclass(frozen=True)
class Expected:
    """What the ingest stage must do with one body: events by item index, dead letters."""

    events: frozenset[str]
    letters: tuple[tuple[str, str | None], ...]  # (reason, item_index)


def expect(value: bytes, raw_topic: str, partition: int, offset: int, max_bytes: int) -> Expected:
    """The ingest stage's pure function on the same bytes and source."""
    res = split_body(value, max_bytes=max_bytes, source=Source(topic=raw_topic, partition=partition, offset=offset))
    return Expected(frozenset(str(e.source.index) for e in res.events),
                    tuple((r.reason, r.item_index) for r in res.rejected))

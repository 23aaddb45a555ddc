"""The fast path of `split_body` gives exactly what the pydantic path gives: the same events (every
field, its type and its JSON form) and the same rejected parts (reason, error text, item index), on
every sample, on the Simulator's traffic and on thousands of mutated items (fixed seed)."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

import streams.rules.normalize as normalize
from schemas.events import Source
from streams.commands.simulate import Simulator
from streams.core import serde
from streams.core.config import load_config
from streams.rules.normalize import split_body
from tests.kafkatools import envelope

ROOT = Path(__file__).parents[2]
SAMPLES = sorted((ROOT / "tests" / "samples").rglob("*.json"))  # the shared messenger-samples, and rich/
SOURCE = Source(topic="messenger.webhook.raw", partition=3, offset=42)
T = 1_790_000_000_000


class SlowItems(Counter[str]):
    """The items a fast split left to the pydantic path, by kind key (counted while `on`)."""

    on = False


@pytest.fixture
def slow_items(monkeypatch: pytest.MonkeyPatch) -> SlowItems:
    """Counts what the fast path did not take, so a test shows it did the work it compares."""
    seen = SlowItems()
    reference = normalize.normalize_item

    def counted(page_id: str, entry_time: int | None, doc: dict[str, Any], **kw: Any) -> Any:
        if seen.on:
            seen[next((k for k, _ in normalize.KIND_KEYS if doc.get(k) is not None), "unknown")] += 1
        return reference(page_id, entry_time, doc, **kw)

    monkeypatch.setattr(normalize, "normalize_item", counted)
    return seen


def state(value: Any) -> Any:
    """Everything a model holds, nested: type, fields (in order), fields set, extras, private."""
    if isinstance(value, BaseModel):
        return (type(value).__name__, [(k, state(v)) for k, v in value.__dict__.items()],
                sorted(value.model_fields_set), value.__pydantic_extra__, value.__pydantic_private__)
    if isinstance(value, list):
        return [state(v) for v in value]
    if isinstance(value, dict):
        return [(k, state(v)) for k, v in value.items()]
    return (type(value).__name__, value)


def assert_same(raw: bytes, *, source: Source | None = SOURCE, received_at: int | None = T,
                slow: SlowItems | None = None) -> int:
    """Both paths on one body; returns the number of events."""
    if slow is not None:
        slow.on = True
    fast = split_body(raw, source=source, received_at=received_at)
    if slow is not None:
        slow.on = False
    ref = split_body(raw, source=source, received_at=received_at, fast=False)
    assert fast.rejected == ref.rejected, raw
    assert fast.items == ref.items, raw
    assert len(fast.events) == len(ref.events), raw
    for a, b in zip(fast.events, ref.events, strict=True):
        assert a.model_dump() == b.model_dump(), raw
        assert serde.dumps(a) == serde.dumps(b), raw
        assert state(a) == state(b), raw
        assert a == b
    return len(fast.events)


def body_of(path: Path) -> bytes:
    doc = json.loads(path.read_text())
    if "object" not in doc and ("sender" in doc or "recipient" in doc):  # samples 07 and 21: single items
        doc = envelope(doc)
    return orjson.dumps(doc)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sample_splits_the_same_both_ways(path: Path) -> None:
    assert_same(body_of(path))
    assert_same(body_of(path), source=None, received_at=None)


def test_the_simulators_traffic_splits_the_same_and_mostly_fast(slow_items: SlowItems) -> None:
    sim = Simulator(load_config(ROOT / "deploy" / "connector.example.toml"), seed=7, consumers=200)
    bodies = [r.value for r in sim.records(6000) if r.topic == "raw"]
    events = sum(assert_same(raw, slow=slow_items) for raw in bodies)
    assert len(bodies) > 3000 and events > 3000
    # the fast path took every message, echo, receipt and postback; the models the flows' other kinds
    assert set(slow_items) <= {"optin", "pass_thread_control", "take_thread_control", "unknown"}, slow_items
    assert sum(slow_items.values()) < 0.05 * events, slow_items


# -- mutation fuzz ------------------------------------------------------------------------------------

SEEDS: list[dict[str, Any]] = [
    {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1700000000000,
     "message": {"mid": "m1", "text": "hi", "quick_reply": {"payload": "PICK"}}},
    {"sender": {"id": 1696785613739982, "user_ref": "ur"}, "recipient": {"id": "p1"}, "timestamp": "1527459824",
     "message": {"mid": "m2", "sticker_id": 369239263222822, "reply_to": {"mid": "m0"},
                 "attachments": [{"type": "image", "payload": {"url": "https://cdn/x.png"}},
                                 {"type": "location", "title": "Here", "url": "https://l",
                                  "payload": {"coordinates": {"lat": 5, "long": -3.25}}},
                                 {"type": "fallback", "payload": {"title": "T", "url": "https://u",
                                                                  "sticker_id": "42"}}]}},
    {"sender": {"id": "p1"}, "recipient": {"id": "u1"}, "timestamp": 1700000000000, "seq": 7,
     "message": {"is_echo": True, "app_id": 263902037430900, "metadata": "outbox-1", "mid": "m3", "text": "yo"}},
    {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1700000000000,
     "prior_message": {"source": "checkbox_plugin", "identifier": "ur-1"},
     "message": {"mid": "m4", "text": "ok", "referral": {"ref": "r", "source": "ADS", "ad_id": 77,
                                                         "ads_context_data": {"ad_title": "A"}}}},
    {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1700000000000,
     "delivery": {"mids": ["m1", "m2"], "watermark": 1700000000000}},
    {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1700000000000, "read": {"watermark": 1527459824}},
    {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1700000000000,
     "postback": {"mid": "m5", "title": "Talk to an agent", "payload": "AGENT"}},
    {"sender": {"id": "u1"}, "recipient": {"id": "p1"}, "timestamp": 1700000000000, "postback": {"payload": "P"}},
]
# values every field is tried with: wrong types, seconds vs ms, numeric strings, huge strings
VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 7, 1.5, 2.0, -0.0, 1527459824, 1527459824.0, 1700000000000, 99999999999,
    100000000000, 2**63 - 1, -(2**63), "", " ", "x", "m9", "12", "1527459824", " 1700000000000 ", "-5", "1e3",
    "1.5", "\u0663", "\u00b2", "x" * 256, "y" * 257, "true", "1", [], ["m1"], ["m1", 2], [None], {}, {"a": 1},
    {"payload": "X"}, {"payload": 5}, {"mid": None}, {"mid": "r"}, {"id": "u2"}, {"id": 5}, {"id": True},
    [{"type": "image", "payload": {"url": "u", "sticker_id": 5}}], [{"type": 5}], [{"payload": {}}], ["att"],
    [{"type": "location", "payload": {"coordinates": {"lat": 91, "long": 0}}}],
    [{"type": "image", "url": 5}], [{"type": "file", "title": None, "payload": None}],
    {"source": "checkbox_plugin", "identifier": "i"}, {"ref": "r", "ad_id": True},
    {"watermark": 1700000000000}, {"mid": "m7", "text": "t"}, {"title": "B", "payload": "P"},  # a valid second kind
]
# keys tried where they are missing: every field the models know, and some they do not
KEYS = [
    "mid", "text", "is_echo", "app_id", "metadata", "quick_reply", "attachments", "reply_to", "sticker_id",
    "referral", "watermark", "mids", "title", "payload", "type", "url", "id", "user_ref", "sender", "recipient",
    "timestamp", "message", "delivery", "read", "postback", "optin", "reaction", "policy-enforcement",
    "policy_enforcement_legacy", "prior_message", "seq", "nlp", "time", "messaging", "standby", "changes",
]


def paths(doc: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document (dict keys and list indexes), the root excluded."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield (*at, k)
        yield from paths(v, (*at, k))


def mutate(doc: dict[str, Any], rng: random.Random) -> None:
    """One change at a random place: a field removed, a value replaced, a key added."""
    where = rng.choice(list(paths(doc)))
    parent = doc
    for k in where[:-1]:
        parent = parent[k]
    last = where[-1]
    roll = rng.random()
    if roll < 0.2 and isinstance(parent, dict):
        del parent[last]
    elif roll < 0.75:
        parent[last] = copy.deepcopy(rng.choice(VALUES))
    else:
        target = parent[last] if isinstance(parent[last], dict) else parent
        if isinstance(target, dict):
            target[rng.choice(KEYS)] = copy.deepcopy(rng.choice(VALUES))
        else:
            parent[last] = copy.deepcopy(rng.choice(VALUES))


def fuzz_bodies(count: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    samples = [orjson.loads(body_of(p)) for p in SAMPLES]
    items = SEEDS + [it for s in samples if s.get("object") == "page" for e in s["entry"]
                     for it in e.get("messaging", [])]
    for _ in range(count):
        entry: dict[str, Any] = {"id": rng.choice(["p1", 1691462197845448]), "time": rng.choice([1700000000001, 0]),
                                 "messaging": [copy.deepcopy(rng.choice(items)) for _ in range(rng.randint(1, 3))]}
        if rng.random() < 0.2:
            entry["standby"] = [copy.deepcopy(rng.choice(items))]
        doc: dict[str, Any] = {"object": "page", "entry": [entry]}
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            mutate(entry, rng)
        if rng.random() < 0.03:
            mutate(doc, rng)  # the envelope too, now and then
        yield orjson.dumps(doc)


def test_mutated_items_split_the_same_both_ways(slow_items: SlowItems) -> None:
    rng = random.Random(20260518)
    events = rejected = 0
    for raw in fuzz_bodies(6000, seed=18):
        events += assert_same(raw, source=rng.choice([None, SOURCE]), received_at=rng.choice([None, 0, T]),
                              slow=slow_items)
        rejected += len(split_body(raw).rejected)
    # both paths and both outcomes were exercised, many times each
    assert events > 5000 and rejected > 1500, (events, rejected)
    assert sum(slow_items.values()) > 2000 and events - sum(slow_items.values()) > 2000, (events, slow_items)

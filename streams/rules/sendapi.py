"""Send API rules as plain functions: Meta's limits, text splitting, error classification, backoff,
the per-page token bucket and secret redaction. No I/O here; `streams/dispatch.py` drives it.

Limits (reference §3.1): text 2000 characters, at most 13 quick replies, quick-reply titles 20
characters, payloads 1000 characters. Lengths are counted in UTF-16 code units, as Meta's
JavaScript-side limits are (an emoji outside the BMP counts 2), which is never less than the number of
code points, so a part we accept is never too long for Meta.

Errors (reference §3.4): see `classify_error` and docs/edges.md for the table.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from streams.core.tokens import redact as redact  # re-exported: see the secrets section

TEXT_LIMIT = 2000
MAX_QUICK_REPLIES = 13
QUICK_REPLY_TITLE_LIMIT = 20
PAYLOAD_LIMIT = 1000

SENDER_ACTIONS = frozenset({"typing_on", "typing_off", "mark_seen", "react", "unreact"})

# --- lengths and splitting -----------------------------------------------------------------------


def units(text: str) -> int:
    """Length as Meta counts it: UTF-16 code units."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def _glue(ch: str) -> bool:
    """A character that belongs to the one before it (combining mark, ZWJ, variation selector, skin
    tone): never start a part with one."""
    cp = ord(ch)
    return (
        unicodedata.combining(ch) != 0
        or cp == 0x200D
        or 0xFE00 <= cp <= 0xFE0F
        or 0x1F3FB <= cp <= 0x1F3FF
        or 0xE0020 <= cp <= 0xE007F
        or unicodedata.category(ch) in ("Mn", "Me")
    )


def _prefix_len(text: str, limit: int) -> int:
    """The largest n such that units(text[:n]) <= limit."""
    total = 0
    for i, ch in enumerate(text):
        total += 2 if ord(ch) > 0xFFFF else 1
        if total > limit:
            return i
    return len(text)


def split_text(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """Split `text` into parts of at most `limit` UTF-16 units, on word boundaries.

    A part ends at the last whitespace that fits (the whitespace at the cut is dropped; whitespace
    inside a part is kept). A word longer than `limit` is cut hard, never inside a character and,
    where possible, not before a combining mark / ZWJ / variation selector. Text within the limit is
    returned unchanged as the only part."""
    if limit < 2:
        raise ValueError("limit must be at least 2")
    parts: list[str] = []
    rest = text
    while units(rest) > limit:
        n = _prefix_len(rest, limit)
        window = rest[:n]
        # `rest[n]` is the first character that does not fit: if it is whitespace the window ends a word
        if rest[n].isspace():
            cut, skip = n, n
        else:
            ws = max((i for i, ch in enumerate(window) if ch.isspace()), default=-1)
            if ws > 0 and window[:ws].strip():
                cut, skip = ws, ws
            else:
                cut = n
                while cut > 1 and _glue(rest[cut]):
                    cut -= 1
                if cut <= 1:
                    cut = n
                skip = cut
        part = rest[:cut].rstrip()
        if part:
            parts.append(part)
        rest = rest[skip:].lstrip()
    if rest or not parts:
        parts.append(rest)
    return parts


def truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-16 units (never inside a character)."""
    if units(text) <= limit:
        return text
    return text[: _prefix_len(text, limit)]


# --- limits ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Meta's Send API limits (overridable for tests)."""

    text: int = TEXT_LIMIT
    quick_replies: int = MAX_QUICK_REPLIES
    title: int = QUICK_REPLY_TITLE_LIMIT
    payload: int = PAYLOAD_LIMIT


def _fix_quick_replies(items: list[Any], limits: Limits, warnings: list[str]) -> list[Any]:
    if len(items) > limits.quick_replies:
        warnings.append(f"dropped {len(items) - limits.quick_replies} quick replies over the limit of "
                        f"{limits.quick_replies}")
        items = items[: limits.quick_replies]
    fixed: list[Any] = []
    for i, qr in enumerate(items):
        if not isinstance(qr, dict):
            fixed.append(qr)
            continue
        qr = dict(qr)
        title = qr.get("title")
        if isinstance(title, str) and units(title) > limits.title:
            qr["title"] = truncate(title, limits.title)
            warnings.append(f"quick_replies[{i}].title truncated to {limits.title} characters")
        payload = qr.get("payload")
        if isinstance(payload, str) and units(payload) > limits.payload:
            qr["payload"] = truncate(payload, limits.payload)
            warnings.append(f"quick_replies[{i}].payload truncated to {limits.payload} characters")
        fixed.append(qr)
    return fixed


def prepare_requests(request: dict[str, Any], limits: Limits = Limits()) -> tuple[list[dict[str, Any]], list[str]]:
    """The Send API bodies to POST, in order, for one outbound `request`, and warnings about what was
    changed to fit Meta's limits.

    - `sender_action` requests go as `recipient` + `sender_action` (+ `payload` for react/unreact).
    - A text over the limit becomes several requests (same recipient, messaging_type, tag, metadata);
      quick replies ride on the last part only.
    - Quick replies: at most 13 kept, titles and payloads truncated."""
    warnings: list[str] = []
    if "sender_action" in request:
        body: dict[str, Any] = {"recipient": request.get("recipient"), "sender_action": request["sender_action"]}
        if "payload" in request:
            body["payload"] = request["payload"]
        extra = sorted(k for k in request if k not in body)
        if extra:
            warnings.append(f"sender_action request: dropped fields {', '.join(extra)}")
        return [body], warnings

    base = copy.deepcopy(request)
    message = base.get("message")
    if not isinstance(message, dict):
        return [base], warnings
    quick = message.pop("quick_replies", None)
    if isinstance(quick, list):
        quick = _fix_quick_replies(quick, limits, warnings)
    text = message.get("text")
    texts = split_text(text, limits.text) if isinstance(text, str) else [None]
    if len(texts) > 1:
        warnings.append(f"text of {units(text or '')} characters split into {len(texts)} messages")
    out: list[dict[str, Any]] = []
    for i, part in enumerate(texts):
        body = copy.deepcopy(base) if i < len(texts) - 1 else base
        msg = body["message"]
        if part is not None:
            msg["text"] = part
        if quick is not None and i == len(texts) - 1:
            msg["quick_replies"] = quick
        out.append(body)
    return out, warnings


# --- errors ----------------------------------------------------------------------------------------

RETRYABLE_CODES = frozenset({2, 4, 613, 1200})
IN_DOUBT = "in_doubt"  # the reason of a send that may or may not have reached the person
PERMANENT_CODES = frozenset({10, 100, 190, 200, 551, 199})
WINDOW_SUBCODES = frozenset({2018278, 2018065})


@dataclass(frozen=True)
class SendError:
    """One failed Send API call, classified."""

    code: int | None
    subcode: int | None
    message: str
    retryable: bool
    reauth: bool = False
    http_status: int | None = None
    reason: str = "graph_error"


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def parse_error_body(body: bytes | str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The `error` object of a Graph error body, or None when there is none."""
    data: Any = body
    if isinstance(body, bytes | str):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data["error"]  # type: ignore[no-any-return]
    return None


def classify_error(http_status: int | None, body: bytes | str | dict[str, Any] | None) -> SendError:
    """Classify a failed Graph call (reference §3.4).

    Retried: codes 2, 4, 613, 1200; HTTP 5xx and 429 without a known permanent code; unreadable
    bodies on 5xx. Not retried: 551, 10 (window / not receiving / page restricted), 100, 200, 190
    (also: the page needs re-authorization), 199 (the message may have been sent: never blindly
    resent), and any other 4xx."""
    err = parse_error_body(body)
    if err is None:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
        retry = http_status is None or http_status >= 500 or http_status == 429
        return SendError(None, None, f"HTTP {http_status}: {text[:300]}".strip(), retry, http_status=http_status,
                         reason="http_error")
    code = _int(err.get("code"))
    subcode = _int(err.get("error_subcode"))
    message = str(err.get("message") or "")
    if code in PERMANENT_CODES:
        retry = False
    elif code in RETRYABLE_CODES:
        retry = True
    else:
        retry = http_status is not None and (http_status >= 500 or http_status == 429)
    reason = "graph_error"
    if code == 190:
        reason = "reauth_required"
    elif code == 10 and subcode in WINDOW_SUBCODES:
        reason = "window_closed"
    elif code == 551:
        reason = "person_unavailable"
    elif code in (4, 613):
        reason = "rate_limited"
    return SendError(code, subcode, message, retry, reauth=code == 190, http_status=http_status, reason=reason)


def transport_error(exc: BaseException, reached: bool = False) -> SendError:
    """A timeout or connection error. Retried when the request cannot have reached Graph (no
    connection was made); when it may have (`reached`: a timeout or a dropped connection after the
    request was written) it is in doubt: never resent blindly (the echo tells whether it arrived)."""
    kind = "timeout" if isinstance(exc, TimeoutError) else "connection_error"
    if reached:
        return SendError(None, None, f"in doubt after {kind}: {type(exc).__name__}; the message may have been "
                         "delivered (its echo carries the outbox id as metadata)", False, reason=IN_DOUBT)
    return SendError(None, None, f"{kind}: {type(exc).__name__}", True, reason=kind)


# --- backoff ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: attempt n (1-based) failed → wait base * factor**(n-1), capped, with
    up to `jitter` (a fraction) added at random."""

    base: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    max_attempts: int = 6
    jitter: float = 0.1

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        try:
            raw = self.base * self.factor ** min(max(attempt - 1, 0), 64)
        except OverflowError:
            raw = math.inf
        d = min(self.cap, raw)
        return d * (1.0 + self.jitter * rand())

    def schedule(self) -> list[float]:
        """The waits between attempts, without jitter (max_attempts - 1 of them)."""
        return [self.delay(n, lambda: 0.0) for n in range(1, self.max_attempts)]


# --- rate limit ------------------------------------------------------------------------------------


class TokenBucket:
    """`rate` sends per second with bursts of `burst`; `reserve(now)` takes one token and returns how
    long to wait before using it. `pause_until` holds all sends (a 613 from Meta)."""

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self.tokens = self.burst
        self.stamp = now
        self.not_before = 0.0

    def reserve(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        wait = 0.0 if self.tokens >= 0 else -self.tokens / self.rate
        return max(wait, self.not_before - now)

    def pause_until(self, when: float) -> None:
        self.not_before = max(self.not_before, when)


# --- secrets -------------------------------------------------------------------------------------


# `redact(text, secrets)`: one implementation for every process, streams.core.tokens.redact (imported
# above): every secret longer than 3 characters, and every `access_token=…`-like parameter, becomes ***.


# --- the sent log: what the dispatcher sent, per conversation --------------------------------------
#
# A compacted topic co-partitioned with messenger.outbound (record i of outbound partition p is
# recorded in partition p of the log). One record per (conversation, outbox id), written before the
# Graph call (`in_flight`) and after it (`sent` / `failed`, with the SendResult), plus one `claim`
# record per partition written by each new owner when the partition is assigned to it. Every reader
# applies the records in log order; this module is that fold, without I/O (streams/edges/sentlog.py
# reads and writes the topic).
#
# The fence: an owner may call Graph for an outbox id only when its own in_flight record is the
# first record of that id in the log AND, when that record is applied, the partition's latest claim
# is its own. A dispatcher that lost the partition without noticing (a zombie) therefore never sends
# after the new owner's claim, and the new owner, which read the log through its claim, sees every
# marker the old owner wrote before it.

DAY_MS = 86_400_000
SENT_LOG_VERSION = 1
CLAIM_KEY = b"~claim"
IN_FLIGHT, SENT, FAILED = "in_flight", "sent", "failed"
SENT_STATES = frozenset({IN_FLIGHT, SENT, FAILED})


@dataclass(frozen=True)
class SentLogBounds:
    """How much of the sent log a dispatcher keeps.

    `max_age_ms`: outbound records created longer ago are not sent (`expired`), and entries are kept
    `max_age_ms + margin_ms` (the margin absorbs clock skew between workers and dispatchers), so an
    outbox id young enough to be sent is never one whose entry was dropped for age. The topic's
    `retention.ms` is the same sum. `per_conversation` / `per_partition`: most recent ids kept per
    conversation / per partition; an id pushed out by newer ones is forgotten (counted)."""

    max_age_ms: int = 7 * DAY_MS
    margin_ms: int = DAY_MS
    per_conversation: int = 500
    per_partition: int = 100_000

    @property
    def keep_ms(self) -> int:
        return self.max_age_ms + self.margin_ms


def entry_key(conversation: str, outbox_id: str) -> bytes:
    """The sent-log record key of one outbox id of one conversation (unambiguous for any strings)."""
    return orjson.dumps([conversation, outbox_id])


def entry_value(conversation: str, outbox_id: str, state: str, at: int, by: str,
                result: dict[str, Any] | None = None) -> bytes:
    """A sent-log record: `state` of `outbox_id` written at `at` (epoch ms) by owner token `by`;
    `result` is the SendResult (as a dict) for `sent` / `failed`."""
    return orjson.dumps({"v": SENT_LOG_VERSION, "conversation": conversation, "outbox_id": outbox_id,
                         "state": state, "at": at, "by": by, "result": result})


def claim_value(by: str, at: int) -> bytes:
    """The record a new owner writes (key CLAIM_KEY) when a partition is assigned to it."""
    return orjson.dumps({"v": SENT_LOG_VERSION, "claim": by, "at": at})


@dataclass(slots=True)
class SentEntry:
    """What the log says about one outbox id. `granted` is the owner allowed to call Graph for it
    (the writer of the first record, if that was an in_flight written under its own claim)."""

    conversation: str
    outbox_id: str
    state: str
    at: int
    by: str  # the writer of the latest record
    granted: str | None
    result: str | None = None  # the SendResult JSON of a `sent` / `failed` entry
    first_by: str = ""  # the writer of the first record

    def only_marked_by(self, token: str) -> bool:
        """True when the only thing the log holds about this id is `token`'s in_flight marker."""
        return self.state == IN_FLIGHT and self.first_by == token and self.by == token


class SentLog:
    """One partition of the sent log, folded from its records in log order (`apply`)."""

    def __init__(self, bounds: SentLogBounds = SentLogBounds()) -> None:
        self.bounds = bounds
        self.position = 0  # the next offset to apply
        self.claim: str | None = None
        self.entries: OrderedDict[bytes, SentEntry] = OrderedDict()  # order of first record
        self.by_conversation: dict[str, list[bytes]] = {}
        self.skipped = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, conversation: str, outbox_id: str) -> SentEntry | None:
        return self.entries.get(entry_key(conversation, outbox_id))

    def apply(self, offset: int, key: bytes | None, value: bytes | None) -> None:
        """Apply one record of this partition (records must come in offset order)."""
        self.position = max(self.position, offset + 1)
        if key is None:
            self.skipped += 1
            return
        if key == CLAIM_KEY:
            claim = _decode(value).get("claim") if value is not None else None
            self.claim = claim if isinstance(claim, str) else None
            return
        if value is None:  # a released in_flight marker: the id was not sent
            self._drop(key)
            return
        rec = _decode(value)
        conv, oid, state, at, by = (rec.get(k) for k in ("conversation", "outbox_id", "state", "at", "by"))
        if not (isinstance(conv, str) and isinstance(oid, str) and state in SENT_STATES
                and isinstance(at, int) and isinstance(by, str)):
            self.skipped += 1
            return
        res = rec.get("result")
        # kept as str: orjson's bytes keep a buffer of 4 KiB or more whatever their length
        result = orjson.dumps(res).decode() if isinstance(res, dict) else None
        entry = self.entries.get(key)
        if entry is None:
            conv, by = sys.intern(conv), sys.intern(by)  # shared by every entry of a conversation / owner
            granted = by if state == IN_FLIGHT and self.claim == by else None
            self.entries[key] = SentEntry(conv, oid, state, at, by, granted, result, first_by=by)
            ids = self.by_conversation.setdefault(conv, [])
            ids.append(key)
            if len(ids) > self.bounds.per_conversation:
                self._drop(ids[0])
                self.evicted += 1
            if len(self.entries) > self.bounds.per_partition:
                self._drop(next(iter(self.entries)))  # O(1): OrderedDict
                self.evicted += 1
            return
        if entry.state != IN_FLIGHT and state == IN_FLIGHT:
            return  # a stale marker after the outcome (a zombie's): the outcome stands
        if entry.by != by:
            entry.first_by = ""  # several writers: nobody may release it alone
        entry.state, entry.by = state, by
        if result is not None:
            entry.result = result

    def _drop(self, key: bytes) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        ids = self.by_conversation.get(entry.conversation)
        if ids is not None:
            ids.remove(key)
            if not ids:
                del self.by_conversation[entry.conversation]

    def prune(self, now_ms: int) -> int:
        """Forget entries first written more than `keep_ms` ago; returns how many. Entries are in
        the order of their first record, so this stops at the first young one."""
        horizon = now_ms - self.bounds.keep_ms
        old: list[bytes] = []
        for k, e in self.entries.items():
            if e.at >= horizon:
                break
            old.append(k)
        for k in old:
            self._drop(k)
        return len(old)


def _decode(value: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def is_expired(created_at: int | None, now_ms: int, bounds: SentLogBounds) -> bool:
    """An outbound record too old to send: its sent-log entry may already be forgotten."""
    return created_at is not None and now_ms - created_at > bounds.max_age_ms


# What to do with one outbound record, from the sent log.
NEW, REPLAY, IN_DOUBT_AGAIN, SEND, SUPERSEDED = "new", "replay", "in_doubt", "send", "superseded"


def before_marker(entry: SentEntry | None) -> str:
    """Before writing an in_flight marker: NEW (never seen), REPLAY (an outcome is recorded: send
    its SendResult again, no Graph call), or IN_DOUBT_AGAIN (a marker without outcome: an owner
    stopped between the Graph call and recording it)."""
    if entry is None:
        return NEW
    if entry.state in (SENT, FAILED) and entry.result is not None:
        return REPLAY
    return IN_DOUBT_AGAIN


def after_marker(log: SentLog, entry: SentEntry | None, token: str) -> str:
    """After our in_flight marker was read back: SEND only if the log granted the id to us;
    SUPERSEDED when another owner claimed the partition (stop working on it); else what
    `before_marker` says about the records another owner wrote first."""
    if entry is not None and entry.granted == token:
        return SEND
    if log.claim != token:
        return SUPERSEDED
    verdict = before_marker(entry)
    return IN_DOUBT_AGAIN if verdict == NEW else verdict

"""Split, validate and normalize one raw webhook body: pure functions, no I/O.

`split_body(raw)` returns every good item as a `NormalizedEvent` and every bad part as a
`Rejected` (reason, error, where). One bad item never loses the good items beside it.

Two paths give the same result. The pydantic models of `schemas/webhook.py` are the reference: they
decide every item and word every error. The fast path (`_fast_entry`, `_fast_event`) checks the
common well-formed shapes (message, echo, delivery, read, plain postback) by hand, field by field as
those models accept them, and builds the event without validating it again: validation was more than
half of the split's CPU (`python -m bench.cpu`). Whatever it is not sure of (another kind, an unusual
type, anything the models would reject) goes to the pydantic path, item by item.
tests/rules/test_normalize_fast.py checks that the two agree on samples, simulated traffic and
mutated items.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.events import AttachmentRef, Coordinates, EventKind, NormalizedEvent, ReferralRef, Source
from schemas.webhook import Attachment, Entry, MessagingItem, WebhookBody, as_epoch_ms, as_id

HANDOVER_KEYS = ("pass_thread_control", "take_thread_control", "request_thread_control")
# Which key makes an item which kind; the first present wins (echo is decided on `message`).
KIND_KEYS: tuple[tuple[str, EventKind], ...] = (
    ("message", "message"),
    ("delivery", "delivery"),
    ("read", "read"),
    ("postback", "postback"),
    ("optin", "optin"),
    ("reaction", "reaction"),
    ("message_edit", "message_edit"),
    ("pass_thread_control", "handover"),
    ("take_thread_control", "handover"),
    ("request_thread_control", "handover"),
    ("app_roles", "app_roles"),
    ("account_linking", "account_linking"),
    ("policy_enforcement", "policy_enforcement"),
    ("policy-enforcement", "policy_enforcement"),
    ("game_play", "game_play"),
    ("referral", "referral"),
)


@dataclass(frozen=True)
class Rejected:
    """A part of a body that cannot be processed: goes to the dead-letter topic."""

    reason: str
    error: str
    item_index: str | None = None


@dataclass
class SplitResult:
    """What one body gave: normalized events, rejected parts, and the item count seen."""

    events: list[NormalizedEvent] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    items: int = 0


class BodyError(ValueError):
    """The whole body is unusable (not JSON, not a page object, bad envelope)."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason


def short_error(exc: ValidationError) -> str:
    """A pydantic error as one line: `loc: message; loc: message`."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - 3
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def parse_body(raw: bytes, max_bytes: int, *, fast: bool = True) -> list[dict[str, Any]]:
    """Parse and check the envelope, return its entries; raises `BodyError` with a dead-letter reason.
    `fast`: a list of JSON objects, all `WebhookBody` accepts, is taken as it is."""
    if len(raw) > max_bytes:
        raise BodyError("body_too_large", f"body is {len(raw)} bytes, over the limit of {max_bytes}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError("invalid_json", f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BodyError("invalid_envelope", f"body must be a JSON object, not {type(doc).__name__}")
    if doc.get("object") != "page":
        obj = doc.get("object")
        raise BodyError("not_page_object", f"object is {obj!r}, expected 'page'")
    entries = doc.get("entry")
    if fast and type(entries) is list and all(type(e) is dict for e in entries):
        return entries
    try:
        return WebhookBody.model_validate(doc).entry
    except ValidationError as exc:
        raise BodyError("invalid_envelope", short_error(exc)) from None


def _kind_of(item: MessagingItem, doc: dict[str, Any]) -> EventKind:
    for key, kind in KIND_KEYS:
        if doc.get(key) is not None:
            if kind == "message" and item.message is not None and item.message.is_echo:
                return "echo"
            return kind
    return "unknown"


def _prior_message(doc: dict[str, Any]) -> dict[str, str] | None:
    """`prior_message` of a reply (`{"source": "checkbox_plugin", "identifier": <user_ref>}`): on the
    item, or inside `message` (accepted too)."""
    message = doc.get("message")
    prior = doc.get("prior_message") or (message.get("prior_message") if isinstance(message, dict) else None)
    if not isinstance(prior, dict):
        return None
    source, ident = prior.get("source"), prior.get("identifier")
    if not isinstance(source, str) or not isinstance(ident, str) or not ident or len(ident) > 256:
        return None
    return {"source": source, "identifier": ident}


def _digest(doc: Any) -> str:
    return hashlib.sha1(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS), usedforsecurity=False).hexdigest()[:16]


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _id_or_none(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text_or_none(value)


def _coordinates(payload: dict[str, Any]) -> Coordinates | None:
    raw = payload.get("coordinates")
    if not isinstance(raw, dict):
        return None
    lat, long = raw.get("lat"), raw.get("long")
    if isinstance(lat, bool) or isinstance(long, bool):
        return None
    if not isinstance(lat, int | float) or not isinstance(long, int | float):
        return None
    if not (-90 <= lat <= 90 and -180 <= long <= 180):
        return None
    return Coordinates(lat=lat, long=long)


def attachment_ref(att: Attachment, message_sticker_id: str | None = None) -> AttachmentRef:
    """One inbound attachment, whole. Media: `payload.url`. `location` (legacy) and `fallback` (a
    shared link): `title`/`url` at the attachment level (or in the payload), coordinates for a
    location. Stickers: `payload.sticker_id`, or the message's `sticker_id` on their legacy `image`
    form. A field of the wrong type is left out, never a reason to drop the message."""
    url = att.url if isinstance(att.url, str) else None
    title = att.title if isinstance(att.title, str) else None
    return AttachmentRef(**_attachment_fields(att.type, att.payload, title, url, message_sticker_id))


def _attachment_fields(
    kind: str, payload: Any, title: str | None, url: str | None, message_sticker_id: str | None
) -> dict[str, Any]:
    """An `AttachmentRef`'s fields (in their order) from an attachment's checked parts."""
    payload = payload if isinstance(payload, dict) else {}
    url = url or _text_or_none(payload.get("url"))
    title = title or _text_or_none(payload.get("title"))
    sticker_id = _id_or_none(payload.get("sticker_id"))
    if sticker_id is None and kind == "image" and message_sticker_id is not None:
        sticker_id = message_sticker_id
    coordinates = _coordinates(payload) if kind == "location" else None
    return {"type": kind, "url": url, "title": title, "sticker_id": sticker_id, "coordinates": coordinates}


def referral_ref(raw: Any) -> ReferralRef | None:
    """The referral of a message, postback or referral event, read leniently (None when absent)."""
    if not isinstance(raw, dict):
        return None
    ad_id = raw.get("ad_id")
    try:
        ad_id = as_id(ad_id) if ad_id is not None else None
    except ValueError:
        ad_id = None
    context = raw.get("ads_context_data")
    ref = ReferralRef(
        ref=_text_or_none(raw.get("ref")),
        source=_text_or_none(raw.get("source")),
        type=_text_or_none(raw.get("type")),
        ad_id=ad_id,
        ads_context_data=context if isinstance(context, dict) else None,
    )
    return ref if ref != ReferralRef() else None


def normalize_item(
    page_id: str,
    entry_time: int | None,
    doc: dict[str, Any],
    *,
    standby: bool,
    index: str,
    source: Source,
    received_at: int | None,
) -> NormalizedEvent:
    """One item, validated by the pydantic models, as a NormalizedEvent (the reference path); raises
    ValidationError/ValueError when invalid."""
    item = MessagingItem.model_validate(doc)
    kind = _kind_of(item, doc)
    sender_id = item.sender.id if item.sender else None
    recipient_id = item.recipient.id if item.recipient else None
    timestamp = item.timestamp or entry_time or received_at or 0

    psid: str | None
    if kind == "echo":
        psid = recipient_id
    elif kind in ("app_roles", "policy_enforcement"):
        psid = None
    else:
        psid = sender_id
    if kind == "echo" and psid is None:
        raise ValueError("echo without recipient.id")
    if kind in ("message", "postback", "reaction", "message_edit", "delivery", "read") and psid is None:
        raise ValueError(f"{kind} without sender.id")

    key = f"{page_id}:{psid}" if psid else page_id
    if psid is None and kind == "optin" and item.optin is not None and item.optin.user_ref:
        key = f"{page_id}:uref:{item.optin.user_ref}"  # #15: a checkbox checkout's own key (no sender)
    mid: str | None = None
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

    if kind in ("message", "echo"):
        msg = item.message
        assert msg is not None  # noqa: S101 - guaranteed by _kind_of
        if not msg.mid:
            raise ValueError("message without mid")
        mid, text, app_id, metadata = msg.mid, msg.text, msg.app_id, msg.metadata
        quick_reply_payload = msg.quick_reply.payload if msg.quick_reply else None
        attachments = [attachment_ref(att, msg.sticker_id) for att in msg.attachments or []]
        sticker_id = msg.sticker_id or next((a.sticker_id for a in attachments if a.sticker_id), None)
        referral = referral_ref(msg.referral)
        if msg.reply_to and msg.reply_to.mid:
            data["reply_to_mid"] = msg.reply_to.mid
        prior = _prior_message(doc)
        if prior is not None:
            data["prior_message"] = prior  # #15: the reply to a checkbox checkout names its user_ref
        idem = f"msg:{page_id}:{mid}"
    elif kind == "delivery":
        assert item.delivery is not None  # noqa: S101
        watermark, mids = item.delivery.watermark, item.delivery.mids
        idem = f"delivery:{key}:{watermark}"
    elif kind == "read":
        assert item.read is not None  # noqa: S101
        watermark = item.read.watermark
        idem = f"read:{key}:{watermark}"
    elif kind == "postback":
        pb = item.postback
        assert pb is not None  # noqa: S101
        mid = pb.mid
        data = pb.model_dump(exclude_none=True)
        text = pb.title
        quick_reply_payload = pb.payload
        referral = referral_ref(doc["postback"].get("referral"))
        idem = f"postback:{page_id}:{mid}" if mid else f"postback:{key}:{timestamp}:{_digest(data)}"
    elif kind == "reaction":
        rc = item.reaction
        assert rc is not None  # noqa: S101
        data = rc.model_dump(exclude_none=True)
        idem = f"reaction:{page_id}:{rc.mid}:{sender_id}:{rc.action}:{timestamp}"
    elif kind == "message_edit":
        ed = item.message_edit
        assert ed is not None  # noqa: S101
        mid, text = ed.mid, ed.text
        data = {"num_edit": ed.num_edit}
        idem = f"edit:{page_id}:{ed.mid}:{ed.num_edit}"
    elif kind == "handover":
        for hk in HANDOVER_KEYS:
            part = getattr(item, hk)
            if part is not None:
                data = {"type": hk, **part.model_dump(exclude_none=True)}
                break
        idem = f"handover:{key}:{timestamp}:{_digest(data)}"
    elif kind == "optin":
        assert item.optin is not None  # noqa: S101
        data = item.optin.model_dump(exclude_none=True)
        if psid is None and item.optin.user_ref:
            data["user_ref"] = item.optin.user_ref
        idem = f"optin:{key}:{timestamp}:{_digest(data)}"
    elif kind == "policy_enforcement":
        pe = item.policy_enforcement or item.policy_enforcement_legacy
        assert pe is not None  # noqa: S101
        data = pe.model_dump(exclude_none=True)
        idem = f"policy:{key}:{timestamp}:{_digest(data)}"
    else:
        # referral, app_roles, account_linking, game_play, unknown: keep the item's own fields
        data = {k: v for k, v in doc.items() if k not in ("sender", "recipient", "timestamp")}
        if kind == "referral":
            referral = referral_ref(doc.get("referral"))
        idem = f"{kind}:{key}:{timestamp}:{_digest(data)}"

    return NormalizedEvent(
        kind=kind,
        page_id=page_id,
        psid=psid,
        mid=mid,
        timestamp=timestamp,
        standby=standby,
        conversation_key=key,
        idempotency_key=idem,
        sender_id=sender_id,
        recipient_id=recipient_id,
        received_at=received_at,
        text=text,
        attachments=attachments,
        quick_reply_payload=quick_reply_payload,
        sticker_id=sticker_id,
        referral=referral,
        app_id=app_id,
        metadata=metadata,
        watermark=watermark,
        mids=mids,
        data=data,
        source=Source(topic=source.topic, partition=source.partition, offset=source.offset, index=index),
    )


# The fast path ------------------------------------------------------------------------------------
# Each check below accepts a value only when the pydantic field it stands for would accept it as it
# is; anything else raises `_Unsure` and the item goes through `normalize_item`, which gives the
# result or the error. Values are JSON (orjson), so exact types are checked with `type(...) is`.

M = TypeVar("M", bound=BaseModel)

# every key of an item that `MessagingItem` validates (names and aliases): besides the parties and the
# timestamp, the fast path takes an item with exactly one of them (its kind)
_ITEM_MODEL_KEYS = frozenset(
    key for name, info in MessagingItem.model_fields.items() for key in (name, info.alias) if key is not None
)
_ITEM_KIND_KEYS = _ITEM_MODEL_KEYS - {"sender", "recipient", "timestamp"}
_POSTBACK_KEYS = frozenset(("mid", "title", "payload"))  # a postback with a referral or extras: the models


class _Unsure(Exception):
    """The fast path cannot vouch for this entry or item: the pydantic path decides it."""


def _trusted(cls: type[M], values: dict[str, Any]) -> M:
    """`cls.model_construct(**values)` for values that name every field, in order, each already of
    its field's type (models without extras, private attributes or post-init): the attributes it
    sets, without its per-field loop, which costs more than the validation it skips."""
    obj = cls.__new__(cls)
    object.__setattr__(obj, "__dict__", values)
    object.__setattr__(obj, "__pydantic_fields_set__", set(values))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


def _fast_id(value: Any) -> str | None:
    """An `Id | None` field."""
    if value is None:
        return None
    try:
        return as_id(value)
    except ValueError:
        raise _Unsure from None


def _fast_ms(value: Any) -> int:
    """An `EpochMs` field (absent or null is an error there too)."""
    try:
        return as_epoch_ms(value)
    except ValueError:
        raise _Unsure from None


def _fast_str(value: Any) -> str | None:
    """A `str | None` field."""
    if value is None or type(value) is str:
        return value
    raise _Unsure


def _fast_dict(value: Any) -> dict[str, Any]:
    """A nested model's JSON object (JSON keys are strings)."""
    if type(value) is not dict:
        raise _Unsure
    return value


def _fast_party(value: Any) -> str | None:
    """The id of a `Party | None` (`sender`, `recipient`)."""
    if value is None:
        return None
    party = _fast_dict(value)
    _fast_str(party.get("user_ref"))
    return _fast_id(party.get("id"))


def _fast_entry(doc: dict[str, Any]) -> tuple[str, int | None, list[Any], list[Any]]:
    """An `Entry`'s page id, time, messaging and standby items."""
    page_id = _fast_id(doc.get("id"))
    if page_id is None:
        raise _Unsure
    messaging, standby, changes = doc.get("messaging", []), doc.get("standby", []), doc.get("changes")
    if type(messaging) is not list or type(standby) is not list or not (changes is None or type(changes) is list):
        raise _Unsure
    time = doc.get("time")
    return page_id, None if time is None else _fast_ms(time), messaging, standby


def _fast_attachments(value: Any, message_sticker_id: str | None) -> list[AttachmentRef]:
    """`message.attachments` (`list[Attachment] | None`) as AttachmentRefs."""
    if value is None:
        return []
    if type(value) is not list:
        raise _Unsure
    refs = []
    for raw in value:
        att = _fast_dict(raw)
        kind, payload = att.get("type"), att.get("payload")
        if type(kind) is not str or not (payload is None or type(payload) is dict):
            raise _Unsure
        fields = _attachment_fields(kind, payload, _fast_str(att.get("title")), _fast_str(att.get("url")),
                                    message_sticker_id)
        refs.append(_trusted(AttachmentRef, fields))  # its Coordinates are validated (floats) already
    return refs


def _fast_event(
    page_id: str,
    entry_time: int | None,
    doc: dict[str, Any],
    *,
    standby: bool,
    index: str,
    source: Source,
    received_at: int | None,
) -> NormalizedEvent:
    """What `normalize_item` gives for a message, echo, delivery, read or plain postback item; raises
    `_Unsure` for anything else."""
    kind_key = None
    for key in doc:
        if key in _ITEM_KIND_KEYS:
            if kind_key is not None:
                raise _Unsure
            kind_key = key
    if kind_key not in ("message", "delivery", "read", "postback"):
        raise _Unsure
    part = _fast_dict(doc[kind_key])
    sender_id = _fast_party(doc.get("sender"))
    recipient_id = _fast_party(doc.get("recipient"))
    item_time = doc.get("timestamp")
    timestamp = (None if item_time is None else _fast_ms(item_time)) or entry_time or received_at or 0
    mid = text = quick_reply_payload = sticker_id = app_id = metadata = None
    attachments: list[AttachmentRef] = []
    referral: ReferralRef | None = None
    watermark: int | None = None
    mids: list[str] | None = None
    data: dict[str, Any] = {}

    kind: EventKind
    if kind_key == "message":
        is_echo = part.get("is_echo", False)
        if type(is_echo) is not bool:
            raise _Unsure
        kind = "echo" if is_echo else "message"
        psid = recipient_id if is_echo else sender_id
        mid = _fast_str(part.get("mid"))
        if psid is None or not mid:
            raise _Unsure
        text, metadata = _fast_str(part.get("text")), _fast_str(part.get("metadata"))
        app_id, message_sticker_id = _fast_id(part.get("app_id")), _fast_id(part.get("sticker_id"))
        quick_reply, reply_to = part.get("quick_reply"), part.get("reply_to")
        if quick_reply is not None:
            quick_reply_payload = _fast_str(_fast_dict(quick_reply).get("payload"))
        reply_to_mid = None if reply_to is None else _fast_str(_fast_dict(reply_to).get("mid"))
        attachments = _fast_attachments(part.get("attachments"), message_sticker_id)
        sticker_id = message_sticker_id or next((a.sticker_id for a in attachments if a.sticker_id), None)
        referral = referral_ref(part.get("referral"))
        if reply_to_mid:
            data["reply_to_mid"] = reply_to_mid
        prior = _prior_message(doc)
        if prior is not None:
            data["prior_message"] = prior
        key = f"{page_id}:{psid}"
        idem = f"msg:{page_id}:{mid}"
    else:
        kind = kind_key  # type: ignore[assignment] # delivery, read or postback, checked above
        psid = sender_id
        if psid is None:
            raise _Unsure
        key = f"{page_id}:{psid}"
        if kind_key == "postback":
            if not part.keys() <= _POSTBACK_KEYS:
                raise _Unsure
            mid, text = _fast_str(part.get("mid")), _fast_str(part.get("title"))
            quick_reply_payload = _fast_str(part.get("payload"))
            data = {k: part[k] for k in ("mid", "title", "payload") if part.get(k) is not None}
            idem = f"postback:{page_id}:{mid}" if mid else f"postback:{key}:{timestamp}:{_digest(data)}"
        else:
            watermark = _fast_ms(part.get("watermark"))
            if kind_key == "delivery":
                raw_mids = part.get("mids")
                if raw_mids is not None:
                    if type(raw_mids) is not list or any(type(m) is not str for m in raw_mids):
                        raise _Unsure
                    mids = list(raw_mids)
            idem = f"{kind_key}:{key}:{watermark}"

    return _trusted(NormalizedEvent, {
        "kind": kind,
        "page_id": page_id,
        "psid": psid,
        "mid": mid,
        "timestamp": timestamp,
        "standby": standby,
        "conversation_key": key,
        "idempotency_key": idem,
        "sender_id": sender_id,
        "recipient_id": recipient_id,
        "received_at": received_at,
        "text": text,
        "attachments": attachments,
        "quick_reply_payload": quick_reply_payload,
        "sticker_id": sticker_id,
        "referral": referral,
        "app_id": app_id,
        "metadata": metadata,
        "watermark": watermark,
        "mids": mids,
        "data": data,
        "source": _trusted(Source, {"topic": source.topic, "partition": source.partition,
                                    "offset": source.offset, "index": index}),
    })


def split_body(
    raw: bytes,
    *,
    max_bytes: int = 1_048_576,
    source: Source | None = None,
    received_at: int | None = None,
    fast: bool = True,
) -> SplitResult:
    """Every entry and every `messaging`/`standby` item of one body, normalized or rejected.
    `fast=False` takes every entry and item through the pydantic models (the reference)."""
    source = source or Source()
    result = SplitResult()
    try:
        entries = parse_body(raw, max_bytes, fast=fast)
    except BodyError as exc:
        result.rejected.append(Rejected(exc.reason, str(exc)))
        return result
    for e_idx, entry_doc in enumerate(entries):
        where = f"entry[{e_idx}]"
        try:
            if not fast:
                raise _Unsure
            page_id, entry_time, messaging, standby_items = _fast_entry(entry_doc)
        except _Unsure:
            try:
                entry = Entry.model_validate(entry_doc)
            except ValidationError as exc:
                result.items += 1
                result.rejected.append(Rejected("invalid_item", short_error(exc), where))
                continue
            page_id, entry_time, messaging, standby_items = entry.id, entry.time, entry.messaging, entry.standby
        for channel, standby, items in (("messaging", False, messaging), ("standby", True, standby_items)):
            for i_idx, doc in enumerate(items):
                result.items += 1
                index = f"{where}.{channel}[{i_idx}]"
                if not isinstance(doc, dict):
                    result.rejected.append(Rejected("invalid_item", "item must be a JSON object", index))
                    continue
                if fast:
                    try:
                        result.events.append(_fast_event(page_id, entry_time, doc, standby=standby, index=index,
                                                         source=source, received_at=received_at))
                        continue
                    except _Unsure:
                        pass
                try:
                    result.events.append(
                        normalize_item(page_id, entry_time, doc, standby=standby, index=index, source=source,
                                       received_at=received_at)
                    )
                except ValidationError as exc:
                    result.rejected.append(Rejected("invalid_item", short_error(exc), index))
                except ValueError as exc:
                    result.rejected.append(Rejected("invalid_item", str(exc), index))
    return result


def conversation_key_of(raw: bytes, max_bytes: int = 1_048_576) -> str | None:
    """The conversation key (`<page_id>:<psid>`) of a body whose events all belong to one
    conversation, else None (several conversations, none, or not a valid body).

    The webhook keys its raw records with it, so the body lands on its conversation's partition and
    the conversation stage decides it in place (one hop, docs/architecture.md); an upstream ingester
    may do the same. Bad items do not count: they become dead letters whatever the key."""
    keys = {ev.conversation_key for ev in split_body(raw, max_bytes=max_bytes).events}
    return keys.pop() if len(keys) == 1 else None

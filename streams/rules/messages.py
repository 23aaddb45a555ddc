"""Rich agent messages: check an action's `text`, `attachment`, `quick_replies` and `template`
against Meta's Send API limits, and build the Send API `message` bodies. Pure, no I/O.

Everything is checked before anything is sent. A violation names the field and the problem
(`quick_replies[3].title: 24 characters, at most 20`); nothing is ever cut or dropped silently.
Lengths are UTF-16 code units, as Meta counts them (`streams.rules.sendapi.units`).

One action may become several Messenger bubbles: Meta's `message` carries either `text` or one
`attachment` (a template is an attachment), so `text` beside an `attachment`/`template` is sent
as two messages, the text first; `quick_replies` ride on the last one (they show under the last
bubble). `Part.shown` is what the console's `agent_message` event carries for that bubble: the
same structure as the action (Meta's field names), so a console renders it without translation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from schemas.messages import (
    ASPECT_RATIOS,
    ATTACHMENT_ID_MAX,
    ATTACHMENT_TYPES,
    BUTTON_TEMPLATE_TEXT_MAX,
    BUTTON_TITLE_MAX,
    BUTTON_TYPES,
    BUTTONS_MAX,
    GENERIC_ELEMENTS_MAX,
    GENERIC_SUBTITLE_MAX,
    GENERIC_TITLE_MAX,
    MEDIA_BUTTONS_MAX,
    MEDIA_ELEMENTS_MAX,
    MEDIA_TYPES,
    PAYLOAD_MAX,
    QUICK_REPLIES_MAX,
    QUICK_REPLY_TITLE_MAX,
    QUICK_REPLY_TYPES,
    TEXT_MAX,
    URL_MAX,
    WEBVIEW_RATIOS,
)
from streams.rules.sendapi import units

RICH_FIELDS = ("attachment", "quick_replies", "template")
PHONE = re.compile(r"\+[1-9][0-9]{4,14}")
DETAIL_MAX = 5  # violations spelled out in one rejection detail


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule: the field's path, the problem, and the rejection reason it maps to."""

    field: str
    problem: str
    reason: str = "invalid_message"

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


@dataclass(frozen=True, slots=True)
class Part:
    """One Messenger bubble: the Send API `message` body (without `metadata`, which the rules add)
    and what the console shows for it."""

    message: dict[str, Any]
    shown: dict[str, Any]


@dataclass(slots=True)
class Checked:
    """The outcome of `check_message`: the bubbles to send, or the violations (then nothing is sent)."""

    parts: list[Part] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def reason(self) -> str:
        """The rejection reason: `text_too_long` when that is the only problem, else `invalid_message`."""
        reasons = {v.reason for v in self.violations}
        return reasons.pop() if len(reasons) == 1 else "invalid_message"

    def detail(self) -> str:
        """The violations as one line (the first few, then how many more)."""
        shown = "; ".join(str(v) for v in self.violations[:DETAIL_MAX])
        more = len(self.violations) - DETAIL_MAX
        return shown + (f" (+{more} more)" if more > 0 else "")


def is_rich(action: Mapping[str, Any]) -> bool:
    """Does the action carry anything besides text?"""
    return any(action.get(name) is not None for name in RICH_FIELDS)


# --- field checks ----------------------------------------------------------------------------------


class _Checker:
    def __init__(self) -> None:
        self.violations: list[Violation] = []

    def fail(self, where: str, problem: str, reason: str = "invalid_message") -> None:
        self.violations.append(Violation(where, problem, reason))

    def obj(self, value: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any] | None:
        if not isinstance(value, Mapping):
            self.fail(where, f"must be an object, not {_kind(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.fail(f"{where}.{key}", f"unknown field (allowed: {', '.join(allowed)})")
        return value

    def items(self, value: Any, where: str, what: str, most: int) -> list[Any] | None:
        if not isinstance(value, list):
            self.fail(where, f"must be a list, not {_kind(value)}")
            return None
        if not value:
            self.fail(where, f"must hold at least one ({what}: 1 to {most})")
            return None
        if len(value) > most:
            self.fail(where, f"{len(value)} {what}, at most {most}")
        return value

    def text(self, obj: Mapping[str, Any], key: str, where: str, most: int, *, required: bool = True,
             empty_ok: bool = False, reason: str = "invalid_message") -> str | None:
        value = obj.get(key)
        path = f"{where}.{key}" if where else key
        if value is None:
            if required:
                self.fail(path, "required")
            return None
        if not isinstance(value, str):
            self.fail(path, f"must be a string, not {_kind(value)}")
            return None
        if not empty_ok and not value.strip():
            self.fail(path, "must not be empty")
            return None
        n = units(value)
        if n > most:
            self.fail(path, f"{n} characters, at most {most}", reason)
        return value

    def url(self, obj: Mapping[str, Any], key: str, where: str, *, required: bool = True,
            facebook_only: bool = False) -> str | None:
        value = self.text(obj, key, where, URL_MAX, required=required)
        if value is None:
            return None
        path = f"{where}.{key}"
        try:
            parts = urlsplit(value)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(path, "must be an http(s) URL")
            return None
        if facebook_only and not (parts.hostname == "facebook.com" or parts.hostname.endswith(".facebook.com")):
            self.fail(path, "the media template takes only Facebook URLs (else upload it and use attachment_id)")
        return value

    def choice(self, obj: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...], *,
               required: bool = True, default: str | None = None) -> str | None:
        value = obj.get(key, default)
        path = f"{where}.{key}" if where else key
        if value is None:
            if required:
                self.fail(path, f"required (one of {', '.join(allowed)})")
            return None
        if value not in allowed:
            self.fail(path, f"{_show(value)} is not one of {', '.join(allowed)}")
            return None
        return str(value)

    def flag(self, obj: Mapping[str, Any], key: str, where: str) -> None:
        value = obj.get(key)
        if value is not None and not isinstance(value, bool):
            self.fail(f"{where}.{key}", f"must be true or false, not {_kind(value)}")

    def attachment_id(self, obj: Mapping[str, Any], where: str) -> str | None:
        value = obj.get("attachment_id")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is None:
            return None
        if not isinstance(value, str) or not value.isdigit() or len(value) > ATTACHMENT_ID_MAX:
            self.fail(f"{where}.attachment_id", "must be a numeric id from an earlier reusable send")
            return None
        return value

    # --- buttons -------------------------------------------------------------------------------
    def buttons(self, value: Any, where: str, most: int) -> list[dict[str, Any]]:
        items = self.items(value, where, "buttons", most)
        out: list[dict[str, Any]] = []
        for i, raw in enumerate(items or []):
            b = self.button(raw, f"{where}[{i}]")
            if b is not None:
                out.append(b)
        return out

    def button(self, value: Any, where: str) -> dict[str, Any] | None:
        if not isinstance(value, Mapping):
            self.fail(where, f"must be an object, not {_kind(value)}")
            return None
        kind = self.choice(value, "type", where, BUTTON_TYPES)
        if kind is None:
            return None
        allowed = {"web_url": ("type", "title", "url", "webview_height_ratio"),
                   "postback": ("type", "title", "payload"),
                   "phone_number": ("type", "title", "payload")}[kind]
        self.obj(value, where, allowed)
        title = self.text(value, "title", where, BUTTON_TITLE_MAX)
        out: dict[str, Any] = {"type": kind, "title": title}
        if kind == "web_url":
            out["url"] = self.url(value, "url", where)
            ratio = self.choice(value, "webview_height_ratio", where, WEBVIEW_RATIOS, required=False)
            if ratio is not None:
                out["webview_height_ratio"] = ratio
        elif kind == "postback":
            out["payload"] = self.text(value, "payload", where, PAYLOAD_MAX)
        else:
            number = value.get("payload")
            if not isinstance(number, str) or not PHONE.fullmatch(number):
                self.fail(f"{where}.payload", "must be a phone number: '+', the country code and the number, "
                          "digits only (e.g. +15105551234)")
            out["payload"] = number
        return out

    # --- message parts -------------------------------------------------------------------------
    def attachment(self, value: Any) -> dict[str, Any] | None:
        where = "attachment"
        a = self.obj(value, where, ("type", "url", "attachment_id", "is_reusable"))
        if a is None:
            return None
        kind = self.choice(a, "type", where, ATTACHMENT_TYPES)
        self.flag(a, "is_reusable", where)
        att_id = self.attachment_id(a, where)
        url = self.url(a, "url", where, required=a.get("attachment_id") is None)
        if url is not None and att_id is not None:
            self.fail(where, "give url or attachment_id, not both")
        if att_id is not None and a.get("is_reusable") is not None:
            self.fail(f"{where}.is_reusable", "only with url (an attachment_id is reusable already)")
        shown: dict[str, Any] = {"type": kind}
        payload: dict[str, Any] = {}
        if att_id is not None:
            shown["attachment_id"] = payload["attachment_id"] = att_id
        else:
            shown["url"] = payload["url"] = url
            if a.get("is_reusable") is not None:
                shown["is_reusable"] = payload["is_reusable"] = a["is_reusable"]
        return {"shown": shown, "send": {"type": kind, "payload": payload}}

    def quick_replies(self, value: Any) -> list[dict[str, Any]]:
        where = "quick_replies"
        items = self.items(value, where, "replies", QUICK_REPLIES_MAX)
        out: list[dict[str, Any]] = []
        for i, raw in enumerate(items or []):
            at = f"{where}[{i}]"
            qr = self.obj(raw, at, ("content_type", "title", "payload", "image_url"))
            if qr is None:
                continue
            kind = self.choice(qr, "content_type", at, QUICK_REPLY_TYPES, default="text")
            if kind is None:
                continue
            if kind != "text":
                for extra in ("title", "payload", "image_url"):
                    if qr.get(extra) is not None:
                        self.fail(f"{at}.{extra}", f"not allowed with content_type {kind}")
                out.append({"content_type": kind})
                continue
            image = self.url(qr, "image_url", at, required=False)
            title = self.text(qr, "title", at, QUICK_REPLY_TITLE_MAX, empty_ok=image is not None)
            payload = self.text(qr, "payload", at, PAYLOAD_MAX)
            reply: dict[str, Any] = {"content_type": "text", "title": title, "payload": payload}
            if image is not None:
                reply["image_url"] = image
            out.append(reply)
        return out

    def template(self, value: Any) -> dict[str, Any] | None:
        where = "template"
        if not isinstance(value, Mapping):
            self.fail(where, f"must be an object, not {_kind(value)}")
            return None
        kind = self.choice(value, "template_type", where, ("button", "generic", "media"))
        if kind == "button":
            self.obj(value, where, ("template_type", "text", "buttons"))
            text = self.text(value, "text", where, BUTTON_TEMPLATE_TEXT_MAX)
            buttons = self.buttons(value.get("buttons"), f"{where}.buttons", BUTTONS_MAX)
            return {"template_type": "button", "text": text, "buttons": buttons}
        if kind == "generic":
            self.obj(value, where, ("template_type", "image_aspect_ratio", "elements"))
            out: dict[str, Any] = {"template_type": "generic"}
            ratio = self.choice(value, "image_aspect_ratio", where, ASPECT_RATIOS, required=False)
            if ratio is not None:
                out["image_aspect_ratio"] = ratio
            items = self.items(value.get("elements"), f"{where}.elements", "elements", GENERIC_ELEMENTS_MAX)
            out["elements"] = [self.card(raw, f"{where}.elements[{i}]") for i, raw in enumerate(items or [])]
            return out
        if kind == "media":
            self.obj(value, where, ("template_type", "elements"))
            items = self.items(value.get("elements"), f"{where}.elements", "elements", MEDIA_ELEMENTS_MAX)
            return {"template_type": "media",
                    "elements": [self.media(raw, f"{where}.elements[{i}]") for i, raw in enumerate(items or [])]}
        return None

    def card(self, value: Any, where: str) -> dict[str, Any]:
        e = self.obj(value, where, ("title", "subtitle", "image_url", "default_action", "buttons"))
        if e is None:
            return {}
        out: dict[str, Any] = {"title": self.text(e, "title", where, GENERIC_TITLE_MAX)}
        subtitle = self.text(e, "subtitle", where, GENERIC_SUBTITLE_MAX, required=False)
        if subtitle is not None:
            out["subtitle"] = subtitle
        image = self.url(e, "image_url", where, required=False)
        if image is not None:
            out["image_url"] = image
        if e.get("default_action") is not None:
            at = f"{where}.default_action"
            da = self.obj(e["default_action"], at, ("type", "url", "webview_height_ratio"))
            if da is not None:
                self.choice(da, "type", at, ("web_url",))
                action: dict[str, Any] = {"type": "web_url", "url": self.url(da, "url", at)}
                ratio = self.choice(da, "webview_height_ratio", at, WEBVIEW_RATIOS, required=False)
                if ratio is not None:
                    action["webview_height_ratio"] = ratio
                out["default_action"] = action
        if e.get("buttons") is not None:
            out["buttons"] = self.buttons(e["buttons"], f"{where}.buttons", BUTTONS_MAX)
        if not any(k in out for k in ("subtitle", "image_url", "default_action", "buttons")):
            self.fail(where, "needs a subtitle, image_url, default_action or buttons besides the title")
        return out

    def media(self, value: Any, where: str) -> dict[str, Any]:
        e = self.obj(value, where, ("media_type", "url", "attachment_id", "buttons"))
        if e is None:
            return {}
        out: dict[str, Any] = {"media_type": self.choice(e, "media_type", where, MEDIA_TYPES)}
        att_id = self.attachment_id(e, where)
        url = self.url(e, "url", where, required=e.get("attachment_id") is None, facebook_only=True)
        if url is not None and att_id is not None:
            self.fail(where, "give url or attachment_id, not both")
        if att_id is not None:
            out["attachment_id"] = att_id
        else:
            out["url"] = url
        if e.get("buttons") is not None:
            out["buttons"] = self.buttons(e["buttons"], f"{where}.buttons", MEDIA_BUTTONS_MAX)
        return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- the check ---------------------------------------------------------------------------------------


def check_message(action: Mapping[str, Any], *, text_limit: int = TEXT_MAX) -> Checked:
    """Check a `message` / `open` action's content and build its Messenger bubbles.

    `text_limit` is the agent text policy (`limits.agent_text`, at most Meta's 2000): text over it
    is reason `text_too_long`; every other problem is `invalid_message`. Returns `Checked` with
    `parts` when nothing is wrong, else with every violation found (and no parts)."""
    c = _Checker()
    text_limit = min(text_limit, TEXT_MAX)
    text = c.text(action, "text", "", text_limit, required=False, reason="text_too_long")
    attachment = c.attachment(action["attachment"]) if action.get("attachment") is not None else None
    template = c.template(action["template"]) if action.get("template") is not None else None
    replies = c.quick_replies(action["quick_replies"]) if action.get("quick_replies") is not None else None
    if action.get("attachment") is not None and action.get("template") is not None:
        c.fail("template", "a message carries one attachment or one template, not both")
    if action.get("text") is None and action.get("attachment") is None and action.get("template") is None:
        c.fail("text", "a message needs text, an attachment or a template"
               + (" (quick replies go with one of them)" if action.get("quick_replies") is not None else ""))
    if c.violations:
        return Checked(violations=c.violations)

    parts: list[Part] = []
    if text is not None:
        parts.append(Part({"text": text}, {"text": text}))
    if attachment is not None:
        parts.append(Part({"attachment": attachment["send"]}, {"attachment": attachment["shown"]}))
    elif template is not None:
        parts.append(Part({"attachment": {"type": "template", "payload": template}}, {"template": template}))
    if replies is not None:
        last = parts[-1]
        last.message["quick_replies"] = replies
        last.shown["quick_replies"] = replies
    return Checked(parts=parts)

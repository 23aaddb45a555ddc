"""Rich agent messages (#17): the shapes a `message` / `open` action may carry besides `text`, and
Meta's Send API limits for them.

The names are Meta's own (`template_type`, `web_url`, `is_reusable`…), so a console author can read
Meta's reference beside this file. These models document the wire shape and give the JSON Schema
(`agent.actions.schema.json`); the authoritative check is `streams.rules.messages.check_message`,
which reports every violation with the field's path (`quick_replies[3].title: 24 characters, at
most 20`) instead of cutting anything. Lengths are counted as Meta counts them (UTF-16 code units).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# --- Meta's limits (Send API, quick replies, buttons, templates) ----------------------------------
TEXT_MAX = 2000  # Send API text (the agent limit, `limits.agent_text`, is at most this)
QUICK_REPLIES_MAX = 13  # "define up to 13 quick reply buttons"
QUICK_REPLY_TITLE_MAX = 20  # "20 character limit"
PAYLOAD_MAX = 1000  # quick-reply and postback payloads
BUTTON_TITLE_MAX = 20  # every button's title
BUTTONS_MAX = 3  # button template, each generic element
BUTTON_TEMPLATE_TEXT_MAX = 640  # "UTF-8-encoded text of up to 640 characters"
GENERIC_ELEMENTS_MAX = 10  # "Maximum of 10"
GENERIC_TITLE_MAX = 80
GENERIC_SUBTITLE_MAX = 80
MEDIA_ELEMENTS_MAX = 1  # "Maximum of 1 element"
MEDIA_BUTTONS_MAX = 1  # media template: "an optional button"
# --- our own bounds (Meta names none; a bound keeps every record small) ---------------------------
URL_MAX = 2048
ATTACHMENT_ID_MAX = 64

ATTACHMENT_TYPES = ("image", "video", "audio", "file")
QUICK_REPLY_TYPES = ("text", "user_phone_number", "user_email")
BUTTON_TYPES = ("web_url", "postback", "phone_number")
WEBVIEW_RATIOS = ("compact", "tall", "full")
MEDIA_TYPES = ("image", "video")
ASPECT_RATIOS = ("horizontal", "square")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MessageAttachment(_Strict):
    """A file by URL (or a reusable `attachment_id` from an earlier send with `is_reusable`)."""

    type: Literal["image", "video", "audio", "file"]
    url: str | None = Field(default=None, max_length=URL_MAX, description="http(s) URL; or attachment_id")
    attachment_id: str | None = Field(default=None, max_length=ATTACHMENT_ID_MAX)
    is_reusable: bool | None = Field(default=None, description="ask Meta for an attachment_id to send it again")


class QuickReplyOut(_Strict):
    """One quick reply. `text` replies need a `payload` and a `title` (an empty title needs an image)."""

    content_type: Literal["text", "user_phone_number", "user_email"] = "text"
    title: str | None = Field(default=None, max_length=QUICK_REPLY_TITLE_MAX)
    payload: str | None = Field(default=None, min_length=1, max_length=PAYLOAD_MAX)
    image_url: str | None = Field(default=None, max_length=URL_MAX)


class UrlButton(_Strict):
    type: Literal["web_url"]
    title: str = Field(min_length=1, max_length=BUTTON_TITLE_MAX)
    url: str = Field(max_length=URL_MAX)
    webview_height_ratio: Literal["compact", "tall", "full"] | None = None


class PostbackButton(_Strict):
    type: Literal["postback"]
    title: str = Field(min_length=1, max_length=BUTTON_TITLE_MAX)
    payload: str = Field(min_length=1, max_length=PAYLOAD_MAX)


class PhoneButton(_Strict):
    type: Literal["phone_number"]
    title: str = Field(min_length=1, max_length=BUTTON_TITLE_MAX)
    payload: str = Field(pattern=r"^\+[1-9][0-9]{4,14}$", description="the number: '+', country code, number")


Button = UrlButton | PostbackButton | PhoneButton


class DefaultAction(_Strict):
    type: Literal["web_url"]
    url: str = Field(max_length=URL_MAX)
    webview_height_ratio: Literal["compact", "tall", "full"] | None = None


class ButtonTemplate(_Strict):
    """Text with 1–3 buttons."""

    template_type: Literal["button"]
    text: str = Field(min_length=1, max_length=BUTTON_TEMPLATE_TEXT_MAX)
    buttons: list[Button] = Field(min_length=1, max_length=BUTTONS_MAX)


class GenericElement(_Strict):
    """One card: a title and at least one of subtitle, image_url, default_action, buttons."""

    title: str = Field(min_length=1, max_length=GENERIC_TITLE_MAX)
    subtitle: str | None = Field(default=None, max_length=GENERIC_SUBTITLE_MAX)
    image_url: str | None = Field(default=None, max_length=URL_MAX)
    default_action: DefaultAction | None = None
    buttons: list[Button] | None = Field(default=None, min_length=1, max_length=BUTTONS_MAX)


class GenericTemplate(_Strict):
    """A carousel of 1–10 cards."""

    template_type: Literal["generic"]
    image_aspect_ratio: Literal["horizontal", "square"] | None = None
    elements: list[GenericElement] = Field(min_length=1, max_length=GENERIC_ELEMENTS_MAX)


class MediaElement(_Strict):
    """An image or video on Facebook (a facebook.com URL) or uploaded before (`attachment_id`)."""

    media_type: Literal["image", "video"]
    url: str | None = Field(default=None, max_length=URL_MAX)
    attachment_id: str | None = Field(default=None, max_length=ATTACHMENT_ID_MAX)
    buttons: list[Button] | None = Field(default=None, min_length=1, max_length=MEDIA_BUTTONS_MAX)


class MediaTemplate(_Strict):
    template_type: Literal["media"]
    elements: list[MediaElement] = Field(min_length=1, max_length=MEDIA_ELEMENTS_MAX)


Template = ButtonTemplate | GenericTemplate | MediaTemplate


def inline_schema(model: Any) -> dict[str, Any]:
    """The JSON Schema of a model or type with every `$ref` replaced by its definition, so it can be
    embedded in another model's schema (no recursive models here)."""
    schema = TypeAdapter(model).json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    out: dict[str, Any] = resolve(schema)
    return out

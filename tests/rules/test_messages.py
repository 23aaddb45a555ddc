"""Unit tests of rich agent messages: every Meta limit at the limit and one past, every shape rule,
and the Send API bodies built from a valid action."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from schemas import messages as m
from streams.rules.messages import Checked, check_message, is_rich


def qr(title: str = "Billing", payload: str = "BILLING", **extra: Any) -> dict[str, Any]:
    return {"title": title, "payload": payload, **extra}


def postback(title: str = "Yes", payload: str = "YES") -> dict[str, Any]:
    return {"type": "postback", "title": title, "payload": payload}


def url_button(title: str = "Open", url: str = "https://example.com/order/1") -> dict[str, Any]:
    return {"type": "web_url", "title": title, "url": url}


def card(**extra: Any) -> dict[str, Any]:
    return {"title": "Blue shirt", "subtitle": "29.90 EUR", **extra}


def button_template(text: str = "What next?", buttons: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"template_type": "button", "text": text, "buttons": buttons if buttons is not None else [postback()]}


def generic(elements: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"template_type": "generic", "elements": elements, **extra}


def media(**element: Any) -> dict[str, Any]:
    return {"template_type": "media",
            "elements": [{"media_type": "image", "url": "https://www.facebook.com/acme/photos/1", **element}]}


def ok(action: dict[str, Any], **kw: Any) -> Checked:
    checked = check_message(action, **kw)
    assert checked.ok, checked.detail()
    return checked


def problems(action: dict[str, Any], **kw: Any) -> list[str]:
    checked = check_message(action, **kw)
    assert not checked.ok and not checked.parts
    return [str(v) for v in checked.violations]


# --- the example of the issue, and the detail line ------------------------------------------------

def test_the_issue_example_names_the_field_and_the_numbers() -> None:
    replies = [qr(), qr(), qr(), qr(title="x" * 24)]
    assert problems({"text": "Pick one", "quick_replies": replies}) == [
        "quick_replies[3].title: 24 characters, at most 20"
    ]


def test_every_violation_is_reported_and_the_detail_is_one_line() -> None:
    action = {"text": "Pick", "quick_replies": [qr(title="t" * 21, payload="p" * 1001) for _ in range(7)]}
    checked = check_message(action)
    assert len(checked.violations) == 14
    detail = checked.detail()
    assert "\n" not in detail and detail.endswith("(+9 more)")
    assert checked.reason == "invalid_message"


# --- text -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [640, 2000])
def test_text_at_the_agent_limit_and_one_past(limit: int) -> None:
    ok({"text": "a" * limit}, text_limit=limit)
    checked = check_message({"text": "a" * (limit + 1)}, text_limit=limit)
    assert [str(v) for v in checked.violations] == [f"text: {limit + 1} characters, at most {limit}"]
    assert checked.reason == "text_too_long"


def test_text_never_over_metas_2000_whatever_the_policy() -> None:
    assert problems({"text": "a" * 2001}, text_limit=5000) == ["text: 2001 characters, at most 2000"]


def test_text_length_counts_utf16_units_like_meta() -> None:
    ok({"text": "\U0001F600" * 320}, text_limit=640)  # 320 emoji = 640 units
    assert problems({"text": "\U0001F600" * 321}, text_limit=640) == ["text: 642 characters, at most 640"]


def test_text_too_long_beside_another_problem_is_invalid_message() -> None:
    checked = check_message({"text": "a" * 641, "quick_replies": []}, text_limit=640)
    assert checked.reason == "invalid_message"


@pytest.mark.parametrize("action,expected", [
    ({}, "text: a message needs text, an attachment or a template"),
    ({"quick_replies": [qr()]}, "text: a message needs text, an attachment or a template (quick replies go with one of them)"),
    ({"text": "   "}, "text: must not be empty"),
    ({"text": 5}, "text: must be a string, not a number"),
])
def test_a_message_needs_content(action: dict[str, Any], expected: str) -> None:
    assert expected in problems(action)


# --- quick replies ----------------------------------------------------------------------------------

def test_thirteen_quick_replies_and_fourteen() -> None:
    checked = ok({"text": "Pick", "quick_replies": [qr(payload=f"P{i}") for i in range(13)]})
    assert len(checked.parts[0].message["quick_replies"]) == 13
    assert problems({"text": "Pick", "quick_replies": [qr() for _ in range(14)]}) == [
        "quick_replies: 14 replies, at most 13"
    ]


def test_quick_reply_title_20_and_21() -> None:
    ok({"text": "Pick", "quick_replies": [qr(title="t" * 20)]})
    assert problems({"text": "Pick", "quick_replies": [qr(title="t" * 21)]}) == [
        "quick_replies[0].title: 21 characters, at most 20"
    ]


def test_quick_reply_payload_1000_and_1001() -> None:
    ok({"text": "Pick", "quick_replies": [qr(payload="p" * 1000)]})
    assert problems({"text": "Pick", "quick_replies": [qr(payload="p" * 1001)]}) == [
        "quick_replies[0].payload: 1001 characters, at most 1000"
    ]


def test_quick_reply_with_image_may_have_an_empty_title() -> None:
    checked = ok({"text": "Colour?", "quick_replies": [qr(title="", image_url="https://example.com/red.png")]})
    assert checked.parts[0].message["quick_replies"] == [
        {"content_type": "text", "title": "", "payload": "BILLING", "image_url": "https://example.com/red.png"}
    ]
    assert problems({"text": "Colour?", "quick_replies": [qr(title="")]}) == [
        "quick_replies[0].title: must not be empty"
    ]


@pytest.mark.parametrize("reply,expected", [
    ({"title": "A"}, "quick_replies[0].payload: required"),
    ({"payload": "A"}, "quick_replies[0].title: required"),
    ({"title": "A", "payload": ""}, "quick_replies[0].payload: must not be empty"),
    ({"title": "A", "payload": "A", "image_url": "ftp://x/y.png"}, "quick_replies[0].image_url: must be an http(s) URL"),
    ({"title": "A", "payload": "A", "colour": "red"},
     "quick_replies[0].colour: unknown field (allowed: content_type, title, payload, image_url)"),
    ({"content_type": "location"}, "quick_replies[0].content_type: 'location' is not one of text, user_phone_number, user_email"),
    ({"content_type": "user_email", "title": "Mail"}, "quick_replies[0].title: not allowed with content_type user_email"),
    ("Billing", "quick_replies[0]: must be an object, not a string"),
])
def test_quick_reply_shape(reply: Any, expected: str) -> None:
    assert expected in problems({"text": "Pick", "quick_replies": [reply]})


def test_quick_replies_must_be_a_non_empty_list() -> None:
    assert problems({"text": "Pick", "quick_replies": []}) == [
        "quick_replies: must hold at least one (replies: 1 to 13)"
    ]
    assert problems({"text": "Pick", "quick_replies": {"title": "A"}}) == [
        "quick_replies: must be a list, not an object"
    ]


def test_phone_and_email_quick_replies() -> None:
    checked = ok({"text": "How can we reach you?",
                  "quick_replies": [{"content_type": "user_phone_number"}, {"content_type": "user_email"}]})
    assert checked.parts[0].message["quick_replies"] == [
        {"content_type": "user_phone_number"}, {"content_type": "user_email"}
    ]


# --- attachments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["image", "video", "audio", "file"])
def test_attachment_by_url(kind: str) -> None:
    checked = ok({"attachment": {"type": kind, "url": "https://cdn.example.com/x", "is_reusable": True}})
    assert checked.parts[0].message == {
        "attachment": {"type": kind, "payload": {"url": "https://cdn.example.com/x", "is_reusable": True}}
    }
    assert checked.parts[0].shown == {"attachment": {"type": kind, "url": "https://cdn.example.com/x",
                                                     "is_reusable": True}}


def test_attachment_by_reusable_id() -> None:
    checked = ok({"attachment": {"type": "file", "attachment_id": "1857777774821032"}})
    assert checked.parts[0].message == {"attachment": {"type": "file", "payload": {"attachment_id": "1857777774821032"}}}


def test_attachment_id_64_digits_and_65() -> None:
    ok({"attachment": {"type": "video", "attachment_id": "1" * 64}})
    ok({"attachment": {"type": "video", "attachment_id": 1857777774821032}})  # a JSON number is fine too
    assert problems({"attachment": {"type": "video", "attachment_id": "1" * 65}}) == [
        "attachment.attachment_id: must be a numeric id from an earlier reusable send"
    ]


def test_quick_reply_image_url_2048_and_2049() -> None:
    base = "https://example.com/"
    ok({"text": "Pick", "quick_replies": [qr(image_url=base + "i" * (2048 - len(base)))]})
    assert problems({"text": "Pick", "quick_replies": [qr(image_url=base + "i" * (2049 - len(base)))]}) == [
        "quick_replies[0].image_url: 2049 characters, at most 2048"
    ]


def test_attachment_url_2048_and_2049() -> None:
    base = "https://example.com/"
    ok({"attachment": {"type": "image", "url": base + "a" * (2048 - len(base))}})
    assert problems({"attachment": {"type": "image", "url": base + "a" * (2049 - len(base))}}) == [
        "attachment.url: 2049 characters, at most 2048"
    ]


@pytest.mark.parametrize("attachment,expected", [
    ({"type": "gif", "url": "https://x.io/a"}, "attachment.type: 'gif' is not one of image, video, audio, file"),
    ({"url": "https://x.io/a"}, "attachment.type: required (one of image, video, audio, file)"),
    ({"type": "image"}, "attachment.url: required"),
    ({"type": "image", "url": "javascript:alert(1)"}, "attachment.url: must be an http(s) URL"),
    ({"type": "image", "url": "https://x.io/a", "is_reusable": "yes"}, "attachment.is_reusable: must be true or false, not a string"),
    ({"type": "image", "url": "https://x.io/a", "attachment_id": "123"}, "attachment: give url or attachment_id, not both"),
    ({"type": "image", "attachment_id": "abc"}, "attachment.attachment_id: must be a numeric id from an earlier reusable send"),
    ({"type": "image", "attachment_id": "123", "is_reusable": True}, "attachment.is_reusable: only with url (an attachment_id is reusable already)"),
    ({"type": "image", "url": "https://x.io/a", "caption": "hi"},
     "attachment.caption: unknown field (allowed: type, url, attachment_id, is_reusable)"),
    ("https://x.io/a", "attachment: must be an object, not a string"),
])
def test_attachment_shape(attachment: Any, expected: str) -> None:
    assert expected in problems({"attachment": attachment})


def test_attachment_and_template_together_are_refused() -> None:
    assert problems({"attachment": {"type": "image", "url": "https://x.io/a"}, "template": button_template()}) == [
        "template: a message carries one attachment or one template, not both"
    ]


# --- text beside an attachment: two bubbles, quick replies on the last ---------------------------------

def test_text_beside_an_attachment_is_two_bubbles_with_the_quick_replies_last() -> None:
    checked = ok({"text": "Here is your invoice", "attachment": {"type": "file", "url": "https://x.io/inv.pdf"},
                  "quick_replies": [qr("Thanks", "THANKS")]})
    assert [p.message for p in checked.parts] == [
        {"text": "Here is your invoice"},
        {"attachment": {"type": "file", "payload": {"url": "https://x.io/inv.pdf"}},
         "quick_replies": [{"content_type": "text", "title": "Thanks", "payload": "THANKS"}]},
    ]
    assert checked.parts[1].shown == {
        "attachment": {"type": "file", "url": "https://x.io/inv.pdf"},
        "quick_replies": [{"content_type": "text", "title": "Thanks", "payload": "THANKS"}],
    }


def test_is_rich() -> None:
    assert not is_rich({"text": "hi"})
    assert is_rich({"text": "hi", "quick_replies": [qr()]})
    assert is_rich({"template": button_template()})


# --- buttons ---------------------------------------------------------------------------------------

def test_button_template_three_buttons_and_four() -> None:
    checked = ok({"template": button_template(buttons=[postback(), url_button(),
                                                       {"type": "phone_number", "title": "Call us",
                                                        "payload": "+15105551234"}])})
    assert checked.parts[0].message["attachment"]["type"] == "template"
    assert problems({"template": button_template(buttons=[postback()] * 4)}) == [
        "template.buttons: 4 buttons, at most 3"
    ]


def test_button_template_text_640_and_641() -> None:
    ok({"template": button_template(text="t" * 640)})
    assert problems({"template": button_template(text="t" * 641)}) == ["template.text: 641 characters, at most 640"]


def test_button_title_20_and_21_and_postback_payload_1000_and_1001() -> None:
    ok({"template": button_template(buttons=[postback(title="t" * 20, payload="p" * 1000)])})
    assert problems({"template": button_template(buttons=[postback(title="t" * 21, payload="p" * 1001)])}) == [
        "template.buttons[0].title: 21 characters, at most 20",
        "template.buttons[0].payload: 1001 characters, at most 1000",
    ]


@pytest.mark.parametrize("button,expected", [
    ({"type": "phone_number", "title": "Call", "payload": "5105551234"}, "template.buttons[0].payload: must be a phone number"),
    ({"type": "phone_number", "title": "Call", "payload": "+1 510 555"}, "template.buttons[0].payload: must be a phone number"),
    ({"type": "web_url", "title": "Go"}, "template.buttons[0].url: required"),
    ({"type": "web_url", "title": "Go", "url": "www.example.com"}, "template.buttons[0].url: must be an http(s) URL"),
    ({"type": "web_url", "title": "Go", "url": "https://x.io", "webview_height_ratio": "huge"},
     "template.buttons[0].webview_height_ratio: 'huge' is not one of compact, tall, full"),
    ({"type": "postback", "title": "Go"}, "template.buttons[0].payload: required"),
    ({"type": "postback", "payload": "GO"}, "template.buttons[0].title: required"),
    ({"type": "account_link", "title": "Log in"}, "template.buttons[0].type: 'account_link' is not one of web_url, postback, phone_number"),
    ({"type": "postback", "title": "Go", "payload": "GO", "url": "https://x.io"},
     "template.buttons[0].url: unknown field (allowed: type, title, payload)"),
])
def test_button_shape(button: dict[str, Any], expected: str) -> None:
    found = problems({"template": button_template(buttons=[button])})
    assert any(p.startswith(expected) for p in found), found


def test_phone_button_at_15_digits_and_16() -> None:
    ok({"template": button_template(buttons=[{"type": "phone_number", "title": "Call", "payload": "+1" + "2" * 14}])})
    assert problems({"template": button_template(
        buttons=[{"type": "phone_number", "title": "Call", "payload": "+1" + "2" * 15}])})


def test_button_template_needs_buttons_and_text() -> None:
    assert problems({"template": {"template_type": "button", "text": "Hi", "buttons": []}}) == [
        "template.buttons: must hold at least one (buttons: 1 to 3)"
    ]
    assert problems({"template": {"template_type": "button", "buttons": [postback()]}}) == ["template.text: required"]


# --- generic template -------------------------------------------------------------------------------

def test_generic_ten_elements_and_eleven() -> None:
    checked = ok({"template": generic([card() for _ in range(10)], image_aspect_ratio="square")})
    payload = checked.parts[0].message["attachment"]["payload"]
    assert payload["template_type"] == "generic" and len(payload["elements"]) == 10
    assert payload["image_aspect_ratio"] == "square"
    assert problems({"template": generic([card() for _ in range(11)])}) == [
        "template.elements: 11 elements, at most 10"
    ]


def test_generic_title_and_subtitle_80_and_81() -> None:
    ok({"template": generic([card(title="t" * 80, subtitle="s" * 80)])})
    assert problems({"template": generic([card(title="t" * 81, subtitle="s" * 81)])}) == [
        "template.elements[0].title: 81 characters, at most 80",
        "template.elements[0].subtitle: 81 characters, at most 80",
    ]


def test_generic_element_buttons_three_and_four() -> None:
    ok({"template": generic([card(buttons=[postback(), url_button(), postback()])])})
    assert problems({"template": generic([card(), card(buttons=[postback()] * 4)])}) == [
        "template.elements[1].buttons: 4 buttons, at most 3"
    ]


def test_generic_element_needs_more_than_a_title() -> None:
    assert problems({"template": generic([{"title": "Only a title"}])}) == [
        "template.elements[0]: needs a subtitle, image_url, default_action or buttons besides the title"
    ]


def test_generic_default_action_has_no_title() -> None:
    checked = ok({"template": generic([{"title": "Shirt", "default_action": {"type": "web_url",
                                                                             "url": "https://x.io/p/1"}}])})
    element = checked.parts[0].message["attachment"]["payload"]["elements"][0]
    assert element["default_action"] == {"type": "web_url", "url": "https://x.io/p/1"}
    assert "template.elements[0].default_action.title: unknown field" in problems(
        {"template": generic([{"title": "Shirt", "default_action": {"type": "web_url", "url": "https://x.io",
                                                                   "title": "Open"}}])})[0]


def test_unknown_template_type() -> None:
    assert problems({"template": {"template_type": "receipt"}}) == [
        "template.template_type: 'receipt' is not one of button, generic, media"
    ]


# --- media template ---------------------------------------------------------------------------------

def test_media_by_facebook_url_or_attachment_id() -> None:
    checked = ok({"template": media(buttons=[url_button()])})
    element = checked.parts[0].message["attachment"]["payload"]["elements"][0]
    assert element["url"] == "https://www.facebook.com/acme/photos/1" and len(element["buttons"]) == 1
    ok({"template": {"template_type": "media", "elements": [{"media_type": "video", "attachment_id": "42"}]}})


def test_media_one_element_and_two_one_button_and_two() -> None:
    element = {"media_type": "image", "attachment_id": "42"}
    assert problems({"template": {"template_type": "media", "elements": [element, element]}}) == [
        "template.elements: 2 elements, at most 1"
    ]
    assert problems({"template": media(buttons=[url_button(), url_button()])}) == [
        "template.elements[0].buttons: 2 buttons, at most 1"
    ]


def test_media_takes_only_facebook_urls_and_no_audio() -> None:
    assert problems({"template": media(url="https://cdn.example.com/a.jpg")}) == [
        "template.elements[0].url: the media template takes only Facebook URLs (else upload it and use attachment_id)"
    ]
    assert problems({"template": media(url="https://evilfacebook.com/a.jpg")})
    assert problems({"template": media(media_type="audio")}) == [
        "template.elements[0].media_type: 'audio' is not one of image, video"
    ]


# --- the JSON Schema models agree with the checker ------------------------------------------------------

VALID: list[tuple[str, Any]] = [
    ("attachment", {"type": "image", "url": "https://x.io/a.png", "is_reusable": True}),
    ("attachment", {"type": "file", "attachment_id": "42"}),
    ("quick_replies", [qr(), qr(title="", image_url="https://x.io/i.png"), {"content_type": "user_email"}]),
    ("template", button_template(buttons=[postback(), url_button(),
                                          {"type": "phone_number", "title": "Call", "payload": "+15105551234"}])),
    ("template", generic([card(image_url="https://x.io/i.png", buttons=[postback()]),
                          {"title": "B", "default_action": {"type": "web_url", "url": "https://x.io"}}])),
    ("template", media(buttons=[url_button()])),
]


@pytest.mark.parametrize("name,value", VALID)
def test_what_the_checker_accepts_the_schema_models_accept(name: str, value: Any) -> None:
    action = {"text": "Here", name: value} if name == "quick_replies" else {name: value}
    ok(action)
    model: Any = {"attachment": m.MessageAttachment, "quick_replies": list[m.QuickReplyOut],
                  "template": m.Template}[name]
    TypeAdapter(model).validate_python(value)


# --- the README's examples are what the checker accepts ----------------------------------------------

def readme_examples() -> list[dict[str, Any]]:
    text = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Agent actions"):text.index("## Topics")]
    code = section[section.index("```jsonc") + len("```jsonc"):]
    code = code[:code.index("```")]
    lines = [line for line in code.splitlines() if not line.strip().startswith("//")]
    return [json.loads(chunk) for chunk in re.split(r"\n(?=\{)", "\n".join(lines).strip())]


def test_every_readme_example_is_accepted() -> None:
    examples = readme_examples()
    assert len(examples) == 8
    kinds = set()
    for action in examples:
        checked = check_message(action, text_limit=640)
        assert checked.ok, (action, checked.detail())
        kinds.update(k for k in ("text", "attachment", "quick_replies") if k in action)
        if "template" in action:
            kinds.add(action["template"]["template_type"])
    assert kinds == {"text", "attachment", "quick_replies", "button", "generic", "media"}

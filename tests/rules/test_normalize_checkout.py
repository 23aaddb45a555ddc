"""#15 in normalizing: a checkbox opt-in has a key of its own; a reply keeps its `prior_message`."""

from __future__ import annotations

from typing import Any

import orjson

from streams.rules.normalize import split_body


def one(item: dict[str, Any], channel: str = "messaging") -> Any:
    raw = orjson.dumps({"object": "page", "entry": [{"id": "p1", "time": 1, channel: [item]}]})
    result = split_body(raw)
    assert not result.rejected, result.rejected
    (ev,) = result.events
    return ev


def test_a_checkbox_opt_in_is_keyed_by_its_user_ref() -> None:
    ev = one({"recipient": {"id": "p1"}, "timestamp": 1, "optin": {"ref": "checkout", "user_ref": "cart-9"}})
    assert (ev.kind, ev.psid, ev.conversation_key) == ("optin", None, "p1:uref:cart-9")
    assert ev.data == {"ref": "checkout", "user_ref": "cart-9"}
    s2m = one({"sender": {"id": "u7"}, "recipient": {"id": "p1"}, "timestamp": 1, "optin": {"ref": "checkout"}})
    assert (s2m.psid, s2m.conversation_key) == ("u7", "p1:u7")  # Send to Messenger: the person's key


def test_a_reply_to_a_checkout_keeps_prior_message() -> None:
    reply = {"sender": {"id": "u7"}, "recipient": {"id": "p1"}, "timestamp": 1,
             "message": {"mid": "m1", "text": "hi"},
             "prior_message": {"source": "checkbox_plugin", "identifier": "cart-9"}}
    assert one(reply).data["prior_message"] == {"source": "checkbox_plugin", "identifier": "cart-9"}
    inside = {**reply, "message": {**reply["message"], "prior_message": reply["prior_message"]}}
    del inside["prior_message"]
    assert one(inside).data["prior_message"]["identifier"] == "cart-9"
    bad = {**reply, "prior_message": {"source": "checkbox_plugin", "identifier": 5}}
    assert "prior_message" not in one(bad).data

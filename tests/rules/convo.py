"""Helpers for the conversation rules' tests: feed one conversation key its inputs, read the outputs."""

from __future__ import annotations

from typing import Any

from streams.core.config import ConnectorConfig, parse_config
from streams.rules.conversation.api import Decision, Input
from streams.rules.conversation.decider import Decider
from tests.conftest import BASE_CONFIG

PAGE, PSID = "1691462197845448", "u1"
SUPPORT_PAGE = "298733926841562"
KEY = f"{PAGE}:{PSID}"
T0 = 1_700_000_000_000
SECOND = 1_000
MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000


def cfg(extra: str = "") -> ConnectorConfig:
    return parse_config(BASE_CONFIG + extra)


class Convo:
    """Feeds inputs to a Decider for one conversation key and keeps its state."""

    def __init__(self, config: ConnectorConfig | None = None, key: str = KEY, decider: Decider | None = None) -> None:
        self.d = decider or Decider(config or cfg())
        self.key = key
        self.page, _, self.psid = key.partition(":")
        self.state: dict[str, Any] | None = None
        self.n = 0

    def feed(self, inp: Input) -> Decision:
        out = self.d.decide(self.state, inp, self.key)
        if not out.duplicate:
            self.state = out.state
        return out

    def msg(self, text: str | None = "hello", at: int = T0, mid: str | None = None, **extra: Any) -> Decision:
        """A consumer message received at `at` (Meta's `timestamp` = `at` unless given)."""
        self.n += 1
        mid = mid or f"m{self.n}"
        ev = {"kind": "message", "page_id": self.page, "psid": self.psid, "mid": mid, "timestamp": at,
              "standby": False, "conversation_key": self.key, "idempotency_key": f"msg:{self.page}:{mid}",
              "received_at": at, "text": text, "attachments": [], "quick_reply_payload": None, "data": {}}
        ev.update(extra)
        return self.feed(Input("event", ev["idempotency_key"], ev["received_at"], ev))

    def event(self, kind: str, at: int = T0, **fields: Any) -> Decision:
        self.n += 1
        ev = {"kind": kind, "page_id": self.page, "psid": self.psid, "timestamp": at, "standby": False,
              "conversation_key": self.key, "idempotency_key": f"{kind}:{self.n}:{at}", "received_at": at,
              "data": {}, **fields}
        return self.feed(Input("event", ev["idempotency_key"], ev["received_at"], ev))

    def postback(self, payload: str, at: int = T0, title: str = "Button") -> Decision:
        return self.event("postback", at=at, quick_reply_payload=payload, text=title,
                          data={"title": title, "payload": payload})

    def act(self, type_: str, at: int = T0 + 1000, agent: str = "a1", **fields: Any) -> Decision:
        self.n += 1
        action = {"type": type_, "action_id": f"act{self.n}", "page_id": self.page, "psid": self.psid,
                  "agent_id": agent, **fields}
        return self.feed(Input("action", f"action:act{self.n}", at, action))

    def tick(self, at: int) -> Decision:
        return self.feed(Input("timer", f"timer:{at}", at, {}))

    def result(self, at: int = T0, **res: Any) -> Decision:
        self.n += 1
        return self.feed(Input("result", f"result:{self.n}", at, res))

    @property
    def conv(self) -> dict[str, Any]:
        assert self.state is not None and self.state["conv"] is not None
        return self.state["conv"]  # type: ignore[no-any-return]


def console(d: Decision) -> list[dict[str, Any]]:
    return [o.value for o in d.outputs if o.dest == "skill"]


def types(d: Decision) -> list[str]:
    return [v["type"] for v in console(d)]


def outbound(d: Decision) -> list[dict[str, Any]]:
    return [o.value for o in d.outputs if o.dest == "outbound"]


def triggers(d: Decision) -> list[str]:
    return [v["trigger"] for v in console(d) if v["type"] == "system_message"]


def texts(d: Decision) -> list[str]:
    return [v["text"] for v in console(d) if v["type"] == "system_message"]


def rejections(d: Decision) -> list[str]:
    return [v["reason"] for v in console(d) if v["type"] == "action_rejected"]


def of(d: Decision, dest: str) -> list[dict[str, Any]]:
    return [o.value for o in d.outputs if o.dest == dest]

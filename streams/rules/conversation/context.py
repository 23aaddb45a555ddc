"""The working context of one decision: the state being built, the outputs so far, stable ids.

`Ctx.st` is a shallow copy of the stored state: rules replace its parts with new values and never
change a stored part in place, so the stored state is untouched and the parts an input does not
touch are shared, not copied. Output ids derive from the conversation key and the input's stable
id (`inp.id`), so a re-run of the same input yields the same ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from streams.core.config import ConnectorConfig, Skill
from streams.rules.conversation import routing
from streams.rules.conversation.api import Env, Input, Output
from streams.rules.conversation.state import OUTBOX_MAX, OUTBOX_TEXT_BYTES, RECENT_MAX, OutboxEntry, State, short_hash

CURRENT: Any = object()  # "the open conversation's id" for `Ctx.console`


@dataclass(frozen=True, slots=True)
class Rules:
    """What the rules know besides state, input and env: the connector config and the dedupe knobs."""

    config: ConnectorConfig
    horizon_ms: int
    max_keys: int
    skills: frozenset[str]


def id_hash(text: str, n: int = 16) -> str:
    """A stable hex hash for derived ids."""
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:n]


class Ctx:
    """One decision in progress."""

    def __init__(self, rules: Rules, state: State, inp: Input, key: str, env: Env) -> None:
        self.rules = rules
        self.config = rules.config
        self.st = cast(State, dict(state))
        self.inp = inp
        self.now = inp.now
        self.key = key
        self.env = env
        page_id, _, psid = key.partition(":")
        self.page_id = page_id
        self.psid = psid or None
        self.outputs: list[Output] = []
        self.arms: list[int] = []
        self.notes: list[tuple[str, str]] = []
        self.figures: list[tuple[str, str, float]] = []
        self._base = id_hash(f"{key}|{inp.id}")
        self._n = 0

    # ids ---------------------------------------------------------------------------------------
    def next_id(self, tag: str) -> str:
        """The next output id of this input: `<tag>-<hash of key and input id>-<n>`."""
        self._n += 1
        return f"{tag}-{self._base}-{self._n}"

    @contextmanager
    def acting_as(self, input_id: str, at: int) -> Iterator[None]:
        """Decide a held input inside this one: its outputs take ids from its own input id and
        its own time, whichever input released it."""
        saved = (self._base, self._n, self.now)
        self._base, self._n, self.now = id_hash(f"{self.key}|{input_id}"), 0, at
        try:
            yield
        finally:
            self._base, self._n, self.now = saved

    # config ------------------------------------------------------------------------------------
    @property
    def skills(self) -> frozenset[str]:
        """The skills a conversation may go to now: the live ones (`Env.skills`), else the configured."""
        return self.env.skills if self.env.skills is not None else self.rules.skills

    def route(self) -> tuple[str, bool]:
        """(skill, page known?) for this conversation's page, per the routing mode."""
        return routing.route(self.env)

    def skill_cfg(self, skill: str | None = None) -> Skill:
        """The settings of `skill` (default: the open conversation's)."""
        if skill is None:
            conv = self.st["conv"]
            skill = conv["skill"] if conv else self.route()[0]
        return self.config.skill(skill)

    @property
    def page_label(self) -> str:
        """The page as a metric label: a connected page's id, else `other` (bounded)."""
        return self.page_id if self.env.page is not None else "other"

    @property
    def locale(self) -> str:
        """The open conversation's locale, else the page's."""
        conv = self.st["conv"]
        if conv:
            return conv["locale"]
        return self.env.page.locale if self.env.page else "en_US"

    # outputs -----------------------------------------------------------------------------------
    def note(self, name: str, label: str) -> None:
        self.notes.append((name, label))

    def figure(self, name: str, label: str, value: float) -> None:
        self.figures.append((name, label, value))

    def console(self, type_: str, skill: str | None = None, *, timestamp: int | None = None,
                conversation_id: str | None = CURRENT, **fields: Any) -> None:
        """A console event on the skill's topic (default: the open conversation's skill)."""
        conv = self.st["conv"]
        skill = skill or (conv["skill"] if conv else self.route()[0])
        if conversation_id is CURRENT:
            conversation_id = conv["id"] if conv else None
        value = {
            "type": type_,
            "event_id": self.next_id("ev"),
            "conversation_id": conversation_id,
            "page_id": self.page_id,
            "psid": self.psid,
            "skill": skill,
            "timestamp": timestamp if timestamp is not None else self.now,
            **fields,
        }
        self.outputs.append(Output("skill", self.key, value, skill))

    def reject(self, action: dict[str, Any], reason: str, detail: str) -> None:
        """`action_rejected` for an action that cannot be applied."""
        self.console("action_rejected", action_id=action.get("action_id"), action=action.get("type"),
                     reason=reason, detail=detail, agent_id=action.get("agent_id"))
        self.note("rejected", reason)

    def outbound(self, origin: str, request: dict[str, Any], agent_id: str | None, text: str | None,
                 agent_nickname: str | None = None) -> str:
        """A Send API request on `messenger.outbound`; messages are remembered in the outbox (the
        agent's text until its mid is known) and carry their outbox id as `metadata`."""
        conv = self.st["conv"]
        outbox_id = self.next_id("ob")
        if "message" in request:
            request["message"]["metadata"] = outbox_id
        value = {
            "page_id": self.page_id,
            "psid": self.psid,
            "outbox_id": outbox_id,
            "conversation_id": conv["id"] if conv else None,
            "origin": origin,
            "request": request,
            "skill": conv["skill"] if conv else None,
            "agent_id": agent_id,
            "created_at": self.now,
        }
        if agent_nickname:
            value["agent_nickname"] = agent_nickname  # #17: the dispatcher's agent persona
        self.outputs.append(Output("outbound", self.key, value))
        self.note("outbound", origin)
        if "message" in request:
            self.note("page_out", self.page_label)
            entry: OutboxEntry = {"origin": origin, "agent_id": agent_id, "text": text if origin == "agent" else None,
                                  "mid": None, "skill": conv["skill"] if conv else None,
                                  "conversation_id": conv["id"] if conv else None, "at": self.now}
            self.st["outbox"] = bounded_outbox({**self.st["outbox"], outbox_id: entry})
        return outbox_id


def remember(ctx: Ctx, ident: str) -> bool:
    """False when `ident` (an action id, a failed send result) was applied already; else remember
    it, hashed, among the last `RECENT_MAX`."""
    h = short_hash(ident)
    if h in ctx.st["recent"]:
        return False
    ctx.st["recent"] = [*ctx.st["recent"], h][-RECENT_MAX:]
    return True


def bounded_outbox(outbox: dict[str, OutboxEntry]) -> dict[str, OutboxEntry]:
    """At most `OUTBOX_MAX` entries (oldest go first) and `OUTBOX_TEXT_BYTES` of kept texts (the
    oldest texts go first; their entries stay, to recognise echoes and results)."""
    while len(outbox) > OUTBOX_MAX:
        outbox.pop(next(iter(outbox)))
    total = sum(len(e["text"].encode()) for e in outbox.values() if e["text"])
    if total > OUTBOX_TEXT_BYTES:
        for ob_id, e in list(outbox.items()):
            if total <= OUTBOX_TEXT_BYTES:
                break
            if e["text"]:
                total -= len(e["text"].encode())
                outbox[ob_id] = {**e, "text": None}
    return outbox

"""Conversation rules: per-conversation state, routing to skills, agent actions, timers.

The stage `streams.stages.conversation` feeds every input of a conversation key (normalized events,
agent actions, send results, timer ticks) to `Decider.decide(state, input) -> (state, outputs)`, a
pure function over plain dicts; the agent only reads the table, calls it, writes the outputs and
the new state. Events are deduplicated first (`streams.rules.dedupe`), against the idempotency
keys the conversation's state has seen within the horizon.

Redelivery: each conversation's state records the last offset applied per source topic, so a
record redelivered after a crash is skipped; outputs are sent before the state is written (and
the changelog record is flushed after them), so a crash re-runs rather than loses a decision.
Event ids are derived from the input's stable id, so a re-run yields the same ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from schemas.contract import AgentAction
from streams.core import automessages
from streams.core.config import ConnectorConfig
from streams.core.settings import Settings
from streams.rules import csat
from streams.rules.conversation.api import Decision, Env, Input, Output
from streams.rules.dedupe import dedupe

RECENT_KEYS = 64  # idempotency keys / action ids remembered per conversation (defence in depth)
OUTBOX_KEEP = 50  # our recent sends remembered per conversation, to recognise their echoes
BUCKET_MS = 1_000  # timer wheel resolution: one bucket of conversation keys per second
TIMER_PREFIX = "\x00timers:"
CURSOR_PREFIX = "\x00cursor:"

def _h(text: str, n: int = 16) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:n]


def new_state() -> dict[str, Any]:
    """The state of a conversation key never seen before."""
    return {
        "o": {},  # source topic → last applied offset
        "recent": [],  # recent action ids and send results
        "seen": {},  # idempotency key → first seen (epoch ms), within the dedupe horizon
        "conv": None,  # the open conversation, if any
        "n_convs": 0,  # conversations this person ever had here (first-time vs returning)
        "last_consumer_at": None,  # for Meta's messaging windows
        "wm": {},  # receipt watermarks: delivered / read
        "outbox": {},  # outbox_id → {origin, agent_id, text, mid, skill, conversation_id}
        "survey": None,  # pending CSAT survey
    }


CsatTotals = Callable[[str], tuple[int, int]]


def _no_totals(skill: str) -> tuple[int, int]:
    return (0, 0)


class _Ctx:
    """Working context of one decision: the state being changed and the outputs so far."""

    def __init__(self, decider: Decider, state: dict[str, Any], inp: Input, key: str, env: Env) -> None:
        self.d = decider
        self.state = state
        self.inp = inp
        self.key = key
        self.env = env
        page_id, _, psid = key.partition(":")
        self.page_id = page_id
        self.psid = psid or None
        self.out = Decision(state)
        self._n = 0

    # ids ------------------------------------------------------------------------------------
    def next_id(self, tag: str) -> str:
        self._n += 1
        return f"{tag}-{_h(self.inp.id)}-{self._n}"

    # outputs --------------------------------------------------------------------------------
    def console(self, type_: str, skill: str | None = None, *, timestamp: int | None = None, **fields: Any) -> None:
        conv = self.state["conv"]
        skill = skill or (conv["skill"] if conv else self.d.route(self.env)[0])
        value = {
            "type": type_,
            "event_id": self.next_id("ev"),
            "conversation_id": fields.pop("conversation_id", conv["id"] if conv else None),
            "page_id": self.page_id,
            "psid": self.psid,
            "skill": skill,
            "timestamp": timestamp if timestamp is not None else self.inp.now,
            **fields,
        }
        self.out.outputs.append(Output("skill", self.key, value, skill))

    def reject(self, action: dict[str, Any], reason: str, detail: str) -> None:
        self.console(
            "action_rejected",
            action_id=action.get("action_id"),
            action=action.get("type"),
            reason=reason,
            detail=detail,
            agent_id=action.get("agent_id"),
        )
        self.out.notes.append(("rejected", reason))

    def outbound(self, origin: str, request: dict[str, Any], agent_id: str | None, text: str | None) -> str:
        conv = self.state["conv"]
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
            "created_at": self.inp.now,
        }
        self.out.outputs.append(Output("outbound", self.key, value))
        self.out.notes.append(("outbound", origin))
        if "message" in request:
            outbox = self.state["outbox"]
            outbox[outbox_id] = {
                "origin": origin,
                "agent_id": agent_id,
                "text": text,
                "mid": None,
                "skill": value["skill"],
                "conversation_id": value["conversation_id"],
            }
            while len(outbox) > OUTBOX_KEEP:
                outbox.pop(next(iter(outbox)))
        return outbox_id

    # windows --------------------------------------------------------------------------------
    def window(self, inside: str) -> tuple[str, str | None] | None:
        """(messaging_type, tag) for a send now, or None when Meta's window is closed."""
        last = self.state["last_consumer_at"]
        if last is None:
            return None
        age = self.inp.now - last
        m = self.d.config.messaging
        if age <= m.response_window_seconds * 1000:
            return inside, None
        if self.d.config.account.human_agent_tag and age <= m.human_agent_window_seconds * 1000:
            return "MESSAGE_TAG", "HUMAN_AGENT"
        return None

    def in_response_window(self) -> bool:
        last = self.state["last_consumer_at"]
        return last is not None and self.inp.now - last <= self.d.config.messaging.response_window_seconds * 1000


class Decider:
    """The conversation stage's decisions, over plain-dict state (see `new_state`)."""

    def __init__(
        self,
        config: ConnectorConfig,
        csat_totals: CsatTotals = _no_totals,
        *,
        dedupe_horizon_ms: int = Settings.model_fields["dedupe_horizon_seconds"].default * 1000,
        dedupe_max_keys: int = Settings.model_fields["dedupe_max_keys"].default,
    ) -> None:
        self.config = config
        self.dedupe_horizon_ms = dedupe_horizon_ms
        self.dedupe_max_keys = dedupe_max_keys
        self.skills = set(config.all_skills())
        self.csat_totals = csat_totals
        self.default_texts = {"csat_thanks": config.csat.thank_you}

    # routing --------------------------------------------------------------------------------
    def route(self, env: Env) -> tuple[str, bool]:
        """(skill, page known?) for the conversation's page, per the routing mode."""
        page = env.page
        if env.routing.mode == "manual":
            return env.routing.default_skill, page is not None
        if page is not None and page.skill:
            return page.skill, True
        return env.routing.default_skill, page is not None

    def env_for(self, page_id: str) -> Env:
        """The Env of a page from the static config (tests and callers without a live page directory)."""
        return Env(self.config.page(page_id), self.config.routing, self.config.external_user)

    # entry point ----------------------------------------------------------------------------
    def decide(self, state: dict[str, Any] | None, inp: Input, key: str, env: Env | None = None) -> Decision:
        """Apply one input to one conversation key's state (`env` defaults to the static config's)."""
        if env is None:
            env = self.env_for(key.partition(":")[0])
        if state:
            # a deep copy, so a failed emit leaves the stored state untouched; the dedupe keys (the
            # bulk of a busy conversation's state, flat str → int) only need a shallow one
            seen = state.get("seen")
            work = orjson.loads(orjson.dumps({k: v for k, v in state.items() if k != "seen"}))
            work["seen"] = dict(seen) if seen else {}
        else:
            work = new_state()
        ctx = _Ctx(self, work, inp, key, env)
        if inp.source == "event":
            self._on_event(ctx, inp.data)
        elif inp.source == "action":
            self._on_action(ctx, inp.data)
        elif inp.source == "result":
            self._on_result(ctx, inp.data)
        else:
            self._on_timer(ctx, inp.data)
        return ctx.out

    def _remember(self, ctx: _Ctx, ident: str) -> bool:
        """False when `ident` was already applied (a duplicate); else remember it."""
        recent: list[str] = ctx.state["recent"]
        if ident in recent:
            return False
        recent.append(ident)
        del recent[:-RECENT_KEYS]
        return True

    # consumer-side events -------------------------------------------------------------------
    def _on_event(self, ctx: _Ctx, ev: dict[str, Any]) -> None:
        seen_at = self._consumer_time(ev, ctx)
        if dedupe(ctx.state["seen"], ev["idempotency_key"], seen_at, self.dedupe_horizon_ms, self.dedupe_max_keys):
            ctx.out.notes.append(("duplicate", ev["kind"]))
            ctx.out.duplicate = True
            return
        kind = ev["kind"]
        if ev.get("standby"):
            # another app owns the thread: shown as context, never answered automatically
            ctx.console("standby_event", timestamp=ev["timestamp"], kind=kind, mid=ev.get("mid"),
                        text=ev.get("text"), data=ev.get("data") or {})
            return
        if kind == "message":
            self._consumer_message(ctx, ev)
        elif kind == "postback":
            self._postback(ctx, ev)
        elif kind == "echo":
            self._echo(ctx, ev)
        elif kind in ("delivery", "read"):
            self._receipt(ctx, ev)
        elif kind == "reaction":
            d = ev.get("data") or {}
            ctx.console("reaction", timestamp=ev["timestamp"], mid=d.get("mid"), reaction=d.get("reaction"),
                        emoji=d.get("emoji"), action=d.get("action"))
        elif kind == "message_edit":
            ctx.console("message_edit", timestamp=ev["timestamp"], mid=ev.get("mid"), text=ev.get("text"),
                        num_edit=(ev.get("data") or {}).get("num_edit"))
        elif kind == "referral":
            d = ev.get("data", {}).get("referral", {})
            ctx.console("referral", timestamp=ev["timestamp"], ref=d.get("ref"), source=d.get("source"),
                        referral_type=d.get("type"), ad_id=d.get("ad_id"))
        else:
            ctx.console("context_event", timestamp=ev["timestamp"], kind=kind, data=ev.get("data") or {})

    def _consumer_time(self, ev: dict[str, Any], ctx: _Ctx) -> int:
        return int(ev.get("received_at") or ctx.inp.now)

    def _consumer_message(self, ctx: _Ctx, ev: dict[str, Any]) -> None:
        st = ctx.state
        text: str | None = ev.get("text")
        payload: str | None = ev.get("quick_reply_payload")
        survey = st["survey"]
        if survey is not None:
            if csat.survey_expired(survey["sent_at"], ctx.inp.now, self.config.csat.expire_after_seconds):
                st["survey"] = None
                ctx.out.notes.append(("csat", "expired"))
                survey = None
            else:
                score = csat.parse_answer(text, payload, survey["conversation_id"])
                if score is not None:
                    self._csat_answer(ctx, survey, score, ev)
                    return
                st["survey"] = None  # the consumer moved on: this text is a new message
        if payload and csat.parse_payload(payload) is not None:
            ctx.out.notes.append(("csat", "late_or_repeated"))
            return  # a tap on an old survey: never counted twice, never a new conversation
        now = self._consumer_time(ev, ctx)
        st["last_consumer_at"] = now
        if st["conv"] is None:
            self._open(ctx, opened_by="consumer", agent_id=None, timestamp=ev["timestamp"])
        conv = st["conv"]
        limit = self.config.limits.consumer_text
        truncated = text is not None and len(text) > limit
        ctx.console(
            "consumer_message",
            timestamp=ev["timestamp"],
            mid=ev.get("mid"),
            text=text[:limit] if truncated and text is not None else text,
            attachments=[{"type": a.get("type"), "url": a.get("url")} for a in ev.get("attachments") or []],
            quick_reply_payload=payload,
            truncated=truncated,
            reply_to_mid=(ev.get("data") or {}).get("reply_to_mid"),
        )
        conv["counts"]["consumer"] += 1
        conv["last_consumer_at"] = now
        self._arm_idle(ctx)
        self._maybe_consumer_close(ctx, payload)

    def _maybe_consumer_close(self, ctx: _Ctx, payload: str | None) -> None:
        if payload and payload in self.config.messaging.close_payloads and ctx.state["conv"] is not None:
            self._close(ctx, closed_by="consumer", reason="consumer", agent_id=None)

    def _postback(self, ctx: _Ctx, ev: dict[str, Any]) -> None:
        st = ctx.state
        st["last_consumer_at"] = self._consumer_time(ev, ctx)
        if st["conv"] is None:
            self._open(ctx, opened_by="consumer", agent_id=None, timestamp=ev["timestamp"])
        d = ev.get("data") or {}
        ctx.console("postback", timestamp=ev["timestamp"], mid=ev.get("mid"), title=d.get("title"),
                    payload=d.get("payload"), referral=d.get("referral"))
        st["conv"]["counts"]["consumer"] += 1
        st["conv"]["last_consumer_at"] = st["last_consumer_at"]
        self._arm_idle(ctx)
        self._maybe_consumer_close(ctx, d.get("payload"))

    def _echo(self, ctx: _Ctx, ev: dict[str, Any]) -> None:
        st = ctx.state
        outbox: dict[str, Any] = st["outbox"]
        meta = ev.get("metadata")
        ours = ev.get("app_id") == self.config.account.app_id or (meta is not None and meta in outbox)
        if ours:
            if meta in outbox:
                self._learn_mid(ctx, meta, ev.get("mid"), via="echo")
            return
        ext = ctx.env.external_user
        ctx.console(
            "external_message",
            timestamp=ev["timestamp"],
            mid=ev.get("mid"),
            text=ev.get("text"),
            attachments=[{"type": a.get("type"), "url": a.get("url")} for a in ev.get("attachments") or []],
            author={"agent_id": ext.agent_id, "nickname": ext.nickname},
            app_id=ev.get("app_id"),
        )
        if st["conv"] is not None:
            st["conv"]["counts"]["external"] += 1

    def _learn_mid(self, ctx: _Ctx, outbox_id: str, mid: str | None, via: str) -> None:
        entry = ctx.state["outbox"].get(outbox_id)
        if entry is None or not mid or entry["mid"]:
            return
        entry["mid"] = mid
        if entry["origin"] == "agent":
            ctx.console("agent_message", entry["skill"], conversation_id=entry["conversation_id"],
                        agent_id=entry["agent_id"], text=entry["text"], outbox_id=outbox_id, mid=mid, via=via)

    def _receipt(self, ctx: _Ctx, ev: dict[str, Any]) -> None:
        status = "delivered" if ev["kind"] == "delivery" else "read"
        wm = int(ev.get("watermark") or 0)
        if wm <= ctx.state["wm"].get(status, 0):
            return  # older than one already seen: out-of-order receipts are safe
        ctx.state["wm"][status] = wm
        ctx.console("status", timestamp=ev["timestamp"], status=status, watermark=wm, mids=ev.get("mids"))

    # conversation lifecycle -----------------------------------------------------------------
    def _open(self, ctx: _Ctx, *, opened_by: str, agent_id: str | None, timestamp: int) -> None:
        st = ctx.state
        skill, known = self.route(ctx.env)
        if not known:
            ctx.out.notes.append(("unknown_page", ctx.page_id))
        returning = st["n_convs"] > 0
        st["n_convs"] += 1
        st["conv"] = {
            "id": f"c-{_h(ctx.key + '|' + ctx.inp.id, 20)}",
            "skill": skill,
            "skills": [skill],
            "agent_id": agent_id,
            "agents": [agent_id] if agent_id else [],
            "agent_nickname": None,
            "opened_at": ctx.inp.now,
            "opened_by": opened_by,
            "locale": ctx.env.page.locale if ctx.env.page else "en_US",
            "counts": {"consumer": 0, "agent": 0, "external": 0, "system": 0},
            "last_consumer_at": st["last_consumer_at"],
            "timers": {},
        }
        ctx.out.notes.append(("opened", skill))
        ctx.console("conversation_opened", timestamp=timestamp, locale=st["conv"]["locale"],
                    opened_by=opened_by, returning=returning)
        if opened_by == "consumer":
            self._system(ctx, "welcome_returning" if returning else "welcome_first")
            self._arm_waiting(ctx)

    def _close(self, ctx: _Ctx, *, closed_by: Literal["agent", "consumer", "system"], reason: str,
               agent_id: str | None) -> None:
        st = ctx.state
        conv = st["conv"]
        trigger = {"agent": "closed_by_agent", "system": "closed_idle"}.get(closed_by)
        if trigger:
            self._system(ctx, trigger)
        ctx.console("conversation_closed", closed_by=closed_by, reason=reason, agent_id=agent_id)
        summary = {
            "conversation_id": conv["id"],
            "conversation_key": ctx.key,
            "page_id": ctx.page_id,
            "psid": ctx.psid,
            "skill": conv["skill"],
            "skills": conv["skills"],
            "agents": conv["agents"],
            "opened_at": conv["opened_at"],
            "closed_at": ctx.inp.now,
            "closed_by": closed_by,
            "close_reason": reason,
            "consumer_messages": conv["counts"]["consumer"],
            "agent_messages": conv["counts"]["agent"],
            "external_messages": conv["counts"]["external"],
            "system_messages": conv["counts"]["system"],
            "csat_score": None,
        }
        ctx.out.outputs.append(Output("history", conv["id"], summary))
        ctx.out.notes.append(("closed", conv["skill"]))
        if csat.should_survey(self.config, closed_by, conv["skill"]) and ctx.in_response_window():
            self._send_survey(ctx, summary)
        st["conv"] = None

    # system messages ------------------------------------------------------------------------
    def _system(self, ctx: _Ctx, trigger: str, *, skill: str | None = None, locale: str | None = None) -> None:
        """An automatic message: to the consumer (inside Meta's window) and to the console."""
        conv = ctx.state["conv"]
        skill = skill or (conv["skill"] if conv else self.route(ctx.env)[0])
        locale = locale or (conv["locale"] if conv else (ctx.env.page.locale if ctx.env.page else "en_US"))
        template = automessages.resolve_template(
            self.config.auto_messages,
            trigger,
            locale=locale,
            page_id=ctx.page_id,
            skill=skill,
            default=self.default_texts.get(trigger),
        )
        if template is None:
            return
        page = ctx.env.page
        text = automessages.render(
            template,
            {
                "agent_nickname": (conv or {}).get("agent_nickname") or (conv or {}).get("agent_id") or "",
                "agent_id": (conv or {}).get("agent_id") or "",
                "skill": skill,
                "page_name": (page.name if page else None) or "",
                "page_id": ctx.page_id,
                "locale": locale,
            },
        )
        sent = ctx.in_response_window()
        outbox_id = None
        if sent:
            outbox_id = ctx.outbound(
                "system",
                {"recipient": {"id": ctx.psid}, "messaging_type": "RESPONSE", "message": {"text": text}},
                None,
                text,
            )
        ctx.console("system_message", skill, trigger=trigger, text=text, locale=locale, sent=sent, outbox_id=outbox_id)
        if conv:
            conv["counts"]["system"] += 1

    # timers ---------------------------------------------------------------------------------
    def _arm(self, ctx: _Ctx, name: str, due: int) -> None:
        """Set a timer. The wheel gets an entry only when none fires earlier: a timer pushed later
        (idle, on every consumer message) is re-armed when its old, earlier entry comes due."""
        conv = ctx.state["conv"]
        conv["timers"][name] = due
        wheel: dict[str, int] = conv.setdefault("wheel", {})
        if name not in wheel or wheel[name] > due:
            wheel[name] = due
            ctx.out.arms.append(due)

    def _arm_idle(self, ctx: _Ctx) -> None:
        conv = ctx.state["conv"]
        after = self.config.skill(conv["skill"]).auto_close_after_seconds
        if after:
            self._arm(ctx, "idle", conv["last_consumer_at"] + after * 1000)

    def _arm_waiting(self, ctx: _Ctx) -> None:
        conv = ctx.state["conv"]
        after = self.config.skill(conv["skill"]).waiting_for_agent_after_seconds
        if after and conv["agent_id"] is None:
            self._arm(ctx, "waiting", ctx.inp.now + after * 1000)
        else:
            conv["timers"].pop("waiting", None)

    def _on_timer(self, ctx: _Ctx, data: dict[str, Any]) -> None:
        """A wheel entry of this conversation came due: fire what is due, re-arm what moved later."""
        conv = ctx.state["conv"]
        if conv is None:
            return
        now = ctx.inp.now
        wheel: dict[str, int] = conv.setdefault("wheel", {})
        for name in [n for n, due in wheel.items() if due <= now]:
            del wheel[name]
        timers: dict[str, int] = conv["timers"]
        if "idle" in timers:
            after = self.config.skill(conv["skill"]).auto_close_after_seconds
            if timers["idle"] <= now and after and conv["last_consumer_at"] + after * 1000 <= now:
                timers.pop("idle")
                ctx.out.notes.append(("timer", "idle"))
                self._close(ctx, closed_by="system", reason="idle", agent_id=None)
                return
            if "idle" not in wheel:
                self._arm_idle(ctx)
        if "waiting" in timers:
            if timers["waiting"] <= now:
                timers.pop("waiting")
                if conv["agent_id"] is None:
                    ctx.out.notes.append(("timer", "waiting"))
                    self._system(ctx, "waiting_for_agent")
            elif "waiting" not in wheel:
                self._arm(ctx, "waiting", timers["waiting"])

    # agent actions --------------------------------------------------------------------------
    def _on_action(self, ctx: _Ctx, raw: dict[str, Any]) -> None:
        try:
            action = AgentAction.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            ctx.reject(raw, "invalid_action", f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}")
            return
        if f"{action.page_id}:{action.psid}" != ctx.key:
            ctx.reject(raw, "invalid_action", "record key must be '<page_id>:<psid>' of the action")
            return
        if not self._remember(ctx, "action:" + action.action_id):
            ctx.out.notes.append(("duplicate", "action"))
            return
        handler = getattr(self, f"_act_{action.type}")
        handler(ctx, action, raw)

    def _require_open(self, ctx: _Ctx, raw: dict[str, Any]) -> dict[str, Any] | None:
        conv: dict[str, Any] | None = ctx.state["conv"]
        if conv is None:
            ctx.reject(raw, "unknown_conversation", "no open conversation for this page and person")
        return conv

    def _take(self, ctx: _Ctx, action: AgentAction) -> None:
        conv = ctx.state["conv"]
        conv["agent_id"] = action.agent_id
        nickname = getattr(action, "agent_nickname", None)
        conv["agent_nickname"] = nickname if isinstance(nickname, str) else None
        if action.agent_id not in conv["agents"]:
            conv["agents"].append(action.agent_id)
        conv["timers"].pop("waiting", None)
        ctx.console("conversation_accepted", agent_id=action.agent_id)
        self._system(ctx, "accepted")

    def _auto_accept(self, ctx: _Ctx, action: AgentAction) -> None:
        conv = ctx.state["conv"]
        if conv["agent_id"] is None and self.config.skill(conv["skill"]).auto_accept:
            self._take(ctx, action)

    def _act_accept(self, ctx: _Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
        conv = self._require_open(ctx, raw)
        if conv is None:
            return
        if conv["agent_id"] == action.agent_id:
            return  # already theirs
        self._take(ctx, action)

    def _act_message(self, ctx: _Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
        conv = self._require_open(ctx, raw)
        if conv is None:
            return
        checked = self._sendable(ctx, action, raw, "RESPONSE")
        if checked is None:
            return
        text, window = checked
        self._auto_accept(ctx, action)
        self._agent_send(ctx, action, text, window)

    def _sendable(
        self, ctx: _Ctx, action: AgentAction, raw: dict[str, Any], inside: str
    ) -> tuple[str, tuple[str, str | None]] | None:
        """(text, (messaging_type, tag)) when the agent's text may be sent now; else reject it."""
        text = action.text
        if not text or not text.strip():
            ctx.reject(raw, "invalid_action", f"{action.type} needs a non-empty text")
            return None
        limit = self.config.limits.agent_text
        if len(text) > limit:
            ctx.reject(raw, "text_too_long", f"{len(text)} characters, over the limit of {limit}")
            return None
        window = ctx.window(inside)
        if window is None:
            ctx.reject(raw, "window_closed", "outside Meta's messaging window for this person")
            return None
        return text, window

    def _agent_send(self, ctx: _Ctx, action: AgentAction, text: str, window: tuple[str, str | None]) -> None:
        conv = ctx.state["conv"]
        messaging_type, tag = window
        request: dict[str, Any] = {"recipient": {"id": ctx.psid}, "messaging_type": messaging_type}
        if tag:
            request["tag"] = tag
        request["message"] = {"text": text}
        outbox_id = ctx.outbound("agent", request, action.agent_id, text)
        ctx.console("agent_message", agent_id=action.agent_id, text=text, outbox_id=outbox_id, mid=None,
                    messaging_type=messaging_type, tag=tag)
        conv["counts"]["agent"] += 1

    def _act_typing(self, ctx: _Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
        if ctx.state["conv"] is None or not ctx.in_response_window():
            ctx.out.notes.append(("dropped", "typing"))
            return  # typing for a closed conversation is dropped
        self._auto_accept(ctx, action)
        sender_action = "typing_on" if action.on is not False else "typing_off"
        ctx.outbound("agent", {"recipient": {"id": ctx.psid}, "sender_action": sender_action}, action.agent_id, None)

    def _act_read(self, ctx: _Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
        if ctx.state["conv"] is None or not ctx.in_response_window():
            ctx.out.notes.append(("dropped", "read"))
            return
        ctx.outbound("agent", {"recipient": {"id": ctx.psid}, "sender_action": "mark_seen"}, action.agent_id, None)

    def _act_transfer(self, ctx: _Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
        conv = self._require_open(ctx, raw)
        if conv is None:
            return
        to = action.to_skill
        if not to or to not in self.skills:
            ctx.reject(raw, "invalid_action", f"to_skill {to!r} is not a configured skill")
            return
        src = conv["skill"]
        if to == src:
            ctx.reject(raw, "invalid_action", f"the conversation is already in skill {to!r}")
            return
        for skill in (src, to):
            ctx.console("conversation_transferred", skill, from_skill=src, to_skill=to, agent_id=action.agent_id)
        ctx.out.notes.append(("transferred", f"{src}>{to}"))
        conv["skill"] = to
        conv["skills"].append(to)
        conv["agent_id"] = None
        conv["agent_nickname"] = None
        self._system(ctx, "transferred")
        self._arm_waiting(ctx)

    def _act_close(self, ctx: _Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
        conv = self._require_open(ctx, raw)
        if conv is None:
            return
        reason = getattr(action, "reason", None)
        reason = reason if isinstance(reason, str) else "agent"
        self._close(ctx, closed_by="agent", reason=reason, agent_id=action.agent_id)

    def _act_open(self, ctx: _Ctx, action: AgentAction, raw: dict[str, Any]) -> None:
        if ctx.state["conv"] is not None:
            ctx.reject(raw, "invalid_action", "a conversation is already open with this person")
            return
        checked = self._sendable(ctx, action, raw, "UPDATE")
        if checked is None:
            return
        text, window = checked
        self._open(ctx, opened_by="agent", agent_id=None, timestamp=ctx.inp.now)
        self._take(ctx, action)
        self._agent_send(ctx, action, text, window)
        self._arm_idle(ctx)

    # send results ---------------------------------------------------------------------------
    def _on_result(self, ctx: _Ctx, res: dict[str, Any]) -> None:
        outbox_id = res.get("outbox_id", "")
        if not self._remember(ctx, f"result:{outbox_id}:{res.get('status')}"):
            return
        entry = ctx.state["outbox"].get(outbox_id)
        if res.get("status") == "sent":
            self._learn_mid(ctx, outbox_id, res.get("mid"), via="send_result")
            return
        skill = (entry or {}).get("skill")
        ctx.console(
            "send_failed",
            skill,
            conversation_id=(entry or {}).get("conversation_id") or res.get("conversation_id"),
            outbox_id=outbox_id,
            origin=res.get("origin"),
            code=res.get("code"),
            subcode=res.get("subcode"),
            message=res.get("message"),
            retryable=bool(res.get("retryable")),
        )

    # CSAT -----------------------------------------------------------------------------------
    def _send_survey(self, ctx: _Ctx, summary: dict[str, Any]) -> None:
        conv = ctx.state["conv"]
        question = csat.choose_question(self.config, ctx.page_id, conv["locale"])
        message = csat.survey_message(conv["id"], question)
        ctx.outbound("csat", {"recipient": {"id": ctx.psid}, "messaging_type": "RESPONSE", "message": message},
                     None, question)
        ctx.console("csat_requested", question=question, locale=conv["locale"])
        agent_id = summary["agents"][-1] if summary["agents"] else None
        ctx.state["survey"] = {
            "conversation_id": conv["id"],
            "sent_at": ctx.inp.now,
            "skill": conv["skill"],
            "agent_id": agent_id,
            "locale": conv["locale"],
            "summary": summary,
        }
        ctx.out.outputs.append(Output("csat_facts", ctx.key, self._fact(ctx, ctx.state["survey"], None)))
        ctx.out.notes.append(("csat_survey", conv["skill"]))

    def _fact(self, ctx: _Ctx, survey: dict[str, Any], score: int | None) -> dict[str, Any]:
        """The CSAT fact for the aggregates: `survey_sent` without a score, `answer` with one."""
        return csat.fact(
            conversation_id=survey["conversation_id"],
            page_id=ctx.page_id,
            psid=ctx.psid or "",
            skill=survey["skill"],
            agent_id=survey["agent_id"],
            locale=survey["locale"],
            timestamp=ctx.inp.now,
            score=score,
        ).model_dump()

    def _csat_answer(self, ctx: _Ctx, survey: dict[str, Any], score: int, ev: dict[str, Any]) -> None:
        st = ctx.state
        st["survey"] = None
        st["last_consumer_at"] = self._consumer_time(ev, ctx)
        skill = survey["skill"]
        response = {
            "conversation_id": survey["conversation_id"],
            "page_id": ctx.page_id,
            "psid": ctx.psid,
            "skill": skill,
            "agent_id": survey["agent_id"],
            "score": score,
            "locale": survey["locale"],
            "timestamp": ctx.inp.now,
        }
        ctx.out.outputs.append(Output("csat_responses", survey["conversation_id"], response))
        ctx.out.outputs.append(Output("csat_facts", ctx.key, self._fact(ctx, survey, score)))
        summary = dict(survey["summary"], csat_score=score)
        ctx.out.outputs.append(Output("history", survey["conversation_id"], summary))
        positive, answers = self.csat_totals(skill)
        positive += 1 if score >= 4 else 0
        answers += 1
        self._system(ctx, "csat_thanks", skill=skill, locale=survey["locale"])
        ctx.console(
            "csat_received",
            skill,
            conversation_id=survey["conversation_id"],
            score=score,
            agent_id=survey["agent_id"],
            csat_percent=round(100.0 * positive / answers, 1),
            mid=ev.get("mid"),
        )
        ctx.out.notes.append(("csat_answer", f"{skill}:{score}"))

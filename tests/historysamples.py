"""Console events, summaries and CSAT answers as the processor writes them, for the history tests.

`conversation_records(...)` yields (topic, key, value) for whole conversations: opened, consumer
and agent messages (the reply, then its mid update with the same outbox id), receipts, a transfer
(on both skills' topics), system and external messages, an event type the store does not know, the
close, the summary, the CSAT survey and answer, and the scored summary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

WORDS = ["invoice", "delivery", "password", "account", "order", "shipping", "charge", "upgrade", "coupon"]
PAGE_EN = "1691462197845448"
PAGE_ES = "298733926841562"


@dataclass(frozen=True)
class Rec:
    kind: str  # skill:<id> | history | csat
    key: str
    value: dict[str, Any]


def conversation_records(
    n: int, *, seed: int = 1, start_ms: int = 1_767_225_600_000, skills: tuple[str, ...] = ("billing", "support"),
    refund_every: int = 5, chatter: int = 0,
) -> list[Rec]:
    """Records of `n` conversations, in the order the processor would write them per topic; `chatter`
    more consumer and agent message pairs per conversation (for message-heavy benchmarks)."""
    rnd = random.Random(seed)
    out: list[Rec] = []
    for i in range(n):
        spanish = i % 4 == 3
        page = PAGE_ES if spanish else PAGE_EN
        psid = f"psid{seed}x{i:05d}"
        key = f"{page}:{psid}"
        cid = f"c-{seed}-{i:05d}"
        skill = skills[i % len(skills)]
        t = start_ms + i * 3_600_000 // 3 + rnd.randrange(0, 1000)
        agent = f"agent{rnd.randrange(1, 6)}"
        ev_n = 0

        def ev(type_: str, at: int, sk: str | None = None, *, _c: tuple[str, str, str, str, str] = (
                cid, page, psid, skill, key), **fields: Any) -> Rec:
            nonlocal ev_n
            ev_n += 1
            c_id, c_page, c_psid, c_skill, c_key = _c
            value = {"type": type_, "event_id": f"ev-{c_id}-{ev_n}", "conversation_id": c_id, "page_id": c_page,
                     "psid": c_psid, "skill": sk or c_skill, "timestamp": at, **fields}
            return Rec(f"skill:{sk or c_skill}", c_key, value)

        word = "reembolsos" if spanish else "refunds"
        text = (f"Hola, quiero {word} de mi pedido {i}" if spanish
                else f"Hello, I need {word} for order {i}" if i % refund_every == 0
                else f"Question about my {rnd.choice(WORDS)} number {i}")
        out.append(ev("conversation_opened", t, locale="es_ES" if spanish else "en_US", opened_by="consumer",
                      returning=False))
        out.append(ev("consumer_message", t, mid=f"m.{cid}.1", text=text,
                      attachments=[{"type": "image", "url": f"https://cdn.example/{i}.jpg?oe=1&access_token=SECRET"}],
                      quick_reply_payload=None, truncated=False, reply_to_mid=None))
        out.append(ev("system_message", t, trigger="welcome_first", text="Thanks for writing!", locale="en_US",
                      sent=True, outbox_id=f"ob-{cid}-w"))
        out.append(ev("conversation_accepted", t + 20_000, agent_id=agent))
        out.append(ev("agent_message", t + 30_000, agent_id=agent, text=f"Happy to help with {i}",
                      outbox_id=f"ob-{cid}-a1", mid=None, messaging_type="RESPONSE", tag=None))
        out.append(ev("agent_message", t + 30_500, agent_id=agent, text=f"Happy to help with {i}",
                      outbox_id=f"ob-{cid}-a1", mid=f"m.{cid}.2", via="echo", messaging_type="RESPONSE", tag=None))
        for k in range(chatter):
            at = t + 32_000 + k * 200
            out.append(ev("consumer_message", at, mid=f"m.{cid}.c{k}", text=" ".join(rnd.choices(WORDS, k=8)),
                          attachments=[], quick_reply_payload=None, truncated=False, reply_to_mid=None))
            out.append(ev("agent_message", at + 100, agent_id=agent, text=" ".join(rnd.choices(WORDS, k=12)),
                          outbox_id=f"ob-{cid}-c{k}", mid=f"m.{cid}.a{k}", messaging_type="RESPONSE", tag=None))
        out.append(ev("status", t + 31_000, status="delivered", watermark=t + 30_900, mids=None))
        out.append(ev("status", t + 40_000, status="read", watermark=t + 39_000, mids=None))
        final = skill
        if i % 3 == 1:
            other = next(s for s in skills if s != skill)
            out.append(ev("conversation_transferred", t + 50_000, skill, from_skill=skill, to_skill=other,
                          agent_id=agent))
            out.append(ev("conversation_transferred", t + 50_000, other, from_skill=skill, to_skill=other,
                          agent_id=agent))
            final = other
            out.append(ev("agent_message", t + 60_000, final, agent_id="agent9", text="Billing here, hi",
                          outbox_id=f"ob-{cid}-a2", mid=f"m.{cid}.3", messaging_type="RESPONSE", tag=None))
        out.append(ev("external_message", t + 70_000, final, mid=f"m.{cid}.4", text="Page inbox note",
                      attachments=[], author={"agent_id": "connector", "nickname": "FB External User"}, app_id=None))
        out.append(ev("handover_context", t + 71_000, final, from_app="263902037430900",
                      metadata={"note": "bot said hi", "page_access_token": "EAAB-SECRET"}))
        closed_at = t + 90_000 + rnd.randrange(0, 60_000)
        by = "agent" if i % 2 == 0 else "system"
        reason = "agent" if by == "agent" else "idle"
        out.append(ev("conversation_closed", closed_at, final, closed_by=by, reason=reason, agent_id=agent))
        agents = sorted({agent, "agent9"} if i % 3 == 1 else {agent})
        summary = {
            "conversation_id": cid, "conversation_key": key, "page_id": page, "psid": psid, "skill": final,
            "skills": sorted({skill, final}), "agents": agents, "opened_at": t, "closed_at": closed_at,
            "closed_by": by, "close_reason": reason, "consumer_messages": 1, "agent_messages": len(agents),
            "external_messages": 1, "system_messages": 1, "csat_score": None,
            "first_agent_response_ms": 30_000, "queue_ms": 20_000, "handle_ms": closed_at - t, "abandoned": False,
        }
        out.append(Rec("history", cid, summary))
        if by == "agent":
            score = 1 + (i * 7) % 5
            out.append(ev("csat_requested", closed_at, final, question="How did we do?", locale="en_US"))
            answered = closed_at + 5_000
            out.append(Rec("csat", cid, {"conversation_id": cid, "page_id": page, "psid": psid, "skill": final,
                                          "agent_id": agents[-1], "score": score, "locale": "en_US",
                                          "timestamp": answered}))
            out.append(ev("csat_received", answered, final, score=score, agent_id=agents[-1], csat_percent=50.0,
                          mid=f"m.{cid}.5"))
            out.append(Rec("history", cid, {**summary, "csat_score": score}))
    return out


def by_topic(records: list[Rec]) -> dict[str, list[Rec]]:
    topics: dict[str, list[Rec]] = {}
    for rec in records:
        topics.setdefault(rec.kind, []).append(rec)
    return topics

"""The figures of one scenario run, from what we sent (traffic, fuzz) and what came out (observer,
fake Graph API, `GET /csat`), and the goals they are held to.

- consumer messages lost: a consumer message we sent (its body acknowledged by Kafka) that never
  appeared as a `consumer_message` with that `mid` on a skill topic. Repeats with the same
  `event_id` are at-least-once duplicates (allowed, counted); one `mid` under two `event_id`s is
  a message shown twice as two different events (counted as `shown_twice`).
- CSAT double-counted / missing: per skill and score, what `GET /csat` on each live worker reports
  against the answers given (bodies acknowledged by Kafka).
- outbox ids sent more than once: the fake Graph API's `duplicates()` — the same part of an outbox id
  (`message.metadata`) delivered (answered 200) more than once, whether or not the dispatcher lived
  to read the answer.
- dead letters by reason, and the accounting of every fuzzed body (see chaos/fuzz.py).
- time until every partition is processed again after each fault (see chaos/scenarios.py).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from typing import Any

import orjson

from chaos.fuzz import Expected
from chaos.observe import Letter, Observer
from chaos.traffic import PAGES, Sender, Traffic
from tests.fakegraph import FakeGraph

RECOVERY_GOAL_S = 15.0
EXAMPLES = 10  # ids listed per figure in the report


def consumer_messages(traffic: Traffic, obs: Observer) -> dict[str, Any]:
    expected = traffic.consumer_mids()
    shown: dict[str, list[tuple[str, str | None, str]]] = defaultdict(list)  # mid → (event_id, text, key)
    for key, events in obs.console.items():
        for c in events:
            v = c.value
            if v.get("type") == "consumer_message" and v.get("mid") in expected:
                shown[v["mid"]].append((str(v.get("event_id")), v.get("text"), key))
    lost = sorted(m for m in expected if m not in shown)
    altered = sorted(m for m, evs in shown.items()
                     if any(text != expected[m][1] or key != expected[m][0] for _, text, key in evs))
    repeats = sum(len(evs) - len({e for e, _, _ in evs}) for evs in shown.values())
    twice = sorted(m for m, evs in shown.items() if len({e for e, _, _ in evs}) > 1)
    return {
        "sent": len(expected),
        "shown": len(shown),
        "lost": len(lost),
        "lost_examples": lost[:EXAMPLES],
        "altered": len(altered),
        "repeated_same_event_id": repeats,
        "shown_twice_with_new_event_id": len(twice),
        "shown_twice_examples": twice[:EXAMPLES],
    }


def console_consistency(obs: Observer) -> dict[str, Any]:
    """Console events whose `event_id` was written again with a different content (both versions of
    the first few are kept: what a console deduplicating by `event_id` would hide)."""
    by_id: dict[str, bytes] = {}
    first: dict[str, dict[str, Any]] = {}
    differing: dict[str, dict[str, Any]] = {}
    total = 0
    for events in obs.console.values():
        for c in events:
            total += 1
            eid = str(c.value.get("event_id"))
            body = orjson.dumps(c.value, option=orjson.OPT_SORT_KEYS)
            prev = by_id.setdefault(eid, body)
            first.setdefault(eid, c.value)
            if prev != body and eid not in differing:
                differing[eid] = {"event_id": eid, "first": first[eid], "again": c.value}
    return {"console_events": total, "distinct_event_ids": len(by_id), "repeated": total - len(by_id),
            "same_event_id_different_content": len(differing),
            "examples": [differing[k] for k in sorted(differing)[:EXAMPLES]]}


def csat_check(traffic: Traffic, reports: dict[str, Any]) -> dict[str, Any]:
    """Compare each worker's `/csat` with the answers given."""
    given = traffic.answers()
    skills = sorted({s for s, _ in given} | {skill for _, skill in PAGES})
    per_worker: dict[str, Any] = {}
    worst_double = worst_missing = 0
    for name, report in reports.items():
        if not isinstance(report, dict) or "totals" not in report:
            per_worker[name] = {"error": str(report)[:300]}
            worst_missing = max(worst_missing, sum(given.values()))
            continue
        by_skill = (report.get("totals") or {}).get("skill") or {}
        double = missing = 0
        detail: dict[str, Any] = {}
        for skill in skills:
            scores = (by_skill.get(skill) or {}).get("scores") or {}
            for s in range(1, 6):
                exp = given.get((skill, s), 0)
                got = int(scores.get(str(s), 0))
                double += max(0, got - exp)
                missing += max(0, exp - got)
                if got != exp:
                    detail[f"{skill}/{s}"] = {"given": exp, "reported": got}
        worst_double = max(worst_double, double)
        worst_missing = max(worst_missing, missing)
        per_worker[name] = {"double_counted": double, "missing": missing, "complete": report.get("complete"),
                            "partitions": report.get("partitions"), "differences": detail}
    return {"answers_given": sum(given.values()), "double_counted": worst_double, "missing": worst_missing,
            "workers": per_worker}


def stalled(traffic: Traffic, obs: Observer) -> list[dict[str, Any]]:
    """The conversations whose script could not go on: why, and the console events they got."""
    out = []
    for c in traffic.convs:
        if c.stalled is None:
            continue
        events = [f"{e.value.get('type')}" + (f"({e.value.get('reason')})" if e.value.get("reason") else "")
                  for e in obs.console.get(c.key, ())]
        out.append({"key": c.key, "why": c.stalled, "actions_sent": c.actions, "console_events": events[-12:]})
    return out[:EXAMPLES]


def csat_console(traffic: Traffic, obs: Observer) -> dict[str, Any]:
    """`csat_received` on the consoles: answers shown twice under new event ids, answers not shown."""
    twice = missing = wrong = 0
    for c in traffic.convs:
        if c.score is None:
            continue
        got = [e.value for e in obs.by_conversation.get(c.conversation_id, ())
               if e.value.get("type") == "csat_received"]
        twice += len({v.get("event_id") for v in got}) > 1
        missing += not got
        wrong += any(v.get("score") != c.score for v in got)
    return {"csat_received_twice": twice, "csat_received_missing": missing, "csat_received_wrong_score": wrong}


def graph_sends(obs: Observer, graph: FakeGraph | None) -> dict[str, Any]:
    """Sends at the fake Graph API against the outbound records (tests/fakegraph.py's definitions:
    delivered = answered 200; a duplicate = the same part of an outbox id delivered again)."""
    if graph is None:
        return {"dispatcher": False}
    expected = {o["outbox_id"] for o in obs.outbound if o["message"]}
    emitted = Counter(o["outbox_id"] for o in obs.outbound)
    delivered = graph.deliveries()
    dups = graph.duplicates()
    never = expected - set(delivered)
    reported = {str(c.value.get("outbox_id")) for evs in obs.console.values() for c in evs
                if c.value.get("type") == "send_failed"}
    silent = sorted(never - reported)
    actions_out = sum(1 for o in obs.outbound if o["sender_action"])
    actions_sent = sum(1 for r in graph.requests if r.body.get("sender_action"))
    return {
        "outbound_records": len(obs.outbound),
        "outbound_outbox_ids_written_again": sum(1 for n in emitted.values() if n > 1),
        "message_outbox_ids": len(expected),
        "graph_requests": len(graph.requests),
        "graph_requests_not_answered": len(graph.in_flight()),
        "outbox_ids_sent_more_than_once": len(dups),
        "extra_sends": sum(n - 1 for n in dups.values()),
        "duplicate_examples": sorted(dups)[:EXAMPLES],
        "outbox_ids_never_sent": len(never),
        "never_sent_examples": sorted(never)[:EXAMPLES],
        "never_sent_reported_send_failed": len(never) - len(silent),
        "never_sent_silently": len(silent),
        "never_sent_silently_examples": silent[:EXAMPLES],
        "unknown_outbox_ids_sent": len(set(delivered) - expected),
        "sender_action_records": actions_out,
        "sender_action_requests": actions_sent,
        "max_concurrent_per_recipient": max(graph.max_concurrent.values(), default=0),
    }


def _stage(letter: Letter, names: dict[str, str]) -> str:
    return names.get(letter.source_topic or "", letter.source_topic or "?")


def _letter_keeps(letter: Letter, original: bytes) -> str | None:
    """How a letter accounts for its body: 'bytes' (the original bytes), 'digest' (size and SHA-256
    of an oversized original, plus a bounded prefix), or None."""
    if letter.payload_len == len(original) and letter.payload_sha256 == hashlib.sha256(original).hexdigest():
        return "bytes"
    digest = hashlib.sha256(original).hexdigest()
    vals = _flat(letter.fields)
    has_sha = any("sha" in k.lower() and isinstance(v, str) and v.lower() == digest for k, v in vals)
    has_size = any(("size" in k.lower() or "bytes" in k.lower() or "length" in k.lower()) and v == len(original)
                   for k, v in vals)
    return "digest" if has_sha and has_size else None


def _flat(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _flat(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        out.append((prefix, d))
    return out


def dead_letters(obs: Observer, sender: Sender, expectations: dict[tuple[int, int], tuple[Any, Expected]],
                 stage_names: dict[str, str]) -> dict[str, Any]:
    """Dead letters by stage and reason; every fuzzed body accounted for against its expectation."""
    by_reason = Counter(f"{_stage(lt, stage_names)}:{lt.reason}" for lt in obs.letters)
    raw_letters: dict[tuple[int, int], list[Letter]] = defaultdict(list)
    later_letters: dict[tuple[int, int], list[Letter]] = defaultdict(list)
    unexpected: list[str] = []
    for lt in obs.letters:
        if lt.source_topic == sender.raw_topic and lt.source_partition is not None:
            where = (int(lt.source_partition), int(lt.source_offset or 0))
            raw_letters[where].append(lt)
            sent = sender.raw.get(where)
            if sent is None or sent.kind != "fuzz":
                unexpected.append(f"{_stage(lt, stage_names)}:{lt.reason} for {sent.kind if sent else 'unknown'} "
                                  f"body at {where}")
        elif lt.inner_source is not None:
            later_letters[lt.inner_source].append(lt)
            sent = sender.raw.get(lt.inner_source)
            if sent is None or sent.kind != "fuzz":
                unexpected.append(f"{_stage(lt, stage_names)}:{lt.reason} for {sent.kind if sent else 'unknown'} "
                                  f"event from {lt.inner_source}")
        else:
            unexpected.append(f"{_stage(lt, stage_names)}:{lt.reason} from {lt.source_topic}")

    families: dict[str, Counter[str]] = defaultdict(Counter)
    unaccounted: list[dict[str, Any]] = []
    kept = Counter[str]()
    reason_differs = 0
    for where, (fb, exp) in expectations.items():
        original = fb.value
        letters = raw_letters.get(where, [])
        missing_parts: list[str] = []
        for reason, idx in exp.letters:
            match = [lt for lt in letters if lt.item_index == idx]
            how = next((h for h in (_letter_keeps(lt, original) for lt in match) if h), None)
            if not match:
                missing_parts.append(f"dead letter {reason} {idx or ''}".strip())
            elif how is None:
                missing_parts.append(f"dead letter {reason} {idx or ''} without the original bytes".strip())
            else:
                kept[how] += 1
                if all(lt.reason != reason for lt in match):
                    reason_differs += 1
        got = obs.split_sources.get(where, set())
        absent = exp.events - got
        if absent:
            missing_parts.append(f"{len(absent)} of {len(exp.events)} events not on the split topic")
        # a part dead-lettered later (conversation stage) is accounted there too
        fam = families[fb.family]
        fam["bodies"] += 1
        if missing_parts:
            fam["unaccounted"] += 1
            unaccounted.append({"family": fb.family, "mutation": fb.mutation, "bytes": len(original),
                                "at": list(where), "missing": missing_parts[:3]})
        elif not exp.letters and not exp.events:
            fam["nothing_to_do"] += 1
        if later_letters.get(where):
            fam["dead_lettered_after_ingest"] += 1
    refused = Counter(f"{kind}:{err}" for kind, _, err in sender.refused)
    return {
        "by_reason": dict(sorted(by_reason.items())),
        "total": len(obs.letters),
        "fuzz_bodies": len(expectations) + sum(1 for k, _, _ in sender.refused if k == "fuzz"),
        "fuzz_refused_by_kafka": dict(refused),
        "accounted": len(expectations) - len(unaccounted),
        "unaccounted": len(unaccounted),
        "unaccounted_by_family": {f: c["unaccounted"] for f, c in sorted(families.items()) if c["unaccounted"]},
        "unaccounted_examples": unaccounted[:EXAMPLES],
        "kept_as": dict(kept),
        "reason_differs_from_rules": reason_differs,
        "families": {f: dict(c) for f, c in sorted(families.items())},
        "unexpected": len(unexpected),
        "unexpected_examples": unexpected[:EXAMPLES],
    }


def goals(fig: dict[str, Any]) -> dict[str, Any]:
    """The goals of one scenario run: each check is (value, goal, met)."""
    checks: dict[str, Any] = {}

    def check(name: str, value: Any, ok: bool, goal: str) -> None:
        checks[name] = {"value": value, "goal": goal, "met": ok}

    cm = fig["consumer_messages"]
    check("consumer_messages_lost", cm["lost"], cm["lost"] == 0, "0")
    cs = fig["csat"]
    check("csat_double_counted", cs["double_counted"], cs["double_counted"] == 0, "0")
    check("csat_missing", cs["missing"], cs["missing"] == 0, "0")
    gs = fig["graph"]
    if gs.get("dispatcher", True):
        n = gs["outbox_ids_sent_more_than_once"]
        check("outbox_ids_sent_more_than_once", n, n == 0, "0")
        q = gs["never_sent_silently"]
        check("outbox_ids_never_sent_silently", q, q == 0,
              "0 (extra: a message never delivered is reported to the agent as send_failed)")
    dl = fig["dead_letters"]
    check("bad_bodies_unaccounted", dl["unaccounted"], dl["unaccounted"] == 0, "0 (every bad body accounted for)")
    rec = fig.get("recovery") or []
    if rec:
        worst = [r.get("recovery_s") for r in rec]
        value = None if any(v is None for v in worst) else max(float(v) for v in worst)
        check("recovery_seconds", value, value is not None and value <= RECOVERY_GOAL_S, f"<= {RECOVERY_GOAL_S:g}")
        not_mid = [r["what"] for r in rec if not r.get("mid_stream", {}).get("ok", True)]
        check("faults_were_mid_stream", not not_mid, not not_mid, "every fault injected mid-stream")
    cc = fig["csat_console"]
    shown = cc["csat_received_missing"] + cc["csat_received_wrong_score"]
    check("csat_received_missing_or_wrong", shown, shown == 0, "0 (extra: every answer shown to the agent once)")
    tr = fig["traffic"]
    check("conversations_stalled", tr["stalled"], tr["stalled"] == 0, "0 (extra: every script ran to its end)")
    met = all(c["met"] for c in checks.values())
    return {"met": met, "checks": checks, "failed": sorted(k for k, c in checks.items() if not c["met"])}

"""Conversation stage: the `converse` agent and the `conversations` table.

One agent consumes four co-partitioned topics keyed by `<page_id>:<psid>` (`messenger.events.split`,
`agent.actions`, `messenger.send.results`, `conversations.ticks`) and applies each input with the pure
`streams.rules.conversation.Decider`; see that module for the rules and docs/architecture.md for the
delivery guarantees.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from streams.core import metrics, serde
from streams.rules.conversation.api import Decision, Input
from streams.rules.conversation.decider import Decider
from streams.rules.conversation.timers import wants_timer

# --- lifecycle (#13): the wheel's constants moved here from the old single-class Decider --------------
BUCKET_MS = 1_000  # timer wheel resolution: one bucket of conversation keys per second
TIMER_PREFIX = "\x00timers:"
CURSOR_PREFIX = "\x00cursor:"

if TYPE_CHECKING:
    from streams.stages.app import Pipeline

log = logging.getLogger("messenger_streams.conversations")


def register(pipe: Pipeline) -> None:
    """Attach the `converse` agent, the `conversations` table and the tick timer to the app."""
    app = pipe.app
    settings = pipe.settings
    names = {attr: settings.topics.name(attr) for attr in ("split", "events", "actions", "send_results", "ticks")}
    source_of = {names["split"]: "event", names["actions"]: "action", names["send_results"]: "result"}
    channel = pipe.raw_topic(names["split"], names["actions"], names["send_results"], names["ticks"])
    table = app.Table("conversations", default=None, partitions=settings.partitions)
    pipe.extras["conversations"] = table

    decider = Decider(  # lifecycle (#13): no csat_totals hook (decision C), the rules are pure
        pipe.config,
        dedupe_horizon_ms=settings.dedupe_horizon_seconds * 1000,
        dedupe_max_keys=settings.dedupe_max_keys,
    )
    publish_events = settings.publish_events
    pipe.extras["decider"] = decider
    dests = {
        "outbound": settings.topics.name("outbound"),
        "history": settings.topics.name("history"),
        "csat_responses": settings.topics.name("csat_responses"),
        "csat_facts": settings.topics.name("csat_facts"),
    }
    skill_names = {skill: settings.topics.skill(skill) for skill in pipe.skill_topics}
    default_skill_name = skill_names[pipe.config.routing.default_skill]
    send = pipe.send
    latency = metrics.PROCESSING_LATENCY.labels("conversation")
    console_events = metrics.BoundLabels(metrics.CONSOLE_EVENTS)

    async def emit(decision: Decision) -> None:
        for out in decision.outputs:
            value = serde.dumps(out.value)
            if out.dest == "skill":
                assert out.skill is not None  # noqa: S101 - set by _Ctx.console
                # routing only picks declared skills; the default is a guard, never expected
                await send(skill_names.get(out.skill, default_skill_name), out.key.encode(), value)
                console_events.inc(out.skill, out.value["type"])
            else:
                await send(dests[out.dest], out.key.encode(), value)
        metrics.record_notes(decision.notes, decision.figures)  # lifecycle (#13)

    def arm(partition: int, key: str, due: int) -> None:
        cursor_key = f"{CURSOR_PREFIX}{partition}"
        cursor = table.get(cursor_key)
        bucket = due // BUCKET_MS
        if cursor is None:
            cursor = int(time.time() * 1000) // BUCKET_MS - 1
            table[cursor_key] = cursor
        bucket = max(bucket, cursor + 1)
        bucket_key = f"{TIMER_PREFIX}{partition}:{bucket}"
        keys = table.get(bucket_key) or []
        if key not in keys:
            table[bucket_key] = [*keys, key]

    async def apply(key: str, inp: Input, topic: str, offset: int, partition: int, raw: bytes | None = None) -> None:
        state = table.get(key)
        if state is not None and state["o"].get(topic, -1) >= offset:
            return  # redelivered after a crash: already applied
        decision = decider.decide(state, inp, key, decider.env_for(key.partition(":")[0]))
        if decision.duplicate:
            await emit(decision)  # no outputs: counts the duplicate
            return  # nothing changed, nothing to write; a redelivery of it is a duplicate again
        if raw is not None:
            await send(names["events"], key.encode(), raw)
        await emit(decision)
        if decision.state is None:
            if key in table:  # lifecycle (#13): `forget` may name a key never stored
                del table[key]
            return
        decision.state.setdefault("o", {})[topic] = offset
        table[key] = decision.state
        for due in decision.arms:
            arm(partition, key, due)

    async def on_tick(now: int, topic: str, offset: int, partition: int) -> None:
        cursor_key = f"{CURSOR_PREFIX}{partition}"
        cursor = table.get(cursor_key)
        if cursor is None:
            return
        upto = now // BUCKET_MS - 1  # only buckets wholly in the past: a bucket spans BUCKET_MS
        if upto <= cursor:
            return
        for bucket in range(cursor + 1, upto + 1):
            bucket_key = f"{TIMER_PREFIX}{partition}:{bucket}"
            keys = table.get(bucket_key)
            if keys is None:
                continue
            for key in keys:
                if not wants_timer(table.get(key), now):  # lifecycle (#13): the wake-ups live in the state
                    continue  # moved later or gone: lazy deletion
                await apply(key, Input("timer", f"timer:{bucket}", now, {}), topic, offset, partition)
            del table[bucket_key]
        table[cursor_key] = upto

    dead_letter = pipe.dead_letter

    @app.agent(channel, name="converse")
    async def converse(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            topic = msg.topic
            try:
                data = serde.loads(event.value)
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            except ValueError as exc:
                await dead_letter(msg, "invalid_action" if topic == names["actions"] else "processing_error", str(exc))
                continue
            if topic == names["ticks"]:
                await on_tick(int(data.get("now", 0)), topic, msg.offset, msg.partition)
                continue
            key = msg.key.decode("utf-8", "replace") if msg.key else ""
            source = source_of[topic]
            record_ms = int((msg.timestamp or time.time()) * 1000)
            raw: bytes | None = None
            if source == "action":
                if not key:
                    await dead_letter(msg, "invalid_action", "agent action without a '<page_id>:<psid>' key")
                    continue
                inp = Input("action", f"action:{data.get('action_id')}", record_ms, data)
            elif source == "event":
                inp = Input("event", str(data.get("idempotency_key")), int(data.get("received_at") or record_ms), data)
                raw = event.value if publish_events else None
            else:
                inp = Input("result", f"result:{data.get('outbox_id')}", record_ms, data)
            try:
                await apply(key, inp, topic, msg.offset, msg.partition, raw)
            except (KeyError, TypeError, ValueError) as exc:
                log.exception("cannot process %s record at %s:%s", source, msg.partition, msg.offset)
                await dead_letter(msg, "processing_error", f"{type(exc).__name__}: {exc}")
            latency.observe(max(0.0, time.time() - (msg.timestamp or time.time())))

    @app.timer(settings.tick_interval_seconds)  # type: ignore[untyped-decorator]  # faust is untyped
    async def tick() -> None:
        now = int(time.time() * 1000)
        value = orjson.dumps({"now": now})
        for tp in app.consumer.assignment():
            if tp.topic == names["ticks"]:
                await send(names["ticks"], b"\x00tick", value, tp.partition)

    @app.timer(15.0)  # type: ignore[untyped-decorator]  # faust is untyped
    async def count_open() -> None:
        counts: dict[str, int] = {s: 0 for s in pipe.config.all_skills()}
        for key, state in list(table.items()):
            if isinstance(key, str) and not key.startswith("\x00") and state and state.get("conv"):
                skill = state["conv"]["skill"]
                counts[skill] = counts.get(skill, 0) + 1
        for skill, n in counts.items():
            metrics.OPEN_CONVERSATIONS.labels(skill).set(n)

    pipe.extras["agents.converse"] = converse

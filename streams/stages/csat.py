"""CSAT stage: `csat.facts` → the table `csat_aggregates`, `GET /csat` and the CSAT gauges.

The agent `aggregate_csat` (concurrency 1) folds each fact with `streams.rules.csat_cells.apply_fact`;
see that module for the exactly-once design and the stored value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from schemas.contract import CsatFact
from streams.core import metrics
from streams.rules.csat import SCORES, csat_percent, response_rate
from streams.rules.csat_cells import DEFAULT_WINDOWS_SHOWN, MAX_WINDOWS, Counts, apply_fact, csat_report, skill_totals

if TYPE_CHECKING:
    from streams.stages.app import Pipeline

log = logging.getLogger("messenger_streams.csat")

TABLE_NAME = "csat_aggregates"
GAUGE_REFRESH_SECONDS = 1.0

# Reading the table (allowed outside the agent; only the agent writes)


def local_partitions(pipe: Pipeline) -> list[int]:
    """The `csat.facts` partitions this worker actively owns (standby copies excluded)."""
    name = pipe.settings.topics.name("csat_facts")
    try:
        actives = pipe.app.assignor.assigned_actives()
    except (AttributeError, KeyError):
        return []
    return sorted(tp.partition for tp in actives if tp.topic == name)


def local_states(pipe: Pipeline, partitions: Iterable[int] | None = None) -> list[Mapping[str, Any]]:
    """The aggregates of this worker's active partitions (or of the given ones)."""
    table = pipe.extras["csat_aggregates"]
    parts = local_partitions(pipe) if partitions is None else partitions
    out: list[Mapping[str, Any]] = []
    for p in parts:
        value = table.get(str(p))
        if value:
            out.append(value)
    return out


class _Gauges:
    """Per-skill gauges from the table; labels of skills no longer present are removed."""

    def __init__(self) -> None:
        self.skills: set[str] = set()

    def set_skill(self, skill: str, counts: Counts) -> None:
        answers = sum(counts[1:])
        pct = csat_percent(counts[4] + counts[5], answers)
        rate = response_rate(answers, counts[0])
        if pct is not None:
            metrics.CSAT_PERCENT.labels(skill).set(pct)
        if rate is not None:
            metrics.CSAT_RESPONSE_RATE.labels(skill).set(rate)
        metrics.CSAT_AGGREGATE_SURVEYS.labels(skill).set(counts[0])
        for s in SCORES:
            metrics.CSAT_AGGREGATE_ANSWERS.labels(skill, str(s)).set(counts[s])
        self.skills.add(skill)

    def refresh(self, per_skill: Mapping[str, Counts]) -> None:
        for skill in self.skills - set(per_skill):
            for gauge in (metrics.CSAT_PERCENT, metrics.CSAT_RESPONSE_RATE, metrics.CSAT_AGGREGATE_SURVEYS):
                try:
                    gauge.remove(skill)
                except KeyError:
                    pass
            for s in SCORES:
                try:
                    metrics.CSAT_AGGREGATE_ANSWERS.remove(skill, str(s))
                except KeyError:
                    pass
        self.skills &= set(per_skill)
        for skill, counts in per_skill.items():
            self.set_skill(skill, counts)


def register(pipe: Pipeline) -> None:
    """Attach the `aggregate_csat` agent, the `csat_aggregates` table, `/csat` and the gauges timer."""
    app = pipe.app
    settings = pipe.settings
    window_seconds = pipe.config.csat.window_seconds
    facts_topic = pipe.topic("csat_facts")
    latency = metrics.PROCESSING_LATENCY.labels("csat")
    gauges = _Gauges()

    aggregates = app.Table(TABLE_NAME, default=None, partitions=settings.partitions)
    pipe.extras["csat_aggregates"] = aggregates

    def csat_totals(skill: str) -> tuple[int, int]:
        """(answers scoring 4 or 5, all answers) of a skill on this worker: for `csat_received`."""
        counts = skill_totals(local_states(pipe)).get(skill)
        return (counts[4] + counts[5], sum(counts[1:])) if counts else (0, 0)

    pipe.extras["csat_totals"] = csat_totals

    @app.agent(facts_topic, name="aggregate_csat", concurrency=1)
    async def aggregate_csat(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                if not isinstance(event.value, bytes | str):
                    raise ValueError("empty csat fact")
                fact = CsatFact.model_validate_json(event.value)
            except (ValidationError, ValueError) as exc:
                await pipe.dead_letter(msg, "processing_error", f"invalid csat fact: {exc}")
                metrics.CSAT_FACTS_SKIPPED.labels("invalid").inc()
                continue
            key = str(msg.partition)
            result = apply_fact(aggregates.get(key), fact, msg.offset, window_seconds)
            if result.state is None:
                metrics.CSAT_FACTS_SKIPPED.labels(result.skipped or "unknown").inc()
                continue
            aggregates[key] = result.state  # the one write: counts, offset and fact id together
            if fact.fact == "survey_sent":
                metrics.CSAT_SURVEYS.labels(fact.skill).inc()
            elif fact.score is not None:
                metrics.CSAT_ANSWERS.labels(fact.skill, str(fact.score)).inc()
            counts = skill_totals(local_states(pipe)).get(fact.skill)
            if counts:
                gauges.set_skill(fact.skill, counts)
            latency.observe(max(0.0, time.time() - (msg.timestamp or time.time())))

    @app.timer(GAUGE_REFRESH_SECONDS, name="csat_gauges")  # type: ignore[untyped-decorator]  # faust is untyped
    async def refresh_csat_gauges() -> None:
        # After recovery and after every rebalance the gauges follow the partitions owned now.
        gauges.refresh(skill_totals(local_states(pipe)))

    @app.page("/csat")
    async def csat_page(web: Any, request: Any) -> Any:
        query = request.query
        try:
            shown = int(query.get("windows", DEFAULT_WINDOWS_SHOWN))
            window = query.get("window") or None
            if window not in (None, "latest"):
                int(window)
            partitions = local_partitions(pipe)
            report = csat_report(
                local_states(pipe, partitions),
                window_seconds=window_seconds,
                partitions=partitions,
                total_partitions=settings.partitions,
                skill=query.get("skill") or None,
                page=query.get("page") or None,
                agent=query.get("agent") or None,
                window=window,
                windows=min(max(shown, 0), MAX_WINDOWS),
            )
        except ValueError as exc:
            return web.json({"error": f"bad query: {exc}"}, status=400)
        return web.json(report)

    pipe.extras["agents.aggregate_csat"] = aggregate_csat

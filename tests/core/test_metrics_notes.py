"""`record_notes`: a decision's notes and figures become metrics with bounded labels."""

from __future__ import annotations

from prometheus_client import REGISTRY

from streams.core import metrics


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_notes_and_figures_become_metrics() -> None:
    before_in = value("messenger_page_messages_total", page="p1", direction="inbound")
    before_ab = value("messenger_conversations_abandoned_total", skill="billing")
    before_hist = value("messenger_first_response_seconds_count", skill="billing")
    metrics.record_notes(
        [("page_in", "p1"), ("page_in", "p1"), ("abandoned", "billing"), ("open+", "billing"), ("timer", "idle")],
        [("first_response_seconds", "billing", 42.0), ("queue_wait_seconds", "billing", 3.0)],
    )
    assert value("messenger_page_messages_total", page="p1", direction="inbound") == before_in + 2
    assert value("messenger_conversations_abandoned_total", skill="billing") == before_ab + 1
    assert value("messenger_first_response_seconds_count", skill="billing") == before_hist + 1
    assert value("messenger_conversation_timers_fired_total", timer="idle") >= 1


def test_agent_labels_are_bounded() -> None:
    for i in range(metrics.TOP_AGENTS + 30):
        metrics.record_notes([("agent_message", f"bounded-agent-{i}")])
    labelled = {
        s.labels["agent"]
        for family in metrics.AGENT_MESSAGES.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert len(labelled) <= metrics.TOP_AGENTS + 1 and "other" in labelled

"""A live summary of a running worker, read from its /metrics: `messenger-streams summary`."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, timeout: float = 2.0) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples of one scrape: name → {sorted label pairs → value}."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-given URL
        text = resp.read().decode("utf-8")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def _by(samples: dict[tuple[tuple[str, str], ...], float], label: str) -> dict[str, float]:
    acc: dict[str, float] = defaultdict(float)
    for labels, value in samples.items():
        acc[dict(labels).get(label, "")] += value
    return dict(acc)


def _fmt(d: dict[str, float]) -> str:
    return "  ".join(f"{k}={int(v) if float(v).is_integer() else round(v, 1)}" for k, v in sorted(d.items())) or "-"


def render(m: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> str:
    """The summary block for one scrape."""
    lines = [f"--- messenger-streams  {time.strftime('%H:%M:%S')} ---"]
    lines.append(f"raw bodies      {int(sum(m.get('messenger_raw_bodies_total', {}).values()))}")
    lines.append(f"events in       {_fmt(_by(m.get('messenger_events_in_total', {}), 'kind'))}")
    lines.append(f"duplicates      {_fmt(_by(m.get('messenger_duplicates_dropped_total', {}), 'kind'))}")
    lines.append(f"dead letters    {_fmt(_by(m.get('messenger_dead_letters_total', {}), 'reason'))}")
    console = m.get("messenger_console_events_total", {})
    if console:
        lines.append(f"console events  {_fmt(_by(console, 'skill'))}")
        lines.append(f"  by type       {_fmt(_by(console, 'type'))}")
    opened = m.get("messenger_open_conversations", {})
    if opened:
        lines.append(f"open convs      {_fmt(_by(opened, 'skill'))}")
    outbound = m.get("messenger_outbound_requests_total", {})
    if outbound:
        lines.append(f"outbound        {_fmt(_by(outbound, 'origin'))}")
    lines.extend(bots_lines(m))  # #15
    csat = m.get("messenger_csat_percent", {})
    if csat:
        lines.append(f"CSAT %          {_fmt(_by(csat, 'skill'))}")
    return "\n".join(lines)


def bots_lines(m: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> list[str]:
    """#15: bot hand-offs and checkout opt-ins (with their orders), when there were any."""
    lines = []
    handoffs = m.get("messenger_bot_handoffs_total", {})
    if handoffs:
        lines.append(f"bot hand-offs   {_fmt(_by(handoffs, 'direction'))}")
    optins, orders = m.get("messenger_checkout_optins_total", {}), m.get("messenger_orders_total", {})
    if optins or orders:
        lines.append(f"checkout        {_fmt(_by(optins, 'event'))}")
        lines.append(f"  orders        {_fmt(_by(orders, 'result'))}")
    return lines


def run_summary(url: str, *, interval: float = 2.0, once: bool = False) -> int:
    """Print the summary every `interval` seconds until Ctrl-C (or once)."""
    while True:
        try:
            print(render(scrape(url)), flush=True)
        except (urllib.error.URLError, OSError) as exc:
            print(f"summary: waiting for the worker at {url} ({exc})", flush=True)
            if once:
                return 2
        if once:
            return 0
        time.sleep(interval)

"""CSAT aggregation rules (pure): facts → exact counts per skill, page and agent, and the `/csat` report.

The stage `streams.stages.csat` folds each `CsatFact` into the table `csat_aggregates` with
`apply_fact`. Exactly-once counting comes from the design, not from faust's exactly_once mode:

- Faust writes a table's changelog to the partition of the current event, so all aggregates of one
  `csat.facts` partition live in ONE table value, keyed by the partition number. Applying a fact is
  one table write, so counts, the applied offset and the counted fact ids change together.
- A record at an offset ≤ the stored offset was already applied (Kafka redelivery after a crash,
  before the consumer commit): skipped.
- A fact whose `fact_id` was already counted (the conversation stage re-emitted it after its own
  redelivery) is skipped. Fact ids are kept for `FACT_ID_HORIZON_MS` (7 days) of fact time; a fact
  older than that relative to the newest fact of its partition cannot be checked and is skipped
  as `expired`.

The value of one partition (plain JSON):
`{"v": 1, "offset": int, "clock": newest fact ms, "window_seconds": int, "facts": {fact_id: ms},
  "totals": {cell: counts}, "windows": {"<start epoch s>": {cell: counts}}}` where a cell is
`"<skill>|<page_id>|<agent_id>"` and counts is `[surveys_sent, score1, …, score5]`. Windows are
tumbling, epoch-aligned, by the fact's `timestamp`; the newest `MAX_WINDOWS` are kept.

`GET /csat` sums the partitions this worker owns and says which ones (see docs/metrics.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from schemas.contract import CsatFact
from streams.rules.csat import SCORES, csat_percent, response_rate

STATE_VERSION = 1
FACT_ID_HORIZON_MS = 7 * 86_400 * 1000
MAX_WINDOWS = 48
DEFAULT_WINDOWS_SHOWN = 24
NO_AGENT = "-"

Counts = list[int]  # [surveys_sent, score1, score2, score3, score4, score5]
Cells = dict[str, Counts]


# ---------------------------------------------------------------------------------------------
# Pure aggregation


def cell_key(skill: str, page_id: str, agent_id: str | None) -> str:
    """The aggregate cell of one fact. Skill names and page ids hold no `|`; the agent id is last."""
    return f"{skill}|{page_id}|{agent_id or NO_AGENT}"


def split_cell(cell: str) -> tuple[str, str, str]:
    """(skill, page_id, agent_id) of a cell key."""
    skill, page_id, agent_id = cell.split("|", 2)
    return skill, page_id, agent_id


def window_start(timestamp_ms: int, window_seconds: int) -> int:
    """Epoch-aligned start (epoch s) of the tumbling window holding this timestamp."""
    return (timestamp_ms // 1000) // window_seconds * window_seconds


def empty_state(window_seconds: int) -> dict[str, Any]:
    """The aggregates of a partition before its first fact."""
    return {
        "v": STATE_VERSION,
        "offset": -1,
        "clock": 0,
        "window_seconds": window_seconds,
        "facts": {},
        "totals": {},
        "windows": {},
    }


def _bump(cells: Mapping[str, Counts], cell: str, fact: CsatFact) -> Cells:
    out = dict(cells)
    counts = list(out.get(cell) or [0, 0, 0, 0, 0, 0])
    if fact.fact == "survey_sent":
        counts[0] += 1
    elif fact.score is not None:
        counts[fact.score] += 1
    out[cell] = counts
    return out


@dataclass(frozen=True)
class Applied:
    """Result of one fact: the partition's new state to write, or why it was skipped."""

    state: dict[str, Any] | None
    skipped: str | None = None  # "redelivered", "duplicate", "expired"


def apply_fact(
    state: Mapping[str, Any] | None,
    fact: CsatFact,
    offset: int,
    window_seconds: int,
    *,
    horizon_ms: int = FACT_ID_HORIZON_MS,
    max_windows: int = MAX_WINDOWS,
) -> Applied:
    """Fold one fact read at `offset` into a partition's aggregates (pure; `state` is not changed).

    Skips (no write needed) a redelivered record, an already-counted fact id, and a fact older than
    the fact-id horizon. An `answer` fact without a score is not counted (the model forbids it
    only for scores outside 1–5)."""
    cur: Mapping[str, Any] = state if state is not None else empty_state(window_seconds)
    if offset <= int(cur["offset"]):
        return Applied(None, "redelivered")
    facts: dict[str, int] = cur["facts"]
    if fact.fact_id in facts:
        return Applied(None, "duplicate")
    clock = max(int(cur["clock"]), fact.timestamp)
    cutoff = clock - horizon_ms
    if fact.timestamp < cutoff:
        return Applied(None, "expired")
    if fact.fact == "answer" and fact.score is None:
        return Applied(None, "invalid")

    new_facts = {fid: ts for fid, ts in facts.items() if ts >= cutoff}
    new_facts[fact.fact_id] = fact.timestamp
    cell = cell_key(fact.skill, fact.page_id, fact.agent_id)

    windows: dict[str, Cells] = dict(cur["windows"]) if cur["window_seconds"] == window_seconds else {}
    start = window_start(fact.timestamp, window_seconds)
    newest = max([start, *(int(s) for s in windows)])
    oldest_kept = newest - (max_windows - 1) * window_seconds
    if start >= oldest_kept:
        windows[str(start)] = _bump(windows.get(str(start), {}), cell, fact)
    windows = {s: cells for s, cells in windows.items() if int(s) >= oldest_kept}

    return Applied(
        {
            "v": STATE_VERSION,
            "offset": offset,
            "clock": clock,
            "window_seconds": window_seconds,
            "facts": new_facts,
            "totals": _bump(cur["totals"], cell, fact),
            "windows": windows,
        }
    )


def merge_cells(many: Iterable[Mapping[str, Counts]]) -> Cells:
    """Sum cells of several partitions."""
    out: Cells = {}
    for cells in many:
        for cell, counts in cells.items():
            acc = out.setdefault(cell, [0, 0, 0, 0, 0, 0])
            for i, n in enumerate(counts):
                acc[i] += n
    return out


def stats(counts: Counts) -> dict[str, Any]:
    """The public figures of one counts vector."""
    answers = sum(counts[1:])
    positive = counts[4] + counts[5]
    pct = csat_percent(positive, answers)
    rate = response_rate(answers, counts[0])
    return {
        "surveys_sent": counts[0],
        "answers": answers,
        "positive": positive,
        "scores": {str(s): counts[s] for s in SCORES},
        "csat_percent": None if pct is None else round(pct, 2),
        "response_rate": None if rate is None else round(rate, 4),
    }


def summarize(
    cells: Mapping[str, Counts], skill: str | None = None, page: str | None = None, agent: str | None = None
) -> dict[str, Any]:
    """Overall figures and figures per skill, page and agent of the cells matching the filters."""
    overall = [0, 0, 0, 0, 0, 0]
    by: dict[str, dict[str, Counts]] = {"skill": {}, "page": {}, "agent": {}}
    for cell, counts in cells.items():
        c_skill, c_page, c_agent = split_cell(cell)
        if (skill and c_skill != skill) or (page and c_page != page) or (agent and c_agent != agent):
            continue
        for dim, name in (("skill", c_skill), ("page", c_page), ("agent", c_agent)):
            acc = by[dim].setdefault(name, [0, 0, 0, 0, 0, 0])
            for i, n in enumerate(counts):
                acc[i] += n
        for i, n in enumerate(counts):
            overall[i] += n
    return {
        "all": stats(overall),
        **{dim: {name: stats(c) for name, c in sorted(groups.items())} for dim, groups in by.items()},
    }


def csat_report(
    states: Iterable[Mapping[str, Any]],
    *,
    window_seconds: int,
    partitions: list[int],
    total_partitions: int,
    skill: str | None = None,
    page: str | None = None,
    agent: str | None = None,
    window: str | None = None,
    windows: int = DEFAULT_WINDOWS_SHOWN,
) -> dict[str, Any]:
    """The `/csat` JSON from the states of the partitions this worker covers.

    `window`: None (the newest `windows` windows), `"latest"` (the newest one) or a window start
    in epoch seconds. Raises ValueError for a window start that is not aligned."""
    states = list(states)
    totals = merge_cells(s["totals"] for s in states)
    by_start: dict[int, list[Cells]] = {}
    for s in states:
        if s.get("window_seconds") != window_seconds:
            continue
        for start, cells in s["windows"].items():
            by_start.setdefault(int(start), []).append(cells)
    starts = sorted(by_start, reverse=True)
    if window == "latest":
        starts = starts[:1]
    elif window is not None:
        wanted = int(window)
        if wanted % window_seconds:
            raise ValueError(f"window {wanted} is not a multiple of window_seconds {window_seconds}")
        starts = [wanted]
    else:
        starts = starts[: max(0, windows)]
    return {
        "window_seconds": window_seconds,
        "partitions": sorted(partitions),
        "total_partitions": total_partitions,
        "complete": set(partitions) >= set(range(total_partitions)),
        "filters": {"skill": skill, "page": page, "agent": agent},
        "totals": summarize(totals, skill, page, agent),
        "windows": [
            {
                "start": start,
                "end": start + window_seconds,
                **summarize(merge_cells(by_start.get(start, [])), skill, page, agent),
            }
            for start in starts
        ],
    }


def skill_totals(states: Iterable[Mapping[str, Any]]) -> dict[str, Counts]:
    """All-time counts per skill of some partitions' states."""
    out: dict[str, Counts] = {}
    for s in states:
        for cell, counts in s["totals"].items():
            acc = out.setdefault(split_cell(cell)[0], [0, 0, 0, 0, 0, 0])
            for i, n in enumerate(counts):
                acc[i] += n
    return out

"""CSAT cells (pure): facts → exact counts kept as many small table values, and the `/csat` report.

The CSAT stage (`streams.stages.csat`) reads `csat.facts` keyed by skill, so every fact of a skill is
counted on one partition, in order. `apply_batch(read, records)` folds a batch of facts over the
current table values (`read(key)`) and returns the values to write (per partition), the
`csat_received` events to emit and one outcome per record; it never changes what `read` returns.

Table keys (skill names and page ids hold no `|`; the agent id, possibly with `|`, comes last):

- `T|<skill>|<page>|<agent>` → all-time counts of one cell `[surveys_sent, score1, …, score5]`
  (one per cell);
- `W|<slot>|<skill>|<page>|<agent>` → one tumbling window of one cell `{"start", "size", "c": counts}`
  (at most `max_windows` per cell);
- `S|<skill>` → the skill's all-time counts and its newest window `{"c", "newest", "size"}`;
- `O|<p>|<src partition>|<src topic>` → the highest `[offset, index]` counted from that source on
  partition p (source topics × their partitions, per partition);
- `P|<p>` → partition p's highest applied `csat.facts` offset, `pending` figures and legacy ring
  position (one per partition);
- `D|<p>|<fact_id>` → ring slot and `R|<p>|<slot>` → fact id: the fact ids of facts without `src`
  (a ring of `legacy_ids` per partition).

A cell is (skill, page, agent); `-` stands for no agent. Windows are epoch-aligned and tumbling by the
fact's own timestamp; a cell's window lives in slot `(start // size) % max_windows`, so a newer
window reuses the slot of one `max_windows` windows older: old windows are overwritten in place and
the number of window values is bounded by cells × `max_windows`. Readers ignore a slot whose window
is `max_windows` or more windows older than the skill's newest (`S|…["newest"]`).

Dedupe (docs/metrics.md has the argument):
- a fact with `src` is counted only if its (offset, index) is above the watermark of its source
  (`src.topic`, `src.partition`) on this partition: facts of one source partition arrive in order;
- a fact without `src` (an older producer) is counted only if its `fact_id` is not among the last
  `legacy_ids` such fact ids of the partition; a fact with `src` whose fact id is there (re-emitted
  after an upgrade) is a duplicate too;
- a record at a `csat.facts` offset ≤ the partition's applied offset was already applied (Kafka
  redelivered it after a crash): not counted again, but its `csat_received` is emitted again (same
  event id, same figures) when it belongs to the last batch written, whose outputs may not have
  reached Kafka (`P|<p>["pending"]`: offset → [positive, answers]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

from schemas.contract import CsatFact
from streams.rules.csat import SCORES, csat_percent, response_rate

MAX_WINDOWS = 48
DEFAULT_WINDOWS_SHOWN = 24
LEGACY_IDS = 10_000  # fact ids of facts without `src` remembered per partition
NO_AGENT = "-"
MAX_FIELD_CHARS = 256  # skill, page id, agent id and fact id longer than this are refused (keys stay small)
WRITE_BUDGET = 128 * 1024  # estimated bytes of one partition's writes before a batch is cut
RECORD_ESTIMATE = 320  # upper bound of one changelog record besides its key (value ≤ 258 + record overhead)
PENDING_ESTIMATE = 48  # upper bound of one `pending` entry

Counts = list[int]  # [surveys_sent, score1, score2, score3, score4, score5]
Cell = tuple[str, str, str]  # (skill, page_id, agent_id or "-")
Read = Callable[[str], Any]
Status = Literal["counted", "duplicate", "redelivered", "failed"]


# ---------------------------------------------------------------------------------------------
# Keys


def cell_of(fact: CsatFact) -> Cell:
    """The cell a fact counts in."""
    return (fact.skill, fact.page_id, fact.agent_id or NO_AGENT)


def total_key(cell: Cell) -> str:
    return "T|" + "|".join(cell)


def window_key(slot: int, cell: Cell) -> str:
    return f"W|{slot}|" + "|".join(cell)


def skill_key(skill: str) -> str:
    return f"S|{skill}"


def watermark_key(partition: int, src_topic: str, src_partition: int) -> str:
    return f"O|{partition}|{src_partition}|{src_topic}"


def meta_key(partition: int) -> str:
    return f"P|{partition}"


def legacy_key(partition: int, fact_id: str) -> str:
    return f"D|{partition}|{fact_id}"


def ring_key(partition: int, slot: int) -> str:
    return f"R|{partition}|{slot}"


def split_cell(text: str) -> Cell:
    """(skill, page_id, agent_id) from `<skill>|<page>|<agent>`."""
    skill, page_id, agent_id = text.split("|", 2)
    return skill, page_id, agent_id


def window_start(timestamp_ms: int, window_seconds: int) -> int:
    """Epoch-aligned start (epoch s) of the tumbling window holding this timestamp."""
    return (timestamp_ms // 1000) // window_seconds * window_seconds


def window_slot(start: int, window_seconds: int, max_windows: int = MAX_WINDOWS) -> int:
    """The ring slot of a window: windows `max_windows` apart share one."""
    return (start // window_seconds) % max_windows


# ---------------------------------------------------------------------------------------------
# Applying facts


@dataclass(frozen=True, slots=True)
class FactRecord:
    """One `csat.facts` record: the fact and where it was read."""

    fact: CsatFact
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Received:
    """A `csat_received` console event for the skill's topic, keyed by the conversation key."""

    skill: str
    key: str
    value: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one record: counted, duplicate (already counted), redelivered (offset already
    applied) or failed (`error` says why; the stage dead-letters it)."""

    status: Status
    error: str | None = None


@dataclass
class Batch:
    """The result of `apply_batch`: per partition, every dirty key's new value (None deletes it);
    the events to emit, in order; one outcome per record consumed (a batch may stop early, see
    `apply_batch`)."""

    writes: dict[int, dict[str, Any]] = field(default_factory=dict)
    outputs: list[Received] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def consumed(self) -> int:
        return len(self.outcomes)


def received_event(fact: CsatFact, positive: int, answers: int) -> Received:
    """`csat_received` for a counted answer, with the skill's figures after counting it. The event
    id comes from the fact id, so a re-emission carries the same id (and the same figures)."""
    pct = csat_percent(positive, answers)
    return Received(
        fact.skill,
        f"{fact.page_id}:{fact.psid}",
        {
            "type": "csat_received",
            "event_id": f"{fact.fact_id}:received",
            "conversation_id": fact.conversation_id,
            "page_id": fact.page_id,
            "psid": fact.psid,
            "skill": fact.skill,
            "timestamp": fact.timestamp,
            "score": fact.score,
            "agent_id": fact.agent_id,
            "csat_percent": None if pct is None else round(pct, 2),
            "csat_positive": positive,
            "csat_answers": answers,
            "mid": fact.mid,
        },
    )


def bump(counts: Sequence[int] | None, fact: CsatFact) -> Counts:
    """A new counts vector: `counts` (or zeros) plus this fact."""
    out = list(counts) if counts is not None else [0, 0, 0, 0, 0, 0]
    if fact.fact == "survey_sent":
        out[0] += 1
    else:
        out[fact.score or 0] += 1  # score checked by check_fact
    return out


def check_fact(fact: CsatFact) -> None:
    """Raise ValueError for a fact that cannot be counted (the stage dead-letters it)."""
    if fact.fact == "answer" and fact.score is None:
        raise ValueError("an answer fact without a score")
    for name, value in (("skill", fact.skill), ("page_id", fact.page_id)):
        if not value or "|" in value:
            raise ValueError(f"{name} {value!r} is empty or holds '|'")
    for name, value in (("skill", fact.skill), ("page_id", fact.page_id), ("agent_id", fact.agent_id or ""),
                        ("fact_id", fact.fact_id)):
        if len(value) > MAX_FIELD_CHARS:
            raise ValueError(f"{name} longer than {MAX_FIELD_CHARS} characters")


class _Meta:
    """Partition meta during a batch: applied offset, this batch's pending figures, legacy ring."""

    __slots__ = ("offset", "previous", "pending", "next", "highest", "touched")

    def __init__(self, stored: Mapping[str, Any] | None) -> None:
        stored = stored or {}
        self.offset: int = int(stored.get("offset", -1))
        self.previous: dict[str, list[int]] = dict(stored.get("pending") or {})
        self.pending: dict[str, list[int]] = {}
        self.next: int = int(stored.get("next", 0))
        self.highest = -1  # highest offset of this partition seen in this batch
        self.touched = False  # a record of this partition was applied: the meta is written

    def value(self) -> dict[str, Any]:
        # entries of the previous batch not reached yet stay pending (a redelivery may still bring them)
        pending = {o: f for o, f in self.previous.items() if int(o) > self.highest}
        pending.update(self.pending)
        return {"offset": self.offset, "pending": pending, "next": self.next}


@dataclass(slots=True)
class _Step:
    status: Status
    writes: dict[str, Any] = field(default_factory=dict)
    figures: list[int] | None = None  # [positive, answers] of the skill after an answer
    legacy_next: int | None = None


class _Overlay:
    """Reads through this batch's writes of one partition to the stored values."""

    __slots__ = ("dirty", "read")

    def __init__(self, dirty: dict[str, Any], read: Read) -> None:
        self.dirty = dirty
        self.read = read

    def get(self, key: str) -> Any:
        dirty = self.dirty
        return dirty[key] if key in dirty else self.read(key)


def _apply_one(
    view: _Overlay, rec: FactRecord, meta: _Meta, window_seconds: int, max_windows: int, legacy_ids: int
) -> _Step:
    fact = rec.fact
    p = rec.partition
    if rec.offset <= meta.offset:
        figures = meta.previous.get(str(rec.offset))
        return _Step("redelivered", figures=figures)
    check_fact(fact)
    writes: dict[str, Any] = {}
    legacy_next: int | None = None
    dk = legacy_key(p, fact.fact_id)
    if view.get(dk) is not None:
        return _Step("duplicate")
    if fact.src is not None:
        wk = watermark_key(p, fact.src.topic, fact.src.partition)
        mark = [fact.src.offset, fact.src.index]
        seen = view.get(wk)
        if seen is not None and mark <= list(seen):
            return _Step("duplicate")
        writes[wk] = mark
    else:
        slot = meta.next % legacy_ids
        rk = ring_key(p, slot)
        evicted = view.get(rk)
        if evicted is not None:
            writes[legacy_key(p, str(evicted))] = None
        writes[dk] = slot
        writes[rk] = fact.fact_id
        legacy_next = meta.next + 1

    cell = cell_of(fact)
    tk = total_key(cell)
    writes[tk] = bump(view.get(tk), fact)

    sk = skill_key(fact.skill)
    stored = view.get(sk)
    start = window_start(fact.timestamp, window_seconds)
    newest = stored.get("newest") if stored and stored.get("size") == window_seconds else None
    newest = start if newest is None else max(int(newest), start)
    skill_counts = bump(stored["c"] if stored else None, fact)
    writes[sk] = {"c": skill_counts, "newest": newest, "size": window_seconds}

    if start > newest - max_windows * window_seconds:  # else too late for any kept window: totals only
        wk = window_key(window_slot(start, window_seconds, max_windows), cell)
        cur = view.get(wk)
        same = cur is not None and cur.get("start") == start and cur.get("size") == window_seconds
        writes[wk] = {"start": start, "size": window_seconds, "c": bump(cur["c"] if same else None, fact)}

    figures = None
    if fact.fact == "answer":
        figures = [skill_counts[4] + skill_counts[5], sum(skill_counts[1:])]
    return _Step("counted", writes, figures, legacy_next)


def apply_batch(
    read: Read,
    records: Sequence[FactRecord],
    *,
    window_seconds: int,
    max_windows: int = MAX_WINDOWS,
    legacy_ids: int = LEGACY_IDS,
    budget: int = WRITE_BUDGET,
) -> Batch:
    """Fold `records` (in order) over the stored values `read(key)` (None: absent). Pure.

    A record whose fact cannot be counted, or whose processing raises, gets a `failed` outcome and
    changes nothing; the others go on. The batch stops after the record that brings a partition's
    estimated write size over `budget`, so its writes fit one Kafka record batch; the caller applies
    the rest in a next batch (`Batch.consumed` says how many were taken)."""
    batch = Batch()
    metas: dict[int, _Meta] = {}
    views: dict[int, _Overlay] = {}
    estimate: dict[int, int] = {}
    for rec in records:
        p = rec.partition
        meta = metas.get(p)
        if meta is None:
            meta = metas[p] = _Meta(read(meta_key(p)))
            views[p] = _Overlay(batch.writes.setdefault(p, {}), read)
            estimate[p] = len(meta_key(p)) + RECORD_ESTIMATE
        view = views[p]
        try:
            step = _apply_one(view, rec, meta, window_seconds, max_windows, legacy_ids)
        except Exception as exc:  # noqa: BLE001 - one bad fact never stops the stage: it is dead-lettered
            batch.outcomes.append(Outcome("failed", f"{type(exc).__name__}: {exc}"))
            continue
        dirty = view.dirty
        for key, value in step.writes.items():
            if key not in dirty:
                estimate[p] += len(key.encode()) + RECORD_ESTIMATE
            dirty[key] = value
        if step.figures is not None:
            batch.outputs.append(received_event(rec.fact, *step.figures))
            meta.pending[str(rec.offset)] = step.figures
        if step.legacy_next is not None:
            meta.next = step.legacy_next
        if rec.offset > meta.offset:
            meta.offset = rec.offset
        if rec.offset > meta.highest:
            meta.highest = rec.offset
        meta.touched = True
        batch.outcomes.append(Outcome(step.status))
        if estimate[p] + PENDING_ESTIMATE * (len(meta.pending) + len(meta.previous)) > budget:
            break
    for p, meta in metas.items():
        if meta.touched:
            batch.writes[p][meta_key(p)] = meta.value()
    batch.writes = {p: w for p, w in batch.writes.items() if w}
    return batch


# ---------------------------------------------------------------------------------------------
# Reading: the view every worker keeps of the whole table, and the /csat report


class CellsView:
    """The cells of the whole table, for reports: every `T`, `W` and `S` value, kept current one
    record at a time (`update`, called by the stage's mirror of the changelog). Other keys are
    ignored. Memory: one entry per such key, i.e. cells × (1 + max_windows) + skills."""

    def __init__(self) -> None:
        self.totals: dict[Cell, Counts] = {}
        self.windows: dict[tuple[int, int], dict[Cell, Counts]] = {}  # (size, start) → cell → counts
        self.skills: dict[str, dict[str, Any]] = {}
        self._slots: dict[str, tuple[int, int, Cell]] = {}  # W key → (size, start, cell) it holds

    def __len__(self) -> int:
        return len(self.totals) + len(self._slots) + len(self.skills)

    def update(self, key: str, value: Any) -> bool:
        """Apply one table record (`value` None: deleted). False for keys reports do not use.
        Raises ValueError for a value of the wrong shape (the previous value stays)."""
        kind = key[:2]
        if kind == "T|":
            cell = split_cell(key[2:])
            if value is None:
                self.totals.pop(cell, None)
            else:
                self.totals[cell] = _counts(value)
        elif kind == "W|":
            _, _slot, rest = key.split("|", 2)
            cell = split_cell(rest)
            new = None
            if value is not None:
                if not isinstance(value, dict):
                    raise ValueError("a window value must be an object")
                new = (int(value["size"]), int(value["start"]), _counts(value["c"]))
            old = self._slots.pop(key, None)
            if old is not None:
                cells = self.windows.get(old[:2])
                if cells is not None:
                    cells.pop(old[2], None)
                    if not cells:
                        del self.windows[old[:2]]
            if new is not None:
                self._slots[key] = (new[0], new[1], cell)
                self.windows.setdefault((new[0], new[1]), {})[cell] = new[2]
        elif kind == "S|":
            if value is None:
                self.skills.pop(key[2:], None)
            else:
                if not isinstance(value, dict):
                    raise ValueError("a skill value must be an object")
                self.skills[key[2:]] = {"c": _counts(value["c"]), "newest": value.get("newest"),
                                        "size": value.get("size")}
        else:
            return False
        return True

    def skill_counts(self) -> dict[str, Counts]:
        """All-time counts per skill."""
        return {skill: v["c"] for skill, v in self.skills.items()}

    def window_cells(self, size: int, start: int, max_windows: int = MAX_WINDOWS) -> Iterator[tuple[Cell, Counts]]:
        """The cells of one window, without slots left over from a window the skill has moved past."""
        for cell, counts in self.windows.get((size, start), {}).items():
            skill = self.skills.get(cell[0])
            newest = skill.get("newest") if skill and skill.get("size") == size else None
            if newest is None or start > int(newest) - max_windows * size:
                yield cell, counts

    def window_starts(self, size: int, max_windows: int = MAX_WINDOWS) -> Iterator[int]:
        """Starts of the windows holding current data, newest first."""
        for s, start in sorted((k for k in self.windows if k[0] == size), reverse=True):
            if next(self.window_cells(s, start, max_windows), None) is not None:
                yield start


def _counts(value: Any) -> Counts:
    if not isinstance(value, list) or len(value) != 6 or not all(isinstance(n, int) for n in value):
        raise ValueError("counts must be a list of 6 integers")
    return value


def stats(counts: Sequence[int]) -> dict[str, Any]:
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
    cells: Iterable[tuple[Cell, Sequence[int]]],
    skill: str | None = None,
    page: str | None = None,
    agent: str | None = None,
) -> dict[str, Any]:
    """Overall figures and figures per skill, page and agent of the cells matching the filters."""
    overall = [0, 0, 0, 0, 0, 0]
    by: dict[str, dict[str, Counts]] = {"skill": {}, "page": {}, "agent": {}}
    for (c_skill, c_page, c_agent), counts in cells:
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
    view: CellsView,
    *,
    window_seconds: int,
    partitions: list[int],
    total_partitions: int,
    complete: bool,
    skill: str | None = None,
    page: str | None = None,
    agent: str | None = None,
    window: str | None = None,
    windows: int = DEFAULT_WINDOWS_SHOWN,
    max_windows: int = MAX_WINDOWS,
) -> dict[str, Any]:
    """The `/csat` JSON over the whole table.

    `window`: None (the newest `windows` windows), `"latest"` (the newest one) or a window start in
    epoch seconds. Raises ValueError for a window start that is not aligned."""
    if window == "latest":
        starts = list(islice(view.window_starts(window_seconds, max_windows), 1))
    elif window is not None:
        wanted = int(window)
        if wanted % window_seconds:
            raise ValueError(f"window {wanted} is not a multiple of window_seconds {window_seconds}")
        starts = [wanted]
    else:
        starts = list(islice(view.window_starts(window_seconds, max_windows), max(0, windows)))
    return {
        "window_seconds": window_seconds,
        "partitions": sorted(partitions),
        "total_partitions": total_partitions,
        "complete": complete,
        "filters": {"skill": skill, "page": page, "agent": agent},
        "totals": summarize(view.totals.items(), skill, page, agent),
        "windows": [
            {
                "start": start,
                "end": start + window_seconds,
                **summarize(view.window_cells(window_seconds, start, max_windows), skill, page, agent),
            }
            for start in starts
        ],
    }

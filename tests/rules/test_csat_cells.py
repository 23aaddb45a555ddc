"""CSAT cells, pure: dedupe by source watermark (redelivery, re-emission), fact ids of older
producers, windows, failed records, batch cuts, the report, and the size bound over 1,000,000 facts."""

from __future__ import annotations

import copy
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import islice
from typing import Any

import orjson
import pytest

from schemas.contract import CsatFact, FactSource
from streams.rules.csat_cells import (
    MAX_WINDOWS,
    Batch,
    CellsView,
    FactRecord,
    apply_batch,
    csat_report,
    meta_key,
    skill_key,
    split_cell,
    stats,
    total_key,
    window_key,
    window_slot,
    window_start,
)

H = 3600
T0 = 1_700_000_000_000  # epoch ms
SRC = "t.messenger.events.split"


def fact(kind: str, conv: str, *, skill: str = "billing", page: str = "P1", agent: str | None = "a1",
         score: int | None = None, ts: int = T0, src: tuple[str, int, int, int] | None = None,
         mid: str | None = None) -> CsatFact:
    return CsatFact(
        fact=kind,  # type: ignore[arg-type]
        fact_id=f"{conv}:{'survey' if kind == 'survey_sent' else 'answer'}",
        conversation_id=conv, page_id=page, psid=f"u-{conv}", skill=skill, agent_id=agent, score=score,
        locale="en_US", timestamp=ts, mid=mid,
        src=None if src is None else FactSource(topic=src[0], partition=src[1], offset=src[2], index=src[3]),
    )


class Store:
    """The table as a dict; `run` applies records like the stage does (all of a batch, cut or not)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def read(self, key: str) -> Any:
        return self.data.get(key)

    def commit(self, batch: Batch) -> None:
        for writes in batch.writes.values():
            for key, value in writes.items():
                if value is None:
                    self.data.pop(key, None)
                else:
                    self.data[key] = value

    def run(self, records: list[FactRecord], **kw: Any) -> tuple[list[str], list[dict[str, Any]]]:
        statuses: list[str] = []
        events: list[dict[str, Any]] = []
        kw.setdefault("window_seconds", H)
        while records:
            batch = apply_batch(self.read, records, **kw)
            self.commit(batch)
            statuses += [o.status for o in batch.outcomes]
            events += [o.value for o in batch.outputs]
            records = records[batch.consumed:]
        return statuses, events


def recs(facts: list[CsatFact], partition: int = 0, first_offset: int = 0) -> list[FactRecord]:
    return [FactRecord(f, partition, first_offset + i) for i, f in enumerate(facts)]


def conversation(conv: str, score: int | None, src_offset: int, **kw: Any) -> list[CsatFact]:
    """A survey, and its answer when `score` is given, from two inputs of one source partition."""
    out = [fact("survey_sent", conv, src=(SRC, 0, src_offset, 0), **kw)]
    if score is not None:
        out.append(fact("answer", conv, score=score, src=(SRC, 0, src_offset + 1, 0), ts=T0 + 1000, **kw))
    return out


# --- keys --------------------------------------------------------------------------------------


def test_keys_and_windows() -> None:
    assert split_cell("s|p|agent|with|bars") == ("s", "p", "agent|with|bars")
    assert total_key(("s", "p", "a|b")) == "T|s|p|a|b"
    assert window_start(T0, H) == (T0 // 1000) // H * H and window_start(T0, H) % H == 0
    start = window_start(T0, H)
    assert window_slot(start, H) == window_slot(start + MAX_WINDOWS * H, H) != window_slot(start + H, H)


# --- dedupe ------------------------------------------------------------------------------------


def test_counts_each_fact_once_across_redelivery_and_reemission() -> None:
    store = Store()
    facts = conversation("c1", 5, 10) + conversation("c2", 2, 20) + conversation("c3", None, 30)
    statuses, events = store.run(recs(facts))
    assert statuses == ["counted"] * 5
    assert store.data[skill_key("billing")]["c"] == [3, 0, 1, 0, 0, 1]
    assert store.data[total_key(("billing", "P1", "a1"))] == [3, 0, 1, 0, 0, 1]
    assert [(e["score"], e["csat_percent"], e["csat_positive"], e["csat_answers"]) for e in events] == [
        (5, 100.0, 1, 1), (2, 50.0, 1, 2)]
    before = copy.deepcopy(store.data)

    # the conversation stage re-emits the same facts (same src) at new csat.facts offsets: duplicates
    statuses, events = store.run(recs(facts, first_offset=100))
    assert statuses == ["duplicate"] * 5 and events == []
    assert {k: v for k, v in store.data.items() if not k.startswith("P|")} == {
        k: v for k, v in before.items() if not k.startswith("P|")}

    # Kafka redelivers records already applied (offset ≤ applied): not counted, nothing re-sent
    # (their events belong to a batch whose outputs were acked before the next batch began)
    statuses, events = store.run(recs(facts))
    assert statuses == ["redelivered"] * 5 and events == []
    assert store.data[skill_key("billing")]["c"] == [3, 0, 1, 0, 0, 1]


def test_redelivered_last_batch_reemits_its_events_with_the_same_ids_and_figures() -> None:
    store = Store()
    first = recs(conversation("c1", 4, 10) + conversation("c2", 1, 20))
    _, events = store.run(first)
    assert store.data[meta_key(0)]["pending"] == {"1": [1, 1], "3": [1, 2]}
    # crash after the state was written, before the events reached Kafka: the batch comes again,
    # together with a new fact; only the two answers of the last batch are emitted again, unchanged
    again = [*first, FactRecord(fact("answer", "c3", score=5, src=(SRC, 0, 40, 0)), 0, 4)]
    statuses, events2 = store.run(again)
    assert statuses == ["redelivered"] * 4 + ["counted"]
    assert events2[:2] == events
    assert events2[2]["csat_answers"] == 3 and events2[2]["csat_positive"] == 2
    assert len({e["event_id"] for e in events2}) == 3
    # those re-sent events stay pending until a batch after them is written
    assert set(store.data[meta_key(0)]["pending"]) == {"1", "3", "4"}
    store.run(recs([fact("survey_sent", "c9", src=(SRC, 0, 50, 0))], first_offset=5))
    assert store.data[meta_key(0)]["pending"] == {}


def test_pending_survives_a_batch_cut_during_redelivery() -> None:
    store = Store()
    first = recs([fact("answer", f"c{i}", score=5, src=(SRC, 0, i, 0)) for i in range(6)])
    _, events = store.run(first)
    # the redelivery is applied in batches of one record (budget 0): every event still comes back
    _, again = store.run(first, budget=0)
    assert again == events


def test_watermark_is_per_source_partition_and_orders_by_offset_then_index() -> None:
    store = Store()
    facts = [
        fact("survey_sent", "a", src=(SRC, 0, 5, 0)),
        fact("survey_sent", "b", src=(SRC, 0, 5, 1)),  # second fact of the same input
        fact("survey_sent", "c", src=(SRC, 1, 2, 0)),  # another source partition, lower offset
        fact("survey_sent", "d", src=("t.agent.actions", 0, 1, 0)),  # another source topic
        fact("survey_sent", "b", src=(SRC, 0, 5, 1)),  # re-emitted
        fact("survey_sent", "a", src=(SRC, 0, 5, 0)),  # re-emitted, behind the watermark
        fact("survey_sent", "e", src=(SRC, 0, 6, 0)),
    ]
    statuses, _ = store.run(recs(facts))
    assert statuses == ["counted"] * 4 + ["duplicate"] * 2 + ["counted"]
    assert store.data[skill_key("billing")]["c"][0] == 5
    assert store.data["O|0|0|" + SRC] == [6, 0]
    assert store.data["O|0|1|" + SRC] == [2, 0]


def test_watermarks_are_kept_per_aggregator_partition() -> None:
    store = Store()
    a = fact("survey_sent", "a", skill="billing", src=(SRC, 0, 7, 0))
    b = fact("survey_sent", "b", skill="support", src=(SRC, 0, 3, 0))  # same source, another skill's partition
    statuses, _ = store.run([FactRecord(a, 0, 0), FactRecord(b, 1, 0)])
    assert statuses == ["counted", "counted"]
    assert store.data["O|0|0|" + SRC] == [7, 0] and store.data["O|1|0|" + SRC] == [3, 0]


def test_facts_without_src_are_deduplicated_by_fact_id_in_a_bounded_ring() -> None:
    store = Store()
    old = [fact("survey_sent", f"c{i}") for i in range(5)]
    statuses, _ = store.run(recs(old), legacy_ids=3)
    assert statuses == ["counted"] * 5
    assert sorted(k for k in store.data if k.startswith(("D|", "R|"))) == [
        "D|0|c2:survey", "D|0|c3:survey", "D|0|c4:survey", "R|0|0", "R|0|1", "R|0|2"]
    # the last three fact ids are known: duplicates; the evicted ones would be counted again
    statuses, _ = store.run(recs([old[4], old[2], old[0]], first_offset=10), legacy_ids=3)
    assert statuses == ["duplicate", "duplicate", "counted"]
    # the same fact re-emitted with src after an upgrade is recognised by its fact id
    statuses, _ = store.run(recs([fact("survey_sent", "c4", src=(SRC, 0, 1, 0))], first_offset=20), legacy_ids=3)
    assert statuses == ["duplicate"]


# --- windows -------------------------------------------------------------------------------------


def test_windows_are_a_bounded_ring_and_late_facts_count_in_totals_only() -> None:
    store = Store()
    facts = [fact("survey_sent", f"c{i}", ts=T0 + i * H * 1000, src=(SRC, 0, i, 0)) for i in range(5)]
    store.run(recs(facts), max_windows=3)
    w = {k: v for k, v in store.data.items() if k.startswith("W|")}
    assert len(w) == 3  # five windows written, three slots: the two oldest overwritten in place
    assert sorted(v["start"] for v in w.values()) == [window_start(T0, H) + k * H for k in (2, 3, 4)]
    assert store.data[total_key(("billing", "P1", "a1"))][0] == 5
    # a late fact for a window older than the kept ones: totals only, no window touched
    store.run(recs([fact("survey_sent", "late", ts=T0, src=(SRC, 0, 10, 0))], first_offset=5), max_windows=3)
    assert {k: v for k, v in store.data.items() if k.startswith("W|")} == w
    assert store.data[total_key(("billing", "P1", "a1"))][0] == 6
    # a late fact for a kept window counts in it
    store.run(recs([fact("survey_sent", "late2", ts=T0 + 2 * H * 1000, src=(SRC, 0, 11, 0))], first_offset=6),
              max_windows=3)
    slot = window_key(window_slot(window_start(T0, H) + 2 * H, H, 3), ("billing", "P1", "a1"))
    assert store.data[slot]["c"][0] == 2
    # another window size: the skill's windows start afresh, totals stay
    store.run(recs([fact("survey_sent", "c99", ts=T0, src=(SRC, 0, 12, 0))], first_offset=7),
              window_seconds=60, max_windows=3)
    assert store.data[skill_key("billing")]["size"] == 60
    assert store.data[skill_key("billing")]["newest"] == window_start(T0, 60)
    assert store.data[total_key(("billing", "P1", "a1"))][0] == 8


def test_report_ignores_slots_the_skill_has_moved_past() -> None:
    store = Store()
    # agent a2 answered only in the first hour; a1 goes on for four hours: a2's slot is stale
    facts = [fact("survey_sent", "x", agent="a2", ts=T0, src=(SRC, 0, 0, 0))]
    facts += [fact("survey_sent", f"c{i}", ts=T0 + i * H * 1000, src=(SRC, 0, i + 1, 0)) for i in range(1, 5)]
    store.run(recs(facts), max_windows=3)
    view = view_of(store)
    starts = list(view.window_starts(H, 3))
    assert starts == [window_start(T0, H) + k * H for k in (4, 3, 2)]
    report = csat_report(view, window_seconds=H, partitions=[0], total_partitions=1, complete=True,
                         max_windows=3, agent="a2")
    assert report["totals"]["all"]["surveys_sent"] == 1
    assert all(w["all"]["surveys_sent"] == 0 for w in report["windows"])


# --- failures and purity ---------------------------------------------------------------------------


def test_a_failing_record_changes_nothing_and_the_others_go_on() -> None:
    store = Store()
    bad_answer = fact("answer", "c1", score=3).model_copy(update={"score": None})
    bad_skill = fact("survey_sent", "c2", skill="bill|ing")
    long_agent = fact("survey_sent", "c3", agent="x" * 300)
    good = fact("survey_sent", "c4", src=(SRC, 0, 1, 0))
    statuses, _ = store.run(recs([bad_answer, bad_skill, long_agent, good]))
    assert statuses == ["failed", "failed", "failed", "counted"]
    assert store.data[skill_key("billing")]["c"] == [1, 0, 0, 0, 0, 0]
    batch = apply_batch(store.read, recs([bad_answer], first_offset=9), window_seconds=H)
    assert batch.writes == {} and batch.outputs == []
    assert batch.outcomes[0].error and "without a score" in batch.outcomes[0].error


def test_apply_batch_is_pure() -> None:
    store = Store()
    store.run(recs(conversation("c1", 5, 0)))
    snapshot = copy.deepcopy(store.data)
    batch = apply_batch(store.read, recs(conversation("c2", 4, 10), first_offset=2), window_seconds=H)
    assert store.data == snapshot
    again = apply_batch(store.read, recs(conversation("c2", 4, 10), first_offset=2), window_seconds=H)
    assert again == batch


def test_cut_batches_give_the_same_state_as_one_batch() -> None:
    facts = random_facts(random.Random(7), 3000, skills=3, pages=2, agents=4, hours=60, legacy_share=0.1)
    records = [FactRecord(f, int(f.skill[1:]) % 2, i) for i, f in enumerate(facts)]
    whole, cut = Store(), Store()
    s1, e1 = whole.run(records, budget=10**9)
    s2, e2 = cut.run(records, budget=2000)
    assert s1 == s2 and e1 == e2
    strip = {k: v for k, v in whole.data.items() if not k.startswith("P|")}
    assert strip == {k: v for k, v in cut.data.items() if not k.startswith("P|")}


def test_write_estimate_bounds_the_encoded_batch() -> None:
    facts = random_facts(random.Random(3), 2000, skills=2, pages=2, agents=50, hours=100, legacy_share=0.3)
    records = recs(facts)
    store = Store()
    while records:
        batch = apply_batch(store.read, records, window_seconds=H, budget=16 * 1024)
        for writes in batch.writes.values():
            encoded = sum(len(k.encode()) + len(orjson.dumps(v)) + 20 for k, v in writes.items())
            assert encoded <= 16 * 1024 + 2000  # budget plus at most one record's writes
        store.commit(batch)
        records = records[batch.consumed:]


# --- csat_received ---------------------------------------------------------------------------------


def test_csat_received_carries_the_skills_exact_figures() -> None:
    store = Store()
    rng = random.Random(11)
    facts = []
    for i in range(200):
        skill = rng.choice(["billing", "support"])
        facts.append(fact("answer", f"c{i}", skill=skill, page="P1", agent=rng.choice(["a1", "a2", None]),
                          score=rng.randint(1, 5), src=(SRC, 0, i, 0), mid=f"m{i}"))
    _, events = store.run(recs(facts))
    seen: dict[str, list[int]] = defaultdict(list)
    for f, e in zip(facts, events, strict=True):
        seen[f.skill].append(f.score or 0)
        positive = sum(1 for s in seen[f.skill] if s >= 4)
        assert e == {
            "type": "csat_received", "event_id": f"{f.fact_id}:received", "conversation_id": f.conversation_id,
            "page_id": "P1", "psid": f.psid, "skill": f.skill, "timestamp": f.timestamp, "score": f.score,
            "agent_id": f.agent_id, "csat_percent": round(100 * positive / len(seen[f.skill]), 2),
            "csat_positive": positive, "csat_answers": len(seen[f.skill]), "mid": f.mid,
        }


# --- report ------------------------------------------------------------------------------------------


def view_of(store: Store) -> CellsView:
    view = CellsView()
    for key, value in store.data.items():
        view.update(key, value)
    return view


def test_report_matches_an_independent_count() -> None:
    rng = random.Random(5)
    facts = random_facts(rng, 4000, skills=3, pages=3, agents=5, hours=30, legacy_share=0.2)
    dupes = rng.sample(facts, 400)
    store = Store()
    store.run(recs(facts + dupes))
    view = view_of(store)

    want_totals: dict[str, Counter[str]] = defaultdict(Counter)
    newest = max(window_start(f.timestamp, H) for f in facts)
    kept = [newest - k * H for k in range(24)]
    want_windows: dict[int, Counter[str]] = defaultdict(Counter)
    for f in facts:
        idx = "0" if f.fact == "survey_sent" else str(f.score)
        want_totals[f.skill][idx] += 1
        want_totals["*"][idx] += 1
        if window_start(f.timestamp, H) in kept:
            want_windows[window_start(f.timestamp, H)][idx] += 1

    def as_stats(c: Counter[str]) -> dict[str, Any]:
        return stats([c[str(i)] for i in range(6)])

    report = csat_report(view, window_seconds=H, partitions=[0], total_partitions=1, complete=True)
    assert report["totals"]["all"] == as_stats(want_totals["*"])
    for skill in ("s0", "s1", "s2"):
        assert report["totals"]["skill"][skill] == as_stats(want_totals[skill])
    assert [w["start"] for w in report["windows"]] == sorted(want_windows, reverse=True)
    for w in report["windows"]:
        assert w["all"] == as_stats(want_windows[w["start"]])

    latest = csat_report(view, window_seconds=H, partitions=[0], total_partitions=1, complete=True, window="latest")
    assert [w["start"] for w in latest["windows"]] == [newest]
    one = csat_report(view, window_seconds=H, partitions=[0], total_partitions=1, complete=False,
                      window=str(newest - H), skill="s1", agent="a1")
    assert one["complete"] is False and one["filters"] == {"skill": "s1", "page": None, "agent": "a1"}
    assert one["windows"][0]["all"] == as_stats(Counter(
        "0" if f.fact == "survey_sent" else str(f.score) for f in facts
        if f.skill == "s1" and f.agent_id == "a1" and window_start(f.timestamp, H) == newest - H))
    with pytest.raises(ValueError, match="multiple"):
        csat_report(view, window_seconds=H, partitions=[0], total_partitions=1, complete=True, window="17")


def test_view_follows_overwrites_and_deletes_and_refuses_bad_values() -> None:
    view = CellsView()
    cell = ("s", "p", "a")
    assert view.update(window_key(1, cell), {"start": 3600, "size": H, "c": [1, 0, 0, 0, 0, 0]})
    assert view.update(window_key(1, cell), {"start": 3600 * 49, "size": H, "c": [2, 0, 0, 0, 0, 0]})
    assert view.windows == {(H, 3600 * 49): {cell: [2, 0, 0, 0, 0, 0]}}
    assert view.update(window_key(1, cell), None) and view.windows == {}
    assert not view.update("O|0|0|x", [1, 0])
    with pytest.raises(ValueError):
        view.update(total_key(cell), {"not": "counts"})
    assert view.totals == {}


# --- the bound: 1,000,000 facts -----------------------------------------------------------------------


def iter_facts(rng: random.Random, n: int, *, skills: int, pages: int, agents: int, hours: int,
               legacy_share: float) -> Iterator[CsatFact]:
    """n facts (surveys, 70% answered) spread over `hours` hours, from 3 source topics × 8
    partitions, each source in offset order; a share without `src` (older producers)."""
    next_offset: dict[tuple[str, int], int] = defaultdict(int)
    topics = [SRC, "t.agent.actions", "t.conversations.ticks"]
    made = 0
    i = 0
    while made < n:
        i += 1
        s = rng.randrange(skills)
        skill = f"s{s}"
        page = f"p{s}-{rng.randrange(pages)}"
        agent = f"a{rng.randrange(agents)}" if rng.random() > 0.05 else None
        ts = T0 + int(i / n * hours * 3_600_000)
        kinds = [("survey_sent", None)] + ([("answer", rng.randint(1, 5))] if rng.random() < 0.7 else [])
        for kind, score in kinds[: n - made]:
            src = None
            if rng.random() >= legacy_share:
                topic, part = rng.choice(topics), rng.randrange(8)
                next_offset[(topic, part)] += rng.randint(1, 3)
                src = FactSource.model_construct(topic=topic, partition=part, offset=next_offset[(topic, part)], index=0)
            made += 1
            yield CsatFact.model_construct(
                fact=kind, fact_id=f"conv{i}:{'survey' if score is None else 'answer'}", conversation_id=f"conv{i}",
                page_id=page, psid=f"u{i}", skill=skill, agent_id=agent, score=score, locale="en_US", timestamp=ts,
                src=src, mid=None,
            )


def random_facts(rng: random.Random, n: int, **kw: Any) -> list[CsatFact]:
    return list(iter_facts(rng, n, **kw))


def test_no_value_over_64_kb_after_a_million_facts() -> None:
    """1,000,000 facts over 30 days through `apply_batch` in stage-sized batches on 8 partitions:
    every value ever written stays far below 64 KB, and the number of keys is bounded by cells,
    windows, sources and the legacy ring, not by the number of facts."""
    n = 1_000_000
    started = time.monotonic()
    facts = iter_facts(random.Random(2024), n, skills=16, pages=5, agents=40, hours=30 * 24, legacy_share=0.05)
    offsets = [0] * 8
    store = Store()
    largest = (0, "")
    cells: set[tuple[str, str, str]] = set()
    by_skill: dict[str, list[int]] = defaultdict(lambda: [0] * 6)
    while chunk := [FactRecord(f, int(f.skill[1:]) % 8, 0) for f in islice(facts, 256)]:
        for j, rec in enumerate(chunk):  # stage-like offsets per partition
            chunk[j] = FactRecord(rec.fact, rec.partition, offsets[rec.partition])
            offsets[rec.partition] += 1
            f = rec.fact
            cells.add((f.skill, f.page_id, f.agent_id or "-"))
            by_skill[f.skill][0 if f.fact == "survey_sent" else (f.score or 0)] += 1
        while chunk:
            batch = apply_batch(store.read, chunk, window_seconds=H)
            for writes in batch.writes.values():
                for key, value in writes.items():
                    if value is not None and key[0] in "PS":  # the values that can grow within a run
                        size = len(orjson.dumps(value))
                        if size > largest[0]:
                            largest = (size, key)
            store.commit(batch)
            chunk = chunk[batch.consumed:]
    for key, value in store.data.items():  # T/W/O/D/R: fixed shapes, counts only grow: the final ones are largest
        size = len(orjson.dumps(value))
        if size > largest[0]:
            largest = (size, key)
    elapsed = time.monotonic() - started

    kinds = Counter(k[0] for k in store.data)
    print(f"\n1M facts: {len(store.data)} keys {dict(kinds)}, {len(cells)} cells, "
          f"largest value {largest[0]} bytes ({largest[1]!r}), {elapsed:.1f} s")
    assert sum(offsets) == n
    assert largest[0] < 64 * 1024
    assert largest[0] < 16 * 1024  # the `pending` of a 256-fact batch is the largest; counts stay tiny
    assert kinds["T"] == len(cells)
    assert kinds["W"] <= len(cells) * MAX_WINDOWS
    assert kinds["S"] == 16 and kinds["P"] == 8
    assert kinds["O"] <= 8 * 3 * 8  # aggregator partitions × source topics × source partitions
    assert kinds["D"] <= 8 * 10_000 and kinds["R"] == kinds["D"]
    assert {s: store.data[skill_key(s)]["c"] for s in by_skill} == dict(by_skill)  # and the counts are exact


def test_the_largest_value_a_batch_can_write_is_far_below_64_kb() -> None:
    """Worst case for `P|<p>`: a full batch of answers on one partition at 13-digit offsets, with
    every skill figure in the millions, then a redelivery of it carrying all its entries along."""
    store = Store()
    big = 10**12
    store.data[skill_key("billing")] = {"c": [10**9] * 6, "newest": None, "size": H}
    answers = [FactRecord(fact("answer", f"c{i}", score=5, src=(SRC, 0, big + i, 0)), 0, big + i) for i in range(256)]
    store.run(answers)
    full = store.data[meta_key(0)]
    assert len(full["pending"]) == 256
    size = len(orjson.dumps(full))
    assert size < 16 * 1024, size
    # redelivered from the middle, with a new answer: the re-sent entries plus the new one
    store.run(answers[128:] + [FactRecord(fact("answer", "n", score=1, src=(SRC, 0, 2 * big, 0)), 0, 2 * big)])
    assert len(store.data[meta_key(0)]["pending"]) == 129
    print(f"\nlargest P value: {size} bytes for 256 pending answers")

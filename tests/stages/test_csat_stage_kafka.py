"""CSAT aggregates on real Kafka: facts in → `/csat` and `/metrics` match an independent count,
each fact counted once, unchanged across worker restarts (clean and killed) and re-sent facts."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kafkatools import KafkaIO, Worker

pytestmark = pytest.mark.kafka

H = 3600
NOW_MS = int(time.time() * 1000)
HOUR_AGO_MS = NOW_MS - H * 1000


def _fact(kind: str, conv: str, page: str, skill: str, agent: str | None, ts: int, score: int | None = None) -> dict[str, Any]:
    return {
        "fact": kind,
        "fact_id": f"{conv}:{'survey' if kind == 'survey_sent' else 'answer'}",
        "conversation_id": conv,
        "page_id": page,
        "psid": f"psid-{conv}",
        "skill": skill,
        "agent_id": agent,
        "score": score,
        "locale": "en_US",
        "timestamp": ts,
    }


def _facts() -> list[dict[str, Any]]:
    """Two skills, two pages, three agents (one fact without agent), two hourly windows."""
    out: list[dict[str, Any]] = []
    plan = [
        # conv, page, skill, agent, ts, score (None: no answer)
        ("c1", "1691462197845448", "billing", "a1", HOUR_AGO_MS, 5),
        ("c2", "1691462197845448", "billing", "a1", HOUR_AGO_MS, 4),
        ("c3", "1691462197845448", "billing", "a1", NOW_MS, None),
        ("c4", "1691462197845448", "billing", "a2", NOW_MS, 2),
        ("c5", "298733926841562", "support", "a3", HOUR_AGO_MS, 3),
        ("c6", "298733926841562", "support", "a3", NOW_MS, 5),
        ("c7", "298733926841562", "support", "a2", NOW_MS, None),
        ("c8", "298733926841562", "support", None, NOW_MS, 1),
    ]
    for conv, page, skill, agent, ts, score in plan:
        out.append(_fact("survey_sent", conv, page, skill, agent, ts))
        if score is not None:
            out.append(_fact("answer", conv, page, skill, agent, ts + 1000, score))
    return out


def expected_report(facts: list[dict[str, Any]]) -> dict[str, Any]:
    """What /csat must say, computed here without the stage's code: each fact id once."""
    seen: set[str] = set()
    groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"surveys_sent": 0, "scores": Counter()}
    )
    windows: dict[int, dict[tuple[str, str], dict[str, Any]]] = defaultdict(
        lambda: defaultdict(lambda: {"surveys_sent": 0, "scores": Counter()})
    )
    for f in facts:
        if f["fact_id"] in seen:
            continue
        seen.add(f["fact_id"])
        start = f["timestamp"] // 1000 // H * H
        dims = [("all", "all"), ("skill", f["skill"]), ("page", f["page_id"]), ("agent", f["agent_id"] or "-")]
        for target in (groups, windows[start]):
            for dim in dims:
                if f["fact"] == "survey_sent":
                    target[dim]["surveys_sent"] += 1
                else:
                    target[dim]["scores"][f["score"]] += 1

    def figures(g: dict[str, Any]) -> dict[str, Any]:
        answers = sum(g["scores"].values())
        positive = g["scores"][4] + g["scores"][5]
        return {
            "surveys_sent": g["surveys_sent"],
            "answers": answers,
            "positive": positive,
            "scores": {str(s): g["scores"][s] for s in range(1, 6)},
            "csat_percent": round(100 * positive / answers, 2) if answers else None,
            "response_rate": round(answers / g["surveys_sent"], 4) if g["surveys_sent"] else None,
        }

    def shape(gs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"all": figures(gs[("all", "all")]), "skill": {}, "page": {}, "agent": {}}
        for (dim, name), g in sorted(gs.items()):
            if dim != "all":
                out[dim][name] = figures(g)
        return out

    return {
        "totals": shape(groups),
        "windows": [{"start": s, "end": s + H, **shape(windows[s])} for s in sorted(windows, reverse=True)],
    }


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def metric_samples(w: Worker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(f"{w.web_url}/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("messenger_csat"):
            for sm in fam.samples:
                out[(sm.name, tuple(sorted(sm.labels.items())))] = sm.value
    return out


async def wait_report(w: Worker, want: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Poll /csat until its totals and windows equal `want` and all partitions are covered."""
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        try:
            status, body = await get_json(f"{w.web_url}/csat")
        except aiohttp.ClientError:
            status = 0
        if status == 200 and body["complete"] and body["totals"] == want["totals"] and body["windows"] == want["windows"]:
            return dict(body)
        await asyncio.sleep(0.5)
    raise AssertionError(f"/csat never matched.\nwanted: {want}\nlast: {body}\nlog:\n{w.log_text()[-3000:]}")


async def wait_gauges(w: Worker, want: dict[tuple[str, tuple[tuple[str, str], ...]], float], timeout: float = 30.0) -> dict[Any, float]:
    deadline = time.monotonic() + timeout
    got: dict[Any, float] = {}
    while time.monotonic() < deadline:
        got = await metric_samples(w)
        if all(got.get(k) == pytest.approx(v) for k, v in want.items()):
            return got
        await asyncio.sleep(0.5)
    missing = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != pytest.approx(v)}
    raise AssertionError(f"metrics never matched: {missing}")


def expected_gauges(report: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    want: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for skill, fig in report["totals"]["skill"].items():
        lab = (("skill", skill),)
        want[("messenger_csat_aggregate_surveys", lab)] = fig["surveys_sent"]
        want[("messenger_csat_percent", lab)] = 100 * fig["positive"] / fig["answers"]
        want[("messenger_csat_response_rate", lab)] = fig["answers"] / fig["surveys_sent"]
        for score, n in fig["scores"].items():
            want[("messenger_csat_aggregate_answers", (("score", score), ("skill", skill)))] = n
    return want


def counter(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_csat_aggregates_exact_across_duplicates_and_restarts(
    make_worker: Callable[..., Worker], kafka: KafkaIO
) -> None:
    w = make_worker(partitions=2)
    topic = w.topic("csat.facts")
    facts = _facts()
    unique = len({f["fact_id"] for f in facts})
    # a re-emitted answer and a re-emitted survey (same fact ids, later offsets), plus one bad record
    dupes = [next(f for f in facts if f["fact_id"] == "c1:answer"), next(f for f in facts if f["fact_id"] == "c5:survey")]
    for f in [*facts, *dupes]:
        await kafka.send(topic, f, key=f"{f['page_id']}:{f['psid']}")
    await kafka.send(topic, b'{"fact": "answer", "nope": 1}', key="x:y")

    want = expected_report(facts)
    assert want["totals"]["all"]["surveys_sent"] == 8 and want["totals"]["all"]["answers"] == 6
    assert len(want["windows"]) == 2
    report = await wait_report(w, want)
    assert report["partitions"] == [0, 1] and report["total_partitions"] == 2
    assert report["window_seconds"] == H

    # Prometheus: counters once per counted fact, gauges from the aggregates
    samples = await wait_gauges(w, expected_gauges(want))
    for skill, fig in want["totals"]["skill"].items():
        assert counter(samples, "messenger_csat_surveys_sent_total", skill=skill) == fig["surveys_sent"]
        for score, n in fig["scores"].items():
            assert counter(samples, "messenger_csat_answers_total", skill=skill, score=score) == n
    assert counter(samples, "messenger_csat_facts_skipped_total", reason="duplicate") == len(dupes)
    assert counter(samples, "messenger_csat_facts_skipped_total", reason="invalid") == 1
    dead = await kafka.read_json(w.topic("messenger.dlq"), min_count=1)
    assert [d["reason"] for d in dead] == ["processing_error"]
    assert "invalid csat fact" in dead[0]["error"]

    # query filters
    status, body = await get_json(f"{w.web_url}/csat?skill=support&window=latest")
    assert status == 200
    assert list(body["totals"]["skill"]) == ["support"]
    assert body["totals"]["all"] == want["totals"]["skill"]["support"]
    assert [x["start"] for x in body["windows"]] == [want["windows"][0]["start"]]
    status, body = await get_json(f"{w.web_url}/csat?agent=a1&windows=1")
    assert body["totals"]["all"] == want["totals"]["agent"]["a1"]
    assert len(body["windows"]) == 1
    status, body = await get_json(f"{w.web_url}/csat?page=298733926841562&window={want['windows'][1]['start']}")
    assert [x["start"] for x in body["windows"]] == [want["windows"][1]["start"]]
    assert body["windows"][0]["all"]["surveys_sent"] == 1  # c5 only, its duplicate not counted
    status, body = await get_json(f"{w.web_url}/csat?window=yesterday")
    assert status == 400 and "bad query" in body["error"]

    # clean restart: same numbers, recovered from the changelog; nothing counted again
    w.restart()
    after = await wait_report(w, want)
    assert after["totals"] == report["totals"] and after["windows"] == report["windows"]
    samples = await wait_gauges(w, expected_gauges(want))
    assert counter(samples, "messenger_csat_answers_total", skill="billing", score="5") == 0

    # every fact re-sent (new offsets, same fact ids): all skipped as duplicates
    for f in facts:
        await kafka.send(topic, f, key=f"{f['page_id']}:{f['psid']}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples = await metric_samples(w)
        if counter(samples, "messenger_csat_facts_skipped_total", reason="duplicate") >= unique:
            break
        await asyncio.sleep(0.5)
    assert counter(samples, "messenger_csat_facts_skipped_total", reason="duplicate") == unique
    assert not any(k[0] in ("messenger_csat_answers_total", "messenger_csat_surveys_sent_total") and v
                   for k, v in samples.items())
    await wait_report(w, want, timeout=10)

    # killed worker (no clean shutdown, offsets possibly uncommitted): still the same numbers. The
    # killed member stays in the consumer group until its session times out (faust: 60 s), so the
    # new worker gets its partitions only then.
    w.stop(sig=signal.SIGKILL)
    w.start()
    await wait_report(w, want, timeout=150)
    samples = await wait_gauges(w, expected_gauges(want))
    assert not any(k[0] in ("messenger_csat_answers_total", "messenger_csat_surveys_sent_total") and v
                   for k, v in samples.items())

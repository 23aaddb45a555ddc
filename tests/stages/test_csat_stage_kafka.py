"""The CSAT stage on real Kafka, fed with facts produced straight to `csat.facts` (keyed by skill,
with `src`, as the conversation stage writes them): `/csat`, the gauges and `csat_received` match an
independent count, each answer counted once — across re-emitted facts, facts of older producers,
the same facts sent twice, restarts, a SIGKILL mid-stream — and two workers report the same totals."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BASE_CONFIG
from tests.kafkatools import KafkaIO, Worker

pytestmark = pytest.mark.kafka

H = 3600
NOW_MS = int(time.time() * 1000)
HOUR_AGO_MS = NOW_MS - H * 1000
BILLING_PAGE = "1691462197845448"
SUPPORT_PAGE = "298733926841562"
VIP_PAGE = "111111111111111"
# With 4 partitions the skills billing, support, general and vip live on partitions 1, 0, 3 and 2.
FOUR_SKILLS_CONFIG = BASE_CONFIG + f"""
[[pages]]
page_id = "{VIP_PAGE}"
skill = "vip"
locale = "en_US"
"""


class Facts:
    """Facts as the conversation stage writes them: `src` from a source partition in offset order."""

    def __init__(self, prefix: str) -> None:
        self.source = prefix + "messenger.events.split"
        self.offsets: dict[int, int] = defaultdict(int)

    def make(self, kind: str, conv: str, page: str, skill: str, agent: str | None, ts: int,
             score: int | None = None, *, src: bool = True) -> dict[str, Any]:
        part = sum(map(ord, conv)) % 3
        self.offsets[part] += 1
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
            "mid": None if score is None else f"mid-{conv}",
            "src": {"topic": self.source, "partition": part, "offset": self.offsets[part], "index": 0} if src else None,
        }

    def conversations(self, plan: list[tuple[str, str, str, str | None, int, int | None]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for conv, page, skill, agent, ts, score in plan:
            out.append(self.make("survey_sent", conv, page, skill, agent, ts))
            if score is not None:
                out.append(self.make("answer", conv, page, skill, agent, ts + 1000, score))
        return out


PLAN = [
    # conv, page, skill, agent, ts, score (None: no answer)
    ("c1", BILLING_PAGE, "billing", "a1", HOUR_AGO_MS, 5),
    ("c2", BILLING_PAGE, "billing", "a1", HOUR_AGO_MS, 4),
    ("c3", BILLING_PAGE, "billing", "a1", NOW_MS, None),
    ("c4", BILLING_PAGE, "billing", "a2", NOW_MS, 2),
    ("c5", SUPPORT_PAGE, "support", "a3", HOUR_AGO_MS, 3),
    ("c6", SUPPORT_PAGE, "support", "a3", NOW_MS, 5),
    ("c7", SUPPORT_PAGE, "support", "a2", NOW_MS, None),
    ("c8", SUPPORT_PAGE, "support", None, NOW_MS, 1),
]


def expected_report(facts: list[dict[str, Any]]) -> dict[str, Any]:
    """What /csat must say, computed here without the stage's code: each fact id once."""
    seen: set[str] = set()
    groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: {"surveys_sent": 0, "scores": Counter()})
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
        "windows": [{"start": s, "end": s + H, **shape(windows[s])} for s in sorted(windows, reverse=True)][:24],
    }


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def metric_samples(w: Worker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(f"{w.web_url}/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("messenger_csat") or fam.name.startswith("messenger_console"):
            for sm in fam.samples:
                out[(sm.name, tuple(sorted(sm.labels.items())))] = sm.value
    return out


async def wait_report(w: Worker, want: dict[str, Any], partitions: int = 2, timeout: float = 90.0) -> dict[str, Any]:
    """Poll /csat until it is complete and its totals and windows equal `want`."""
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        try:
            status, body = await get_json(f"{w.web_url}/csat")
        except (aiohttp.ClientError, OSError):
            status = 0
        if (status == 200 and body["complete"] and body["totals"] == want["totals"]
                and body["windows"] == want["windows"]):
            assert body["partitions"] == list(range(partitions)) and body["total_partitions"] == partitions
            return dict(body)
        await asyncio.sleep(0.5)
    raise AssertionError(f"/csat never matched.\nwanted: {want}\nlast: {body}\nlog:\n{w.log_text()[-3000:]}")


def expected_gauges(report: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    want: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for skill, fig in report["totals"]["skill"].items():
        lab = (("skill", skill),)
        want[("messenger_csat_aggregate_surveys", lab)] = fig["surveys_sent"]
        if fig["answers"]:
            want[("messenger_csat_percent", lab)] = 100 * fig["positive"] / fig["answers"]
        if fig["surveys_sent"]:
            want[("messenger_csat_response_rate", lab)] = fig["answers"] / fig["surveys_sent"]
        for score, n in fig["scores"].items():
            want[("messenger_csat_aggregate_answers", (("score", score), ("skill", skill)))] = n
    return want


async def wait_gauges(w: Worker, want: dict[Any, float], timeout: float = 30.0) -> dict[Any, float]:
    deadline = time.monotonic() + timeout
    got: dict[Any, float] = {}
    while time.monotonic() < deadline:
        got = await metric_samples(w)
        if all(got.get(k) == pytest.approx(v) for k, v in want.items()):
            return got
        await asyncio.sleep(0.5)
    missing = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != pytest.approx(v)}
    raise AssertionError(f"metrics never matched: {missing}")


def counter(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def send_facts(kafka: KafkaIO, topic: str, facts: list[dict[str, Any]], key: str = "skill") -> None:
    producer = await kafka.producer()
    futures = []
    for f in facts:
        k = f["skill"] if key == "skill" else f"{f['page_id']}:{f['psid']}"
        futures.append(await producer.send(topic, orjson.dumps(f), key=k.encode()))
    await asyncio.gather(*futures)


async def received_events(kafka: KafkaIO, w: Worker, skills: list[str], count: int,
                          timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every csat_received on the skills' topics, once at least `count` distinct event ids arrived."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = []
        for skill in skills:
            events += [e for e in await kafka.read_json(w.topic(f"skill.{skill}"), settle=0.3, timeout=10)
                       if e["type"] == "csat_received"]
        if len({e["event_id"] for e in events}) >= count:
            return events
        await asyncio.sleep(0.5)
    raise AssertionError(f"only {len(events)} csat_received events:\n{w.log_text()[-3000:]}")


def check_received(events: list[dict[str, Any]], facts: list[dict[str, Any]]) -> None:
    """Each counted answer has one event id (a re-sent event is identical); per skill, the k-th
    answer counted says k answers, and the positive count goes up exactly with each 4 or 5: the
    skill's exact figure after counting that answer, whatever order the answers were counted in."""
    answers = {f["fact_id"]: f for f in facts if f["fact"] == "answer"}
    by_id: dict[str, dict[str, Any]] = {}
    for e in events:
        assert by_id.setdefault(e["event_id"], e) == e, "a re-sent csat_received differs from the first"
    assert set(by_id) == {f"{fid}:received" for fid in answers}
    per_skill: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in by_id.values():
        f = answers[e["event_id"].removesuffix(":received")]
        assert (e["skill"], e["score"], e["agent_id"], e["conversation_id"], e["mid"]) == (
            f["skill"], f["score"], f["agent_id"], f["conversation_id"], f["mid"])
        per_skill[e["skill"]].append(e)
    for skill, evs in per_skill.items():
        evs.sort(key=lambda e: e["csat_answers"])
        assert [e["csat_answers"] for e in evs] == list(range(1, len(evs) + 1)), skill
        positive = 0
        for e in evs:
            positive += 1 if e["score"] >= 4 else 0
            assert e["csat_positive"] == positive
            assert e["csat_percent"] == round(100 * positive / e["csat_answers"], 2)


async def test_csat_exact_across_reemitted_legacy_and_repeated_facts_and_restarts(
    make_worker: Callable[..., Worker], kafka: KafkaIO
) -> None:
    w = make_worker(partitions=2)
    topic = w.topic("csat.facts")
    gen = Facts(w.prefix)
    facts = gen.conversations(PLAN)
    # an older producer: facts without src keyed by conversation (forwarded to the skill's partition)
    legacy = gen.conversations([("c9", SUPPORT_PAGE, "support", "a3", NOW_MS, 4)])
    for f in legacy:
        f["src"] = None
    # the conversation stage re-emits two facts (same src, later offsets), the old producer one
    reemitted = [next(f for f in facts if f["fact_id"] == "c1:answer"), facts[0], legacy[1]]
    await send_facts(kafka, topic, facts)
    await send_facts(kafka, topic, legacy, key="conversation")
    await send_facts(kafka, topic, reemitted[:2])
    await send_facts(kafka, topic, reemitted[2:], key="conversation")
    await kafka.send(topic, b'{"fact": "answer", "nope": 1}', key="billing")
    everything = facts + legacy

    want = expected_report(everything)
    assert want["totals"]["all"]["surveys_sent"] == 9 and want["totals"]["all"]["answers"] == 7
    assert len(want["windows"]) == 2
    report = await wait_report(w, want)
    assert report["window_seconds"] == H

    events = await received_events(kafka, w, ["billing", "support"], 7)
    check_received(events, everything)
    last_support = max((e for e in events if e["skill"] == "support"), key=lambda e: e["csat_answers"])
    assert last_support["csat_percent"] == want["totals"]["skill"]["support"]["csat_percent"]

    samples = await wait_gauges(w, expected_gauges(want))
    for skill, fig in want["totals"]["skill"].items():
        assert counter(samples, "messenger_csat_surveys_sent_total", skill=skill) == fig["surveys_sent"]
        for score, n in fig["scores"].items():
            assert counter(samples, "messenger_csat_answers_total", skill=skill, score=score) == n
    assert counter(samples, "messenger_csat_facts_skipped_total", reason="duplicate") == 3
    assert counter(samples, "messenger_csat_facts_skipped_total", reason="invalid") == 1
    assert counter(samples, "messenger_csat_facts_skipped_total", reason="forwarded") == 3
    dead = await kafka.read_json(w.topic("messenger.dlq"), min_count=1)
    assert [d["reason"] for d in dead] == ["processing_error"]
    assert "invalid csat fact" in dead[0]["error"] and '"nope"' in dead[0]["payload"]

    # query filters
    status, body = await get_json(f"{w.web_url}/csat?skill=support&window=latest")
    assert status == 200
    assert list(body["totals"]["skill"]) == ["support"]
    assert body["totals"]["all"] == want["totals"]["skill"]["support"]
    assert [x["start"] for x in body["windows"]] == [want["windows"][0]["start"]]
    status, body = await get_json(f"{w.web_url}/csat?agent=a1&windows=1")
    assert body["totals"]["all"] == want["totals"]["agent"]["a1"]
    assert len(body["windows"]) == 1
    status, body = await get_json(f"{w.web_url}/csat?page={SUPPORT_PAGE}&window={want['windows'][1]['start']}")
    assert [x["start"] for x in body["windows"]] == [want["windows"][1]["start"]]
    assert body["windows"][0]["all"]["surveys_sent"] == 1  # c5 only, its re-emission not counted
    for bad in ("window=yesterday", "windows=many", "window=17"):
        status, body = await get_json(f"{w.web_url}/csat?{bad}")
        assert status == 400 and "bad query" in body["error"], bad

    # clean restart: the same figures, from the changelog; nothing counted again
    w.restart()
    after = await wait_report(w, want)
    assert after["totals"] == report["totals"] and after["windows"] == report["windows"]
    samples = await wait_gauges(w, expected_gauges(want))
    assert counter(samples, "messenger_csat_answers_total", skill="billing", score="5") == 0

    # the same facts twice (all of them again, at new offsets): nothing counted, nothing emitted
    await send_facts(kafka, topic, facts)
    await send_facts(kafka, topic, legacy, key="conversation")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples = await metric_samples(w)
        if counter(samples, "messenger_csat_facts_skipped_total", reason="duplicate") >= len(everything):
            break
        await asyncio.sleep(0.5)
    assert counter(samples, "messenger_csat_facts_skipped_total", reason="duplicate") == len(everything)
    assert not any(k[0] in ("messenger_csat_answers_total", "messenger_csat_surveys_sent_total") and v
                   for k, v in samples.items())
    await wait_report(w, want, timeout=10)
    again = await received_events(kafka, w, ["billing", "support"], 7)
    assert len(again) == len(events)


async def test_two_workers_report_the_same_cluster_totals(make_worker: Callable[..., Worker], kafka: KafkaIO) -> None:
    a = make_worker(config=FOUR_SKILLS_CONFIG, partitions=4)
    b = make_worker(config=FOUR_SKILLS_CONFIG, partitions=4, MESSENGER_STREAMS_TOPIC_PREFIX=a.prefix,
                    MESSENGER_STREAMS_APP_ID=a.env["MESSENGER_STREAMS_APP_ID"])
    gen = Facts(a.prefix)
    pages = {"billing": BILLING_PAGE, "support": SUPPORT_PAGE, "general": BILLING_PAGE, "vip": VIP_PAGE}
    plan = []
    for i in range(40):
        skill = ["billing", "support", "general", "vip"][i % 4]
        plan.append((f"k{i}", pages[skill], skill, f"a{i % 3}", NOW_MS - (i % 2) * H * 1000,
                     None if i % 5 == 0 else 1 + (i * 7) % 5))
    facts = gen.conversations(plan)
    await send_facts(kafka, a.topic("csat.facts"), facts)
    want = expected_report(facts)
    answers = sum(1 for f in facts if f["fact"] == "answer")
    assert want["totals"]["all"]["answers"] == answers == 32

    ra = await wait_report(a, want, partitions=4)
    rb = await wait_report(b, want, partitions=4)
    assert ra == rb
    gauges = expected_gauges(want)
    await wait_gauges(a, gauges)
    await wait_gauges(b, gauges)
    events = await received_events(kafka, a, ["billing", "support", "general", "vip"], answers)
    check_received(events, facts)
    # both workers counted: each owns some of the four skills' partitions
    counted = []
    for w in (a, b):
        samples = await metric_samples(w)
        counted.append(sum(v for k, v in samples.items() if k[0] == "messenger_csat_answers_total"))
    assert sum(counted) == answers and all(counted), counted


async def test_sigkill_mid_stream_neither_loses_nor_double_counts(
    make_worker: Callable[..., Worker], kafka: KafkaIO
) -> None:
    w = make_worker(partitions=2)
    gen = Facts(w.prefix)
    plan = [(f"m{i}", BILLING_PAGE if i % 2 else SUPPORT_PAGE, "billing" if i % 2 else "support", f"a{i % 4}",
             NOW_MS, 1 + i % 5) for i in range(1500)]
    facts = gen.conversations(plan)
    await send_facts(kafka, w.topic("csat.facts"), facts)
    # kill it while it is counting: some answers emitted, not all
    deadline = time.monotonic() + 60
    emitted = 0.0
    while time.monotonic() < deadline:
        samples = await metric_samples(w)
        emitted = sum(v for k, v in samples.items() if k[0] == "messenger_csat_answers_total")
        if emitted >= 100:
            break
        await asyncio.sleep(0.05)
    w.stop(sig=signal.SIGKILL)
    assert 100 <= emitted < 1500, f"not killed mid-stream ({emitted} answers counted)"
    # the restarted worker gets the partitions once the killed member's session has expired
    w.start()
    want = expected_report(facts)
    await wait_report(w, want, timeout=180)
    events = await received_events(kafka, w, ["billing", "support"], 1500, timeout=120)
    check_received(events, facts)

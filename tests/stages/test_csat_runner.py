"""The CSAT stage's runner without Kafka (fake producer, table and dead-letter path): state first —
every changelog batch acknowledged before any output is sent —, a failed write stops before any
output, a crash between state and outputs re-sends the same events on redelivery, misrouted facts
are forwarded, bad records dead-lettered."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from streams.core.config import parse_config
from streams.core.pages import PageDirectory
from streams.core.settings import Settings
from streams.stages import csat as stage
from streams.stages.pages import LivePages
from tests.conftest import BASE_CONFIG

T0 = 1_700_000_000_000
SRC = "messenger.events.split"


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float = 1_700_000_000.0


@dataclass
class Event:
    message: Msg
    value: bytes | None


class FakeWriter:
    """Records what was written and sent, in order; acks resolve on the next loop turn."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.log: list[tuple[str, Any]] = []
        self.fail_on = fail_on

    def _ack(self, what: str, item: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done() -> None:
            if self.fail_on == what:
                fut.set_exception(RuntimeError(f"{what} refused"))
            else:
                self.log.append((f"ack {what}", item))
                fut.set_result(None)

        asyncio.get_running_loop().call_soon(done)
        return fut

    async def write(self, topic: str, partition: int, writes: dict[str, Any]) -> asyncio.Future[Any]:
        self.log.append(("write", (topic, partition, dict(writes))))
        return self._ack("write", partition)

    async def send(self, topic: str, key: bytes, value: bytes, partition: int | None = None) -> asyncio.Future[Any]:
        self.log.append(("send", (topic, key, orjson.loads(value), partition)))
        return self._ack("send", topic)


class Crashed(Exception):
    pass


@pytest.fixture
def crash(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reasons: list[str] = []

    def fake(reason: str) -> None:
        reasons.append(reason)
        raise Crashed(reason)

    monkeypatch.setattr(stage, "crash_worker", fake)
    return reasons


def runner(writer: FakeWriter, data: dict[bytes, bytes] | None = None) -> tuple[stage.CellsRunner, list[Any]]:
    settings = Settings(partitions=2, app_id="app")
    config = parse_config(BASE_CONFIG)
    letters: list[Any] = []

    async def dead_letter(msg: Any, reason: str, error: str) -> None:
        letters.append((msg.offset, reason, error))

    pipe = SimpleNamespace(settings=settings, config=config, dead_letter=dead_letter,
                           skill_topics={s: None for s in config.all_skills()},
                           pages=LivePages(PageDirectory(config), settings))  # the TOML's pages (not started)
    table = SimpleNamespace(data={} if data is None else data)
    return stage.CellsRunner(pipe, table, writer), letters  # type: ignore[arg-type]


def fact(conv: str, skill: str, score: int | None, src_offset: int | None) -> dict[str, Any]:
    return {
        "fact": "survey_sent" if score is None else "answer", "fact_id": f"{conv}:{'answer' if score else 'survey'}",
        "conversation_id": conv, "page_id": "P1", "psid": f"u-{conv}", "skill": skill, "agent_id": "a1",
        "score": score, "locale": "en_US", "timestamp": T0,
        "src": None if src_offset is None else {"topic": SRC, "partition": 0, "offset": src_offset, "index": 0},
    }


def events(facts: list[dict[str, Any]], partition: int, first_offset: int = 0) -> list[Event]:
    out = []
    for i, f in enumerate(facts):
        raw = orjson.dumps(f)
        out.append(Event(Msg("csat.facts", partition, first_offset + i, f["skill"].encode(), raw), raw))
    return out


BILLING = stage.SkillPartitions(2)("billing")  # 1
SUPPORT = stage.SkillPartitions(2)("support")  # 0


async def test_state_is_acknowledged_before_any_output(crash: list[str]) -> None:
    w = FakeWriter()
    r, _ = runner(w)
    facts = [fact(f"c{i}", "billing", 1 + i % 5, i) for i in range(10)]
    facts += [fact(f"s{i}", "support", 5, 100 + i) for i in range(5)]
    await r.run(events(facts[:10], BILLING) + events(facts[10:], SUPPORT))
    kinds = [k for k, _ in w.log]
    assert kinds.count("write") == 2 and kinds.count("send") == 15
    last_write_ack = max(i for i, k in enumerate(kinds) if k == "ack write")
    assert last_write_ack < kinds.index("send")
    sent = [v for k, v in w.log if k == "send"]
    assert {t for t, *_ in sent} == {"skill.billing", "skill.support"}
    assert [v["csat_answers"] for t, _, v, _ in sent if t == "skill.billing"] == list(range(1, 11))
    stored = orjson.loads(r.table.data[b"S|billing"])
    assert stored["c"] == [0, 2, 2, 2, 2, 2]
    assert not crash


async def test_a_failed_write_stops_before_any_output(crash: list[str]) -> None:
    w = FakeWriter(fail_on="write")
    r, _ = runner(w)
    with pytest.raises(Crashed):
        await r.run(events([fact("c1", "billing", 5, 1)], BILLING))
    assert "csat cells" in crash[0]
    assert not any(k == "send" for k, _ in w.log)
    assert r.table.data == {}  # the local table follows the changelog only after its ack


async def test_crash_between_state_and_outputs_resends_the_same_events(crash: list[str]) -> None:
    first = FakeWriter(fail_on="send")
    r, _ = runner(first)
    batch = events([fact("c1", "billing", 5, 1), fact("c2", "billing", 2, 2)], BILLING)
    with pytest.raises(Crashed):
        await r.run(batch)
    lost = [v for k, (_, _, v, _) in ((k, x) for k, x in first.log if k == "send")]
    assert len(lost) == 2
    # the restarted worker (same table, recovered from the changelog) gets the batch again, and more
    second = FakeWriter()
    r2, _ = runner(second, r.table.data)
    await r2.run(batch + events([fact("c3", "billing", 4, 3)], BILLING, first_offset=2))
    sent = [v for k, (_, _, v, _) in ((k, x) for k, x in second.log if k == "send")]
    assert sent[:2] == lost
    assert sent[2]["csat_answers"] == 3 and sent[2]["csat_positive"] == 2
    assert orjson.loads(r2.table.data[b"S|billing"])["c"] == [0, 0, 1, 0, 1, 1]


async def test_misrouted_facts_are_forwarded_and_bad_records_dead_lettered(crash: list[str]) -> None:
    w = FakeWriter()
    r, letters = runner(w)
    misrouted = events([fact("c1", "billing", 5, 7)], SUPPORT)  # keyed by conversation by an older producer
    bad = [Event(Msg("csat.facts", SUPPORT, 1, b"k", b"{not json"), b"{not json"),
           *events([{**fact("c2", "support", 3, 8), "score": None, "fact": "answer"}], SUPPORT, first_offset=2)]
    await r.run(misrouted + bad)
    sends = [v for k, v in w.log if k == "send"]
    assert len(sends) == 1
    topic, key, value, partition = sends[0]
    assert (topic, key, partition) == ("csat.facts", b"billing", BILLING)
    assert value["src"] is None and value["fact_id"] == "c1:answer"
    assert [(o, reason) for o, reason, _ in letters] == [(1, "processing_error"), (2, "processing_error")]
    assert "invalid csat fact" in letters[0][2] and "without a score" in letters[1][2]
    assert not any(k == "write" for k, _ in w.log)

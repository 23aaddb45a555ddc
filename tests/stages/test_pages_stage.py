"""The live page directory inside the stages, without Kafka (issue 14): the conversation stage decides
with the live Env and routes to skills connected live; the ingest splitter's page gate dead-letters
events of pages switched off or not connected, with the raw body, and lets the others through."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from schemas.pages import AccountRecord, PageRecord
from streams.core import pages as core_pages
from streams.core.config import ConnectorConfig
from streams.core.pages import PageDirectory
from streams.core.settings import Settings
from streams.rules.conversation.api import Decision, Env, Input, Output
from streams.stages import ingest
from streams.stages.conversation import ConversationStage
from streams.stages.pages import LivePages
from streams.stages.runtime import FactSeq, Record
from tests.stages.test_conversation_stage import FakeProducer

CONFIG = ConnectorConfig.model_validate(
    {"account": {"app_id": "1"}, "routing": {"default_skill": "general"}, "pages": [{"page_id": "101", "skill": "billing"}]}
)


def live_pipe(directory: PageDirectory) -> Any:
    s = Settings()
    return SimpleNamespace(settings=s, config=CONFIG, skill_topics={k: None for k in CONFIG.all_skills()},
                           pages=LivePages(directory, s))


def started(directory: PageDirectory) -> PageDirectory:
    directory._ready = True  # as after start(): records apply at once  # noqa: SLF001
    return directory


class EnvRecorder:
    """A decider that answers one console event on a given skill and keeps the Env it was given."""

    def __init__(self, skill: str) -> None:
        self.skill = skill
        self.envs: list[Env] = []

    def decide(self, state: Any, inp: Input, key: str, env: Env) -> Decision:
        self.envs.append(env)
        return Decision({}, outputs=[Output("skill", key, {"type": "conversation_transferred"}, self.skill)])


async def test_the_stage_decides_with_the_live_env_and_reaches_skills_connected_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created: list[str] = []

    async def ensure_topics(bootstrap: str, names: dict[str, bool], *args: Any) -> list[str]:
        created.extend(names)
        return list(names)

    monkeypatch.setattr(core_pages, "ensure_topics", ensure_topics)
    d = started(PageDirectory(CONFIG, Settings(), ensure_skills=True))
    decider = EnvRecorder("returns")
    stage = ConversationStage(live_pipe(d), decider)  # type: ignore[arg-type]
    t = Settings().topics

    def decide(key: str) -> list[str]:
        step = stage.decide(None, Input("action", "a", 1, {}), key, Record("x", 0, 1, key.encode(), b"{}", 1), FactSeq())
        return [o.topic for o in step.outputs]

    d._on_change("102", PageRecord(page_id="102", skill="returns"))  # noqa: SLF001 - as the mirror does
    # held back until the topic of `returns` exists: not connected yet, and no route to `returns`
    assert decide("102:u1") == [t.skill("general")] and decider.envs[-1].page is None
    assert decider.envs[-1].skills is not None and "returns" not in decider.envs[-1].skills
    await d._create_skill_topics({"returns"})  # noqa: SLF001 - what the skill keeper does
    d._recompute_all()  # noqa: SLF001
    assert created == [t.skill("returns")]
    assert decide("102:u1") == [t.skill("returns")]
    env = decider.envs[-1]
    assert env.page is not None and env.page.skill == "returns" and env.skills is not None
    assert {"returns", "billing", "general"} <= env.skills
    decide("101:u1")  # a page of the TOML file sees the new skill too (transfers to it are allowed)
    assert decider.envs[-1].skills is not None and "returns" in decider.envs[-1].skills
    d._on_change("account", AccountRecord(mode="manual", external_nickname="Acme"))  # noqa: SLF001
    decide("101:u1")
    assert decider.envs[-1].routing.mode == "manual" and decider.envs[-1].external_user.nickname == "Acme"


def body(page: str, *psids: str) -> bytes:
    return orjson.dumps({"object": "page", "entry": [{"id": page, "time": 1, "messaging": [
        {"sender": {"id": p}, "recipient": {"id": page}, "timestamp": 5, "message": {"mid": f"m-{page}-{p}"}}
        for p in psids]}]})


async def test_the_page_gate_dead_letters_with_the_raw_body() -> None:
    d = started(PageDirectory(CONFIG, Settings(), track_activity=True))
    producer = FakeProducer()
    splitter = ingest.Splitter(live_pipe(d), producer)  # type: ignore[arg-type]
    t = Settings().topics
    d._on_change("103", PageRecord(page_id="103", skill="billing", enabled=False))  # noqa: SLF001 - switched off
    d._on_change("account", AccountRecord(unknown_pages="dead_letter"))  # noqa: SLF001
    raws = [body("101", "a"), body("103", "b", "c"), body("109", "d")]
    await splitter.run_batch([Record(t.name("raw"), 0, i, None, raw, 1_000 + i) for i, raw in enumerate(raws)])
    split = [orjson.loads(v)["psid"] for topic, _, v in producer.sent if topic == t.name("split")]
    letters = [orjson.loads(v) for topic, _, v in producer.sent if topic == t.name("dlq")]
    assert split == ["a"]
    assert [(x["reason"], x["source"]["offset"], x["item_index"]) for x in letters] == [
        ("page_disabled", 1, "entry[0].messaging[0]"), ("page_disabled", 1, "entry[0].messaging[1]"),
        ("page_not_connected", 2, "entry[0].messaging[0]")]
    assert [x["payload"] for x in letters] == [raws[1].decode(), raws[1].decode(), raws[2].decode()]
    assert "103 is switched off" in letters[0]["error"] and "109 is not connected" in letters[2]["error"]
    # the last event of every page, taken in or not, for `pages list`
    assert {(a.page_id, a.at) for a in d.drain_activity()} == {("101", 1_000), ("103", 1_001), ("109", 1_002)}
    d._on_change("account", AccountRecord(active=False))  # noqa: SLF001 - the Facebook source switched off
    producer.sent.clear()
    await splitter.run_batch([Record(t.name("raw"), 0, 9, None, raws[0], 2_000)])
    (letter,) = [orjson.loads(v) for topic, _, v in producer.sent]
    assert letter["reason"] == "page_disabled" and "source is switched off" in letter["error"]


async def test_csat_received_goes_to_a_skill_connected_live(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.stages import csat
    from tests.stages.test_csat_runner import FakeWriter, events, fact

    async def ensure_topics(*args: Any) -> list[str]:
        return []

    monkeypatch.setattr(core_pages, "ensure_topics", ensure_topics)
    settings = Settings(partitions=2, app_id="app")
    d = started(PageDirectory(CONFIG, settings, ensure_skills=True))
    pipe = SimpleNamespace(settings=settings, config=CONFIG, skill_topics={k: None for k in CONFIG.all_skills()},
                           pages=LivePages(d, settings))
    writer = FakeWriter()
    runner = csat.CellsRunner(pipe, SimpleNamespace(data={}), writer)  # type: ignore[arg-type]
    await d._create_skill_topics({"returns"})  # noqa: SLF001 - a page was connected live to `returns`
    returns = csat.SkillPartitions(2)("returns")
    await runner.run(events([fact("c1", "returns", 5, 1)], returns))  # type: ignore[arg-type]
    assert [v[0] for k, v in writer.log if k == "send"] == [settings.topics.skill("returns")]
    csat.Gauges(pipe.pages.skill_topics).refresh({"returns": [2, 0, 0, 0, 0, 1]})  # …and its CSAT gauges
    assert REGISTRY.get_sample_value("messenger_csat_percent", {"skill": "returns"}) == 100.0
    assert REGISTRY.get_sample_value("messenger_csat_response_rate", {"skill": "returns"}) == 0.5

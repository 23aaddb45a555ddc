"""The page directory against a real broker: two processes' directories follow one writer live (#14)."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas.pages import AccountRecord, PageRecord
from streams.core.config import parse_config
from streams.core.pages import PageDirectory, PagesWriter
from streams.core.settings import Settings
from tests.conftest import BASE_CONFIG
from tests.kafkatools import ROOT, worker_env

pytestmark = pytest.mark.kafka


async def until(cond: object, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not cond():  # type: ignore[operator]
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not seen within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_changes_reach_every_directory_within_5s(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESSENGER_STREAMS_TOPIC_PREFIX", f"t{uuid.uuid4().hex[:8]}.")
    settings = Settings(bootstrap_servers=kafka_bootstrap, partitions=2)
    config = parse_config(BASE_CONFIG)
    writer = PagesWriter(settings)
    await writer.start()
    await writer.put_page(PageRecord(page_id="1", skill="billing", name="before start"))
    worker = PageDirectory(config, settings, ensure_skills=True)
    other = PageDirectory(config, settings)
    await worker.start()
    await other.start()
    try:
        assert worker.view("1").name == "before start"  # type: ignore[union-attr]  # read to the end at start
        skill = f"s{uuid.uuid4().hex[:6]}"
        await writer.put_page(PageRecord(page_id="2", skill=skill))  # a skill nobody created a topic for
        took = await until(lambda: worker.page("2") is not None and other.page("2") is not None)
        assert skill in worker.skills and took < 5.0
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            assert settings.topics.skill(skill) in await admin.list_topics()  # created before routing to it
        finally:
            await admin.close()
        await writer.put_page(PageRecord(page_id="1691462197845448", skill="billing", enabled=False))
        await until(lambda: worker.admit("1691462197845448") == "page_disabled" == other.admit("1691462197845448"))
        await writer.put_account(AccountRecord(mode="manual", unknown_pages="dead_letter"))
        await until(lambda: worker.routing.mode == "manual" and other.admit("999") == "page_not_connected")
        await writer._send(writer.topic, "1691462197845448", None)  # a tombstone: back to the TOML page
        await until(lambda: worker.view("1691462197845448").source == "config")  # type: ignore[union-attr]
    finally:
        await worker.stop()
        await other.stop()
        await writer.stop()


async def test_topics_create_makes_the_page_topics_like_every_other(kafka_bootstrap: str, tmp_path: Path) -> None:
    """`messenger-streams topics create` (the worker's topics-first start-up uses the same specs)
    creates connector.pages and connector.pages.activity: compacted, one partition."""
    env = worker_env(kafka_bootstrap, tmp_path, BASE_CONFIG, partitions=3)
    prefix = env["MESSENGER_STREAMS_TOPIC_PREFIX"]
    res = await asyncio.to_thread(subprocess.run, [str(ROOT / ".venv/bin/messenger-streams"), "topics", "create"],
                                  env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    names = [f"{prefix}connector.pages", f"{prefix}connector.pages.activity"]
    assert all(f"created {n}" in res.stdout.splitlines() for n in names), res.stdout
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)}
        policies = {}
        for name in names:
            (resp,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name, None)])
            policies[name] = {entry[0]: entry[1] for entry in resp.resources[0][4]}["cleanup.policy"]
    finally:
        await admin.close()
    assert described == dict.fromkeys(names, 1)
    assert policies == dict.fromkeys(names, "compact")

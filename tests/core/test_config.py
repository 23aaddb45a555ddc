"""Configuration: the example loads, and every kind of mistake names the key and the problem."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from streams.core.config import ConfigError, load_config, parse_config
from streams.core.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "connector.example.toml"


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.account.app_id == "950864918368986"
    assert cfg.page("1691462197845448").skill == "billing"  # type: ignore[union-attr]
    assert set(cfg.all_skills()) >= {"billing", "support", "general"}
    assert cfg.skill("billing").auto_accept is True
    assert cfg.csat.question_by_locale["es_ES"].startswith("¿")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[routing]\nmode = "entry_point"\n', "account: required key is missing"),
        ('[account]\napp_id = "1"\n[routing]\nmode = "round_robin"\n', "routing.mode"),
        ('[account]\napp_id = "1"\n[limitz]\n', "limitz: unknown key"),
        ('[account]\napp_id = "1"\n[limits]\nagent_text = -5\n', "limits.agent_text"),
        ('[account]\napp_id = "1"\n[limits]\nagent_text = "long"\n', "limits.agent_text"),
        ('[account]\napp_id = "1"\n[[pages]]\nskill = "x"\n', "pages.0.page_id: required key is missing"),
        ('[account]\napp_id = "1"\n[[pages]]\npage_id = "1"\n[[pages]]\npage_id = "1"\n', "listed twice"),
        ('[account]\napp_id = "1"\n[skills.billing]\nauto_close_after_seconds = 0\n', "skills.billing.auto_close"),
        ('[account]\napp_id = "1"\n[routing]\ndefault_skill = "a b"\n', "skill name 'a b'"),
        ("[account\napp_id = 1", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "conn.toml")
    message = str(err.value)
    assert needle in message
    assert "\n" not in message
    assert message.startswith("conn.toml: ")


def test_missing_file_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MESSENGER_STREAMS_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="MESSENGER_STREAMS_CONFIG"):
        load_config()
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_bad_environment_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESSENGER_STREAMS_PARTITIONS", "many")
    with pytest.raises(ConfigError, match="MESSENGER_STREAMS_PARTITIONS=.many.: Input should be a valid integer"):
        load_settings()


def test_worker_with_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[account]\napp_id = "1"\n[routing]\nmode = "nope"\n')
    res = subprocess.run(
        [str(ROOT / ".venv/bin/messenger-streams"), "worker"],
        env={"MESSENGER_STREAMS_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "routing.mode" in res.stderr
    assert "Traceback" not in res.stderr


def test_messenger_events_topic_only_when_published(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.core.topics import wanted_topics

    config = load_config(EXAMPLE)
    monkeypatch.delenv("MESSENGER_STREAMS_PUBLISH_EVENTS", raising=False)
    assert "messenger.events" not in wanted_topics(load_settings(), config)
    assert "messenger.events.split" in wanted_topics(load_settings(), config)
    monkeypatch.setenv("MESSENGER_STREAMS_PUBLISH_EVENTS", "true")
    assert "messenger.events" in wanted_topics(load_settings(), config)


def test_cached_partitioner_agrees_with_kafkas_default() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from streams.stages.app import CachedPartitioner

    cached, default = CachedPartitioner(max_keys=50), DefaultPartitioner()
    parts = list(range(8))
    for i in range(200):  # past max_keys: the cache is cleared and refilled
        key = f"1691462197845448:user{i % 120}".encode()
        assert cached(key, parts, parts) == default(key, parts, parts)
        assert cached(key, parts[:3], parts[:3]) == default(key, parts[:3], parts[:3])
    assert cached(None, parts, parts) in parts

"""The customer's profile as the rules keep it, and which persona a request goes out as."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streams.core.config_rich import Personas, Profile
from streams.rules import personas, profile

ON = Profile(enabled=True, ttl_seconds=3600, retry_after_seconds=60)
H = 3_600_000


def test_switched_off_never_asks() -> None:
    assert not profile.need_fetch(profile.empty(), 0, Profile())


def test_ask_once_then_wait_for_the_answer_or_the_retry_time() -> None:
    ps = profile.empty()
    assert profile.need_fetch(ps, 1_000, ON)
    ps = profile.asked(ps, 1_000)
    assert not profile.need_fetch(ps, 1_000 + 59_999, ON)  # in flight
    assert profile.need_fetch(ps, 1_000 + 60_000, ON)  # the answer never came: ask again


def test_fresh_profile_is_kept_for_the_ttl() -> None:
    ps = profile.answered(profile.asked(profile.empty(), 0), {"first_name": "Ana"}, 10)
    assert ps["asked_at"] is None and ps["fetched_at"] == 10
    assert not profile.need_fetch(ps, 10 + H - 1, ON)
    assert profile.need_fetch(ps, 10 + H, ON)


def test_a_failure_waits_the_retry_time_and_keeps_the_old_data() -> None:
    old = profile.answered(profile.empty(), {"first_name": "Ana"}, 0)
    ps = profile.failed(profile.asked(old, 2 * H), 2 * H)
    assert ps["data"] == {"first_name": "Ana"}
    assert not profile.need_fetch(ps, 2 * H + 59_999, ON)
    assert profile.need_fetch(ps, 2 * H + 60_000, ON)
    assert profile.first_name(ps, "there") == "Ana"


def test_parse_keeps_only_sound_fields() -> None:
    body = {"first_name": " Ana ", "last_name": "L" * 150, "profile_pic": "https://platform-lookaside.fbsbx.com/p",
            "locale": "es_MX", "timezone": -6, "gender": "female", "id": "123", "extra": 1}
    assert profile.parse(body, ["first_name", "last_name", "profile_pic", "locale", "timezone"]) == {
        "first_name": "Ana", "last_name": "L" * 100, "profile_pic": "https://platform-lookaside.fbsbx.com/p",
        "locale": "es_MX", "timezone": -6}
    bad = {"first_name": 5, "profile_pic": "javascript:x", "locale": "Spanish", "timezone": 99, "last_name": "  "}
    assert profile.parse(bad, ["first_name", "last_name", "profile_pic", "locale", "timezone"]) == {}
    assert profile.parse({"timezone": True, "locale": "es"}, ["timezone", "locale"]) == {"locale": "es"}
    assert profile.parse({"first_name": "Ana"}, ["locale"]) == {}  # only the fields asked for


def test_locale_and_first_name_with_fallback() -> None:
    assert profile.locale_of(None) is None
    assert profile.first_name(None, "there") == "there"
    ps = profile.answered(profile.empty(), {"locale": "pt_BR"}, 1)
    assert profile.locale_of(ps) == "pt_BR" and profile.first_name(ps, "there") == "there"


def test_migrate_reads_old_or_broken_entries() -> None:
    assert profile.migrate(None) == profile.empty()
    assert profile.migrate({"data": "x", "fetched_at": "1", "asked_at": True, "failed_at": 5}) == {
        "data": None, "fetched_at": None, "asked_at": None, "failed_at": 5}


def test_console_fields() -> None:
    ps = profile.answered(profile.empty(), {"first_name": "Ana", "locale": "es_MX"}, 7)
    assert profile.console_fields(ps, "graph") == {
        "first_name": "Ana", "last_name": None, "profile_pic": None, "locale": "es_MX", "timezone": None,
        "fetched_at": 7, "source": "graph"}


def test_profile_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="unknown profile field 'email'"):
        Profile(fields=["email"])


# --- personas -----------------------------------------------------------------------------------------

P = Personas(enabled=True, system_name="Acme Assistant", system_picture_url="https://x.io/bot.png",
             agents=True, agent_picture_url="https://x.io/agent.png")


def test_system_persona_for_automatic_messages_and_csat() -> None:
    for origin in ("system", "csat"):
        assert personas.persona_for(origin, None, P) == personas.PersonaSpec(
            "system", "Acme Assistant", "https://x.io/bot.png")


def test_agent_persona_by_nickname() -> None:
    spec = personas.persona_for("agent", "  Maria   G. ", P)
    assert spec is not None and spec.name == "Maria G." and spec.key.startswith("agent:")
    assert personas.persona_for("agent", "Maria G.", P) == spec
    assert personas.persona_for("agent", None, P) is None
    assert personas.persona_for("agent", "Maria", Personas(enabled=True, system_picture_url="https://x.io/b.png")) \
        is None
    long = personas.persona_for("agent", "Bartholomew " * 6, P)
    assert long is not None and len(long.name) <= 50 and not long.name.endswith(" ")


def test_off_means_no_persona() -> None:
    assert personas.persona_for("system", None, Personas()) is None


def test_remembered_records_and_listing() -> None:
    spec = personas.PersonaSpec("system", "Acme Assistant", "https://x.io/bot.png")
    rec = personas.record("p1", spec, "991", 5)
    assert personas.record_key("p1", spec) == "p1|system"
    assert personas.usable(rec, spec) == "991"
    assert personas.usable({**rec, "name": "Old name"}, spec) is None
    assert personas.usable(None, spec) is None
    listing = {"data": [{"name": "Other", "id": "1"}, {"name": "Acme Assistant", "id": 992}]}
    assert personas.find_existing(listing, spec) == "992"
    assert personas.find_existing({"data": "x"}, spec) is None


def test_persona_settings_need_pictures() -> None:
    with pytest.raises(ValidationError, match="system_picture_url is required"):
        Personas(enabled=True)
    with pytest.raises(ValidationError, match="agent_picture_url is required"):
        Personas(enabled=True, system_picture_url="https://x.io/b.png", agents=True)
    with pytest.raises(ValidationError, match="at most 50 characters"):
        Personas(system_name="x" * 51)

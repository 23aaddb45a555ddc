"""Connector configuration: one TOML file (path in MESSENGER_STREAMS_CONFIG), validated at start-up.

Every section is a frozen pydantic model with unknown keys forbidden, so a typo stops start-up
with a message naming the key. `load_config` raises `ConfigError` with a one-line message.
"""

from __future__ import annotations

import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streams.core.automessages import AutoMessage, check_templates
from streams.core.config_rich import Media, Personas, Profile


class ConfigError(ValueError):
    """The configuration is unusable; the message names the key and the problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Account(_Section):
    app_id: str = Field(description="our Facebook app id: echoes carrying it are our own sends")
    human_agent_tag: bool = Field(
        default=False, description="the app is approved for the HUMAN_AGENT tag (reply up to 7 days)"
    )

    @field_validator("app_id", mode="before")
    @classmethod
    def _id_str(cls, v: object) -> object:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class Routing(_Section):
    mode: Literal["entry_point", "manual"] = "entry_point"
    default_skill: str = "general"


class Page(_Section):
    page_id: str
    skill: str | None = None
    locale: str = "en_US"
    name: str | None = None

    @field_validator("page_id", mode="before")
    @classmethod
    def _id_str(cls, v: object) -> object:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class ExternalUser(_Section):
    agent_id: str = "connector"
    nickname: str = "FB External User"


class Limits(_Section):
    agent_text: int = Field(default=640, gt=0, le=2000)
    consumer_text: int = Field(default=5000, gt=0)


class Skill(_Section):
    auto_accept: bool = False
    auto_close_after_seconds: int | None = Field(default=None, gt=0)
    auto_close_csat: bool = False
    waiting_for_agent_after_seconds: int | None = Field(default=None, gt=0)


class Csat(_Section):
    enabled: bool = True
    question: str = "How would you rate your conversation with us?"
    question_by_locale: dict[str, str] = Field(default_factory=dict)
    question_by_page: dict[str, str] = Field(default_factory=dict)
    on_consumer_close: bool = False
    expire_after_seconds: int = Field(default=86400, gt=0)
    window_seconds: int = Field(default=3600, gt=0)
    thank_you: str = "Thank you for your feedback!"


class Messaging(_Section):
    """Meta's messaging windows, in seconds (defaults: 24 h standard, 7 days HUMAN_AGENT)."""

    response_window_seconds: int = Field(default=86400, gt=0)
    human_agent_window_seconds: int = Field(default=7 * 86400, gt=0)
    close_payloads: list[str] = Field(
        default_factory=lambda: ["CLOSE_CONVERSATION"],
        description="postback / quick-reply payloads by which the consumer ends the conversation",
    )


class ConnectorConfig(_Section):
    account: Account
    routing: Routing = Routing()
    pages: list[Page] = Field(default_factory=list)
    external_user: ExternalUser = ExternalUser()
    limits: Limits = Limits()
    skills: dict[str, Skill] = Field(default_factory=dict)
    csat: Csat = Csat()
    messaging: Messaging = Messaging()
    auto_messages: dict[str, AutoMessage] = Field(default_factory=dict)
    profile: Profile = Profile()  # #17: config_rich.py
    personas: Personas = Personas()
    media: Media = Media()

    @model_validator(mode="after")
    def _unique_pages(self) -> ConnectorConfig:
        check_templates(self.auto_messages)
        seen: set[str] = set()
        for i, page in enumerate(self.pages):
            if page.page_id in seen:
                raise ValueError(f"pages[{i}].page_id {page.page_id!r} is listed twice")
            seen.add(page.page_id)
        for name in self.all_skills():
            if not name or any(c not in _SKILL_CHARS for c in name):
                raise ValueError(f"skill name {name!r} may hold only letters, digits, '.', '_' and '-'")
        return self

    def page(self, page_id: str) -> Page | None:
        """The configured page, or None for a page we do not know."""
        return self.pages_by_id.get(page_id)

    @cached_property
    def pages_by_id(self) -> dict[str, Page]:
        """Configured pages by page id."""
        return {p.page_id: p for p in self.pages}

    def skill(self, name: str) -> Skill:
        """Settings of a skill (defaults when the skill has no section)."""
        return self.skills.get(name, _DEFAULT_SKILL)

    def all_skills(self) -> list[str]:
        """Every skill the processor may route to: declared as topics at start-up."""
        names = {self.routing.default_skill, *self.skills}
        names.update(p.skill for p in self.pages if p.skill)
        return sorted(names)


_SKILL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_DEFAULT_SKILL = Skill()


def describe_validation_error(exc: ValidationError) -> str:
    """First problem of a pydantic error as `key.path: problem`."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return f"{loc}: {msg}" if loc else msg


def parse_config(text: str, origin: str = "<config>") -> ConnectorConfig:
    """Parse TOML text into a validated config; raises ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    try:
        return ConnectorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {describe_validation_error(exc)}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> ConnectorConfig:
    """Load the config from `path`, else $MESSENGER_STREAMS_CONFIG; raises ConfigError."""
    path = path or os.environ.get("MESSENGER_STREAMS_CONFIG")
    if not path:
        raise ConfigError("no config: set MESSENGER_STREAMS_CONFIG to a TOML file (see deploy/connector.example.toml)")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: config is not UTF-8 text") from None
    return parse_config(text, str(p))

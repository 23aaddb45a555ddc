"""Connector configuration: one TOML file (path in MESSENGER_STREAMS_CONFIG), validated at start-up.

Every section is a frozen pydantic model with unknown keys forbidden, so a typo stops start-up
with a message naming the key. `load_config` raises `ConfigError` with a one-line message.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streams.core.automessages import (
    DEFAULT_TEXTS,
    DEFAULT_WORDS,
    PLACEHOLDERS,
    AutoMessage,
    Words,
    check_templates,
    check_text,
)
from streams.core.config_bots import Bots, Optin
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
    unknown_pages: Literal["default_skill", "dead_letter"] = Field(
        default="default_skill",
        description="events of pages not connected: routed to default_skill (as before), or dead-lettered "
        "with reason page_not_connected by the ingest stage",
    )


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


MIN_TIMER_SECONDS = 15  # LivePerson's minimum for every conversation timer
MAX_RESPONSE_SECONDS = 30 * 86_400
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


def _parse_span(text: str) -> tuple[int, int]:
    """`"09:00-13:00"` → (540, 780) minutes of the day; `24:00` may end a span."""
    m = _SPAN.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not \"HH:MM-HH:MM\"")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or m2 > 59 or end > 24 * 60 or start >= end:
        raise ValueError(f"{text!r} is not a span within one day (start before end, at most 24:00)")
    return start, end


class Hours(_Section):
    """Working hours of a skill in its own time zone; a day left out or `[]` is closed all day,
    and so is every date in `holidays` (local dates, `YYYY-MM-DD`)."""

    timezone: str
    mon: list[str] = Field(default_factory=list)
    tue: list[str] = Field(default_factory=list)
    wed: list[str] = Field(default_factory=list)
    thu: list[str] = Field(default_factory=list)
    fri: list[str] = Field(default_factory=list)
    sat: list[str] = Field(default_factory=list)
    sun: list[str] = Field(default_factory=list)
    holidays: list[str] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as \"Europe/Madrid\")") from None
        return v

    @field_validator(*DAYS)
    @classmethod
    def _spans(cls, v: list[str]) -> list[str]:
        spans = sorted(_parse_span(s) for s in v)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise ValueError("spans overlap")
        return v

    @field_validator("holidays")
    @classmethod
    def _dates(cls, v: list[str]) -> list[str]:
        for d in v:
            try:
                date.fromisoformat(d)
            except ValueError:
                raise ValueError(f"{d!r} is not a date (YYYY-MM-DD)") from None
        return v

    @cached_property
    def zone(self) -> ZoneInfo:
        """The time zone."""
        return ZoneInfo(self.timezone)

    @cached_property
    def week(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Open spans in minutes of the day, Monday first."""
        return tuple(tuple(sorted(_parse_span(s) for s in getattr(self, day))) for day in DAYS)

    @cached_property
    def closed_dates(self) -> frozenset[date]:
        """Holidays as dates."""
        return frozenset(date.fromisoformat(d) for d in self.holidays)

    @cached_property
    def span_cache(self) -> dict[date, list[tuple[int, int]]]:
        """Open spans of local days as epoch ms, filled by `streams.rules.conversation.hours`."""
        return {}


class Skill(_Section):
    """Per-skill behaviour. Timers are in seconds, at least 15, all optional (off when absent)."""

    auto_accept: bool = False
    auto_close_after_seconds: int | None = Field(default=None, ge=MIN_TIMER_SECONDS)
    auto_close_warning_after_seconds: int | None = Field(default=None, ge=MIN_TIMER_SECONDS)
    auto_close_csat: bool = False
    agent_not_responding_after_seconds: int | None = Field(default=None, ge=MIN_TIMER_SECONDS)
    waiting_for_agent_after_seconds: int | None = Field(default=None, ge=MIN_TIMER_SECONDS)
    expected_response_seconds: int | None = Field(default=None, gt=0, le=MAX_RESPONSE_SECONDS)
    urgent_response_seconds: int | None = Field(default=None, gt=0, le=MAX_RESPONSE_SECONDS)
    hours: Hours | None = None

    @model_validator(mode="after")
    def _warning_first(self) -> Skill:
        warn, close = self.auto_close_warning_after_seconds, self.auto_close_after_seconds
        if warn is not None and close is not None and warn >= close:
            raise ValueError("auto_close_warning_after_seconds must be less than auto_close_after_seconds")
        return self


class Csat(_Section):
    enabled: bool = True
    question: str = "How would you rate your conversation with us?"
    question_by_locale: dict[str, str] = Field(default_factory=dict)
    question_by_page: dict[str, str] = Field(default_factory=dict)
    on_consumer_close: bool = False
    expire_after_seconds: int = Field(default=86400, gt=0)
    window_seconds: int = Field(default=3600, gt=0)
    thank_you: str = DEFAULT_TEXTS["csat_thanks"]


class Messaging(_Section):
    """Meta's messaging windows, in seconds (defaults: 24 h standard, 7 days HUMAN_AGENT)."""

    response_window_seconds: int = Field(default=86400, gt=0)
    human_agent_window_seconds: int = Field(default=7 * 86400, gt=0)
    close_payloads: list[str] = Field(
        default_factory=lambda: ["CLOSE_CONVERSATION"],
        description="postback / quick-reply payloads by which the consumer ends the conversation",
    )
    urgent_payloads: list[str] = Field(
        default_factory=list, description="postback / quick-reply payloads by which the consumer marks it urgent"
    )
    not_urgent_payloads: list[str] = Field(
        default_factory=list, description="postback / quick-reply payloads by which the consumer dismisses urgency"
    )

    @model_validator(mode="after")
    def _disjoint(self) -> Messaging:
        for a, b in (("close", "urgent"), ("close", "not_urgent"), ("urgent", "not_urgent")):
            both = set(getattr(self, f"{a}_payloads")) & set(getattr(self, f"{b}_payloads"))
            if both:
                raise ValueError(f"payload {sorted(both)[0]!r} is in both {a}_payloads and {b}_payloads")
        return self


class Agents(_Section):
    """How agents are named to consumers, and how long an action for a conversation not seen yet waits."""

    default_nickname: str = Field(default="an agent", min_length=1, max_length=40)
    default_nickname_by_locale: dict[str, str] = Field(default_factory=dict)
    nicknames: dict[str, str] = Field(default_factory=dict, description="agent id → nickname")
    hold_unknown_seconds: int = Field(default=10, ge=1, le=300)

    @field_validator("default_nickname_by_locale", "nicknames")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for key, name in v.items():
            if not name.strip() or len(name) > 40:
                raise ValueError(f"{key}: a nickname has 1 to 40 characters")
        return v


class Retention(_Section):
    """How long the state of a closed conversation is kept whole, and a person remembered."""

    closed_state_seconds: int = Field(default=3600, ge=60, description="then compacted to what later rules need")
    returning_days: int = Field(default=365, ge=1, description="a person counts as returning this long")


class History(_Section):
    """The history store (issue 16): how long transcripts are kept."""

    retain_days: int = Field(default=365, ge=0, description="delete conversations idle this long; 0 keeps all")
    retention_check_seconds: int = Field(default=3600, gt=0, description="how often the sink deletes old ones")


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
    agents: Agents = Agents()
    retention: Retention = Retention()
    words: dict[str, Words] = Field(default_factory=dict, description="locale or language → words")
    history: History = History()
    bots: Bots = Bots()  # #15: config_bots.py
    optin: Optin = Optin()
    profile: Profile = Profile()  # #17: config_rich.py
    personas: Personas = Personas()
    media: Media = Media()

    @model_validator(mode="after")
    def _checks(self) -> ConnectorConfig:
        self._check_texts()
        seen: set[str] = set()
        for i, page in enumerate(self.pages):
            if page.page_id in seen:
                raise ValueError(f"pages[{i}].page_id {page.page_id!r} is listed twice")
            seen.add(page.page_id)
        for name in self.all_skills():
            if not name or len(name) > 64 or any(c not in _SKILL_CHARS for c in name):
                raise ValueError(
                    f"skill name {name!r} may hold only letters, digits, '.', '_' and '-' (at most 64)"
                )
        return self

    def _check_texts(self) -> None:
        """Every customer-facing text fits `limits.agent_text` and uses only known placeholders."""
        limit = self.limits.agent_text
        ttr_max = max([DEFAULT_WORDS.longest(), *(w.longest() for w in self.words.values())])
        defaults = {t: text for t, text in DEFAULT_TEXTS.items() if t != "csat_thanks"}
        check_templates(self.auto_messages, limit, ttr_max, defaults)
        thanks = self.auto_messages.get("csat_thanks")
        if thanks is None or (thanks.enabled and thanks.text is None):
            check_text("csat.thank_you", self.csat.thank_you, limit, ttr_max)
        questions = {"csat.question": self.csat.question}
        questions.update({f"csat.question_by_locale.{k}": v for k, v in self.csat.question_by_locale.items()})
        questions.update({f"csat.question_by_page.{k}": v for k, v in self.csat.question_by_page.items()})
        for where, text in questions.items():
            check_text(where, text, limit, ttr_max, QUESTION_PLACEHOLDERS)

    def words_for(self, locale: str | None) -> Words:
        """The words of a locale: exact, then its language, then English."""
        if locale:
            found = self.words.get(locale) or self.words.get(locale.split("_")[0])
            if found is not None:
                return found
        return self.words.get("en", DEFAULT_WORDS)

    def nickname(self, agent_id: str | None, given: str | None, locale: str | None) -> str:
        """What the consumer is told an agent is called: the nickname the action gave, else the
        configured one, else `agents.default_nickname` (by locale): never an id, never empty."""
        if given and given.strip():
            return given.strip()
        if agent_id and agent_id in self.agents.nicknames:
            return self.agents.nicknames[agent_id]
        by_locale = self.agents.default_nickname_by_locale
        if locale and by_locale:
            found = by_locale.get(locale) or by_locale.get(locale.split("_")[0])
            if found:
                return found
        return self.agents.default_nickname

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
        names.update(self.bots.skills.values())  # #15: hand-over metadata may name a skill
        return sorted(names)


QUESTION_PLACEHOLDERS = PLACEHOLDERS - {"agent_nickname", "agent_id", "expected_response_time"}
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

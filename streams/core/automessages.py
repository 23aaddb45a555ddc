"""Automatic (system) messages: triggers, default texts, placeholders, and the most specific override.

Each trigger has a default text (after LivePerson's automatic messages) and may be overridden in
`[auto_messages.<trigger>]` with `text`, `by_locale`, `by_page` and `by_skill` tables, or switched
off with `enabled = false`. The most specific text wins: skill, then page, then locale (exact,
then language), then the trigger's own text.

Every placeholder has a longest rendered length (`PLACEHOLDER_MAX`): values are cut to it at a
word boundary when rendered, so a text that fits `limits.agent_text` with every placeholder at its
longest always fits when sent. `check_text` is what start-up runs on every text.
"""

from __future__ import annotations

import math
import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Trigger = Literal[
    "welcome_first",
    "welcome_returning",
    "welcome_first_off_hours",
    "welcome_returning_off_hours",
    "off_hours_mid_conversation",
    "response_time_updated",
    "marked_urgent",
    "unmarked_urgent",
    "consumer_not_responding",
    "agent_not_responding",
    "waiting_for_agent",
    "transferred",
    "returned_to_queue",
    "accepted",
    "manager_joined",
    "manager_left",
    "closed_by_agent",
    "closed_idle",
    "csat_thanks",
]

_TTR = "{expected_response_time}"
DEFAULT_TEXTS: dict[str, str] = {
    "welcome_first": "Welcome! We're excited to offer you messaging, allowing you to reply to us in your own time. "
    f"An agent should reply {_TTR}.",
    "welcome_returning": f"Thank you for messaging us. An agent should reply {_TTR}.",
    "welcome_first_off_hours": "Welcome! Although our contact center is currently closed, we're excited to offer "
    f"you messaging, allowing you to reply in your own time. An agent should reply {_TTR}.",
    "welcome_returning_off_hours": "Thank you for messaging us. Our contact center is currently closed. "
    f"An agent should reply {_TTR}.",
    "off_hours_mid_conversation": f"Sorry, our contact center is currently closed. An agent should reply {_TTR}.",
    "response_time_updated": f"An agent should respond {_TTR}.",
    "marked_urgent": f"You have marked this conversation as urgent. An agent should respond {_TTR}.",
    "unmarked_urgent": f"You have marked this conversation as not urgent. An agent should respond {_TTR}.",
    "consumer_not_responding": "We haven't heard from you in a while. Do you still need help with something?",
    "agent_not_responding": "Sorry it's taking longer than expected to reply. Your agent will respond shortly.",
    "waiting_for_agent": "Sorry our wait times are longer than expected. You will be connected to an agent shortly.",
    "transferred": "You are being transferred to another agent.",
    "returned_to_queue": f"Sorry, your agent can't respond right now. Another agent will be with you {_TTR}.",
    "accepted": "You are now connected to {agent_nickname}.",
    "manager_joined": "{agent_nickname} joined the conversation.",
    "manager_left": "{agent_nickname} left the conversation.",
    "closed_by_agent": "This conversation has been closed by {agent_nickname}. Thank you for contacting us!",
    "closed_idle": "We haven't heard from you in a while, so we closed this conversation. Message us any time.",
    "csat_thanks": "Thank you for your feedback!",
}

# The longest a placeholder renders (values are cut at a word boundary to this many characters);
# `expected_response_time` is bounded by the configured words instead (see `Words.longest`).
PLACEHOLDER_MAX: dict[str, int] = {
    "agent_nickname": 40,
    "agent_id": 40,
    "skill": 64,
    "page_name": 60,
    "page_id": 24,
    "locale": 16,
    "expected_response_time": 60,
    "consumer_first_name": 40,  # #17: the profile's first name, else `profile.first_name_fallback`
}
PLACEHOLDERS = frozenset(PLACEHOLDER_MAX)
TTR_PLACEHOLDER = "expected_response_time"


class AutoMessage(BaseModel):
    """Overrides of one trigger's text; `enabled = false` switches the trigger off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    text: str | None = None
    by_locale: dict[str, str] = Field(default_factory=dict)
    by_page: dict[str, str] = Field(default_factory=dict)
    by_skill: dict[str, str] = Field(default_factory=dict)

    def texts(self) -> dict[str, str]:
        """Every text of this override, by its key below the trigger (`text`, `by_locale.es`, …)."""
        out = {"text": self.text} if self.text is not None else {}
        for table in ("by_locale", "by_page", "by_skill"):
            out.update({f"{table}.{k}": v for k, v in getattr(self, table).items()})
        return out


class Words(BaseModel):
    """How `{expected_response_time}` is said in one language: `within` with `{n}` and `{unit}`, or
    `shortly` when no response time is known; `{page_name}` falls back to `page`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shortly: str = "shortly"
    within: str = "within {n} {unit}"
    second: str = "second"
    seconds: str = "seconds"
    minute: str = "minute"
    minutes: str = "minutes"
    hour: str = "hour"
    hours: str = "hours"
    day: str = "day"
    days: str = "days"
    page: str = "our page"

    @field_validator("within")
    @classmethod
    def _within_fields(cls, v: str) -> str:
        fields = placeholders_of(v)
        if fields != {"n", "unit"}:
            raise ValueError("must use exactly the placeholders {n} and {unit}")
        return v

    @model_validator(mode="after")
    def _fits(self) -> Words:
        if self.longest() > PLACEHOLDER_MAX[TTR_PLACEHOLDER]:
            raise ValueError(
                f"a response time may render {self.longest()} characters, over {PLACEHOLDER_MAX[TTR_PLACEHOLDER]}"
            )
        return self

    def duration(self, seconds: int | None) -> str:
        """`seconds` in words: `within 2 hours`, `within 90 minutes`; `shortly` when None."""
        if not seconds or seconds <= 0:
            return self.shortly
        for size, one, many in ((86_400, self.day, self.days), (3_600, self.hour, self.hours),
                                (60, self.minute, self.minutes), (1, self.second, self.seconds)):
            if seconds % size == 0 or seconds >= 2 * size:
                n = math.ceil(seconds / size)
                return self.within.format(n=n, unit=one if n == 1 else many)
        raise AssertionError("unreachable: every positive duration has whole seconds")  # pragma: no cover

    def longest(self) -> int:
        """The longest `duration` can render (response times are at most 30 days)."""
        units = (self.second, self.seconds, self.minute, self.minutes, self.hour, self.hours, self.day, self.days)
        return max(len(self.shortly), len(self.within.format(n=9999, unit=max(units, key=len))))


DEFAULT_WORDS = Words()


def placeholders_of(text: str) -> set[str]:
    """The `{name}` fields a template uses; raises ValueError on a malformed template."""
    names = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"malformed template: {exc}") from None
    for _, field, _, _ in parsed:
        if field is not None:
            if not field.isidentifier():
                raise ValueError(f"malformed placeholder {{{field}}}")
            names.add(field)
    return names


def longest_rendering(text: str, ttr_max: int) -> int:
    """The length of `text` with every placeholder at its longest."""
    total = 0
    for literal, field, _, _ in string.Formatter().parse(text):
        total += len(literal)
        if field is not None:
            total += ttr_max if field == TTR_PLACEHOLDER else PLACEHOLDER_MAX[field]
    return total


def check_text(where: str, text: str, limit: int, ttr_max: int, allowed: frozenset[str] = PLACEHOLDERS) -> None:
    """Raise ValueError naming `where` when `text` has an unknown or malformed placeholder, is
    empty, or may render longer than `limit` characters."""
    if not text.strip():
        raise ValueError(f"{where}: the text is empty")
    try:
        unknown = placeholders_of(text) - allowed
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if unknown:
        raise ValueError(
            f"{where}: unknown placeholder {{{sorted(unknown)[0]}}} (known: {', '.join(sorted(allowed))})"
        )
    longest = longest_rendering(text, ttr_max)
    if longest > limit:
        raise ValueError(
            f"{where}: up to {longest} characters with its placeholders at their longest, "
            f"over limits.agent_text ({limit})"
        )


def check_templates(auto: dict[str, AutoMessage], limit: int = 2000, ttr_max: int = 60,
                    defaults: dict[str, str] | None = None) -> None:
    """Raise ValueError naming the key of an unknown trigger, an unknown/malformed placeholder or a
    text that may not fit `limit`; the default texts of enabled triggers are checked too."""
    defaults = DEFAULT_TEXTS if defaults is None else defaults
    for trigger, am in auto.items():
        if trigger not in DEFAULT_TEXTS:
            raise ValueError(f"auto_messages.{trigger}: unknown trigger (known: {', '.join(sorted(DEFAULT_TEXTS))})")
        for where, text in am.texts().items():
            check_text(f"auto_messages.{trigger}.{where}", text, limit, ttr_max)
    for trigger, text in defaults.items():
        override = auto.get(trigger)
        if override is not None and (not override.enabled or override.text is not None):
            continue
        check_text(f"auto_messages.{trigger} (default text)", text, limit, ttr_max)


def resolve_template(
    auto: dict[str, AutoMessage],
    trigger: str,
    *,
    locale: str | None,
    page_id: str | None,
    skill: str | None,
    default: str | None = None,
) -> str | None:
    """The template for a trigger in this context, or None when the trigger is switched off.
    `default` replaces the built-in default text (the CSAT thank-you comes from `csat.thank_you`)."""
    default = default if default is not None else DEFAULT_TEXTS[trigger]
    am = auto.get(trigger)
    if am is None:
        return default
    if not am.enabled:
        return None
    if skill and skill in am.by_skill:
        return am.by_skill[skill]
    if page_id and page_id in am.by_page:
        return am.by_page[page_id]
    if locale:
        if locale in am.by_locale:
            return am.by_locale[locale]
        lang = locale.split("_")[0]
        if lang in am.by_locale:
            return am.by_locale[lang]
    return am.text if am.text is not None else default


def clamp(value: str, limit: int) -> str:
    """`value` cut to at most `limit` characters at a word boundary (whole words only)."""
    if len(value) <= limit:
        return value
    cut = value[: limit + 1].rsplit(" ", 1)[0] if " " in value[: limit + 1] else value[:limit]
    return cut[:limit].rstrip()


def render(template: str, values: dict[str, str]) -> str:
    """Fill the placeholders (checked at start-up, so every name is known), each value cut to its
    longest; a text that starts with a placeholder starts with a capital letter."""
    filled = {name: clamp(values.get(name, ""), PLACEHOLDER_MAX[name]) for name in PLACEHOLDERS}
    text = template.format_map(filled)
    if template.startswith("{") and text[:1].islower():
        text = text[0].upper() + text[1:]
    return text


def uses_response_time(template: str) -> bool:
    """Does the template say when an agent will answer (suppressed once that time is overdue)?"""
    return "{" + TTR_PLACEHOLDER + "}" in template

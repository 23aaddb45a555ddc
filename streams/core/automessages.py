"""Automatic (system) messages: triggers, default texts, and the most specific override.

Each trigger has a default text (after LivePerson's automatic messages) and may be overridden in
`[auto_messages.<trigger>]` with `text`, `by_locale`, `by_page` and `by_skill` tables, or switched
off with `enabled = false`. The most specific text wins: skill, then page, then locale (exact,
then language), then the trigger's own text. Placeholders are checked at start-up.
"""

from __future__ import annotations

import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Trigger = Literal[
    "welcome_first",
    "welcome_returning",
    "transferred",
    "accepted",
    "closed_by_agent",
    "closed_idle",
    "waiting_for_agent",
    "csat_thanks",
]

DEFAULT_TEXTS: dict[str, str] = {
    "welcome_first": "Welcome! We're excited to offer you messaging, allowing you to reply to us in your own time. "
    "An agent will be with you shortly.",
    "welcome_returning": "Thank you for messaging us. An agent will be with you shortly.",
    "transferred": "You are being transferred to another agent.",
    "accepted": "You are now connected to {agent_nickname}.",
    "closed_by_agent": "This conversation has been closed by {agent_nickname}. Thank you for contacting us!",
    "closed_idle": "We haven't heard from you in a while, so we closed this conversation. Message us any time.",
    "waiting_for_agent": "Sorry our wait times are longer than expected. You will be connected to an agent shortly.",
    "csat_thanks": "Thank you for your feedback!",
}

PLACEHOLDERS = frozenset({"agent_nickname", "agent_id", "skill", "page_name", "page_id", "locale"})


class AutoMessage(BaseModel):
    """Overrides of one trigger's text; `enabled = false` switches the trigger off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    text: str | None = None
    by_locale: dict[str, str] = Field(default_factory=dict)
    by_page: dict[str, str] = Field(default_factory=dict)
    by_skill: dict[str, str] = Field(default_factory=dict)


def placeholders_of(text: str) -> set[str]:
    """The `{name}` fields a template uses; raises ValueError on a malformed template."""
    names = set()
    for _, field, _, _ in string.Formatter().parse(text):
        if field is not None:
            if not field.isidentifier():
                raise ValueError(f"malformed placeholder {{{field}}}")
            names.add(field)
    return names


def check_templates(auto: dict[str, AutoMessage]) -> None:
    """Raise ValueError naming the key of an unknown trigger or an unknown/malformed placeholder."""
    for trigger, am in auto.items():
        if trigger not in DEFAULT_TEXTS:
            raise ValueError(f"auto_messages.{trigger}: unknown trigger (known: {', '.join(sorted(DEFAULT_TEXTS))})")
        texts = {"text": am.text} if am.text is not None else {}
        for table in ("by_locale", "by_page", "by_skill"):
            texts.update({f"{table}.{k}": v for k, v in getattr(am, table).items()})
        for where, text in texts.items():
            if text is None:
                continue
            try:
                unknown = placeholders_of(text) - PLACEHOLDERS
            except ValueError as exc:
                raise ValueError(f"auto_messages.{trigger}.{where}: {exc}") from None
            if unknown:
                raise ValueError(
                    f"auto_messages.{trigger}.{where}: unknown placeholder {{{sorted(unknown)[0]}}} "
                    f"(known: {', '.join(sorted(PLACEHOLDERS))})"
                )


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


def render(template: str, values: dict[str, str]) -> str:
    """Fill the placeholders (checked at start-up, so every name is known)."""
    return template.format_map({name: values.get(name, "") for name in PLACEHOLDERS})

"""Config sections of #15: bots sharing the thread with human agents, and the checkout opt-in.

`[bots]` names the bot (a Conversation Routing app) per page or for the account and says what the
connector does with the thread; `[optin]` says how checkout opt-ins and merchant orders meet.
Validated at start-up like every other section of `streams.core.config` (which holds them).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

PAGE_INBOX_APP_ID = "263902037430900"  # Meta's Page Inbox (Business Suite): a human at the page
METADATA_MAX = 1000  # Meta: thread-control `metadata` is at most 1,000 characters
TRANSCRIPT_LINES_MAX = 20
_APP_ID = re.compile(r"^[0-9]{1,32}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _app_id(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and not _APP_ID.match(value):
        raise ValueError(f"{value!r} is not a Facebook app id (digits)")
    return value


class BotPage(_Section):
    """The bot of one page: the app that owns the page's threads when no human is needed."""

    app_id: str

    @field_validator("app_id", mode="before")
    @classmethod
    def _check(cls, v: object) -> object:
        return _app_id(v)


class Bots(_Section):
    """Bots and humans in one thread (Meta's Conversation Routing, the Handover Protocol's API).

    A bot passes the thread to our app (`pass_thread_control`): a conversation opens on the skill its
    metadata names, with the bot's transcript. When the conversation closes (after the CSAT survey is
    answered or expires) the thread goes back to the page's bot."""

    default_app_id: str | None = Field(default=None, description="the bot of every page without its own")
    pages: dict[str, BotPage] = Field(default_factory=dict, description="page id → its bot")
    skills: dict[str, str] = Field(
        default_factory=dict,
        description="hand-over metadata (plain text, or JSON with a `skill` field) → skill; a value that is "
        "a skill itself needs no entry; anything else goes to the page's skill",
    )
    take_thread_on_agent_message: bool = Field(
        default=False,
        description="an agent message while another app owns the thread takes it first (our app must be the "
        "page's primary receiver); false: the message is rejected `thread_not_owned` and control is requested",
    )
    release_without_bot: bool = Field(
        default=False,
        description="no bot for the page: on close, release the thread to idle (true) or leave it alone (false)",
    )
    transcript_minutes: int = Field(default=30, ge=1, le=1440, description="bot transcript: the last N minutes")
    transcript_messages: int = Field(default=20, ge=1, le=TRANSCRIPT_LINES_MAX,
                                     description="bot transcript: at most M messages")
    request_again_after_seconds: int = Field(
        default=60, ge=1, description="at most one `request_thread_control` per conversation in this time"
    )

    @field_validator("default_app_id", mode="before")
    @classmethod
    def _check_default(cls, v: object) -> object:
        return _app_id(v)

    @field_validator("pages", mode="before")
    @classmethod
    def _page_ids(cls, v: object) -> object:
        if isinstance(v, dict):
            return {str(k): val for k, val in v.items()}
        return v

    def app_for(self, page_id: str) -> str | None:
        """The bot of a page: its own, else the account's default, else None."""
        page = self.pages.get(page_id)
        return page.app_id if page is not None else self.default_app_id


class Optin(_Section):
    """Checkout opt-ins (checkbox plugin, Send to Messenger) meeting merchant orders (`commerce.orders`)."""

    match_window_seconds: int = Field(
        default=3600, ge=10, le=7 * 86_400,
        description="an opt-in and its order meet when they arrive at most this far apart (either first)",
    )
    relink_days: int = Field(
        default=30, ge=1, le=365,
        description="after the person replies, a checkout key forwards later orders and actions to the PSID this long",
    )
    close_unanswered_after_hours: int = Field(
        default=168, ge=1, le=24 * 90,
        description="a checkbox checkout's conversation the person never answered closes after this (reason "
        "`no_reply`); it holds no message window, so nothing is sent",
    )
    update_text: str = Field(
        default="Update on your order {order_number}: {status}", min_length=1, max_length=640,
        description="an order update for the customer; placeholders {order_number}, {status}, {note}",
    )
    payment_method: str = Field(default="Card", min_length=1, max_length=80,
                                description="the receipt's payment method when the order names none")

    @field_validator("update_text")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        unknown = set(re.findall(r"\{([a-z_]+)\}", v)) - {"order_number", "status", "note"}
        if unknown:
            raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}} (known: order_number, status, note)")
        return v

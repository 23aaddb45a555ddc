"""The page directory's records (`connector.pages`, compacted) and page activity (`connector.pages.activity`).

`connector.pages` holds three kinds of record, told apart by the key:

- `<page_id>` (digits) → `PageRecord`: a page's settings and its encrypted access token;
- `account` → `AccountRecord`: the account-level settings the onboarding page edits;
- `reauth:<page_id>` → `ReauthMark`: Meta rejected the page's token (Graph error 190). It names the
  token it applies to (`token_id`), so reconnecting the page (a new token, a new `token_id`) voids
  it without anyone having to delete it.

`connector.pages.activity` holds `event:<page_id>` and `send:<page_id>` → `PageActivity`: when the
workers last took in an event of the page and when a dispatcher last sent for it (written at most
every few seconds per page, so `pages list` and the admin page can show them).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

ACCOUNT_KEY = "account"
REAUTH_PREFIX = "reauth:"

PageStatus = Literal["active", "disabled", "needs_reauth", "disconnected"]
RoutingMode = Literal["entry_point", "manual"]
UnknownPages = Literal["default_skill", "dead_letter"]
SKILL_PATTERN = r"^[A-Za-z0-9._-]{1,200}$"  # a skill names a Kafka topic: skill.<skill>


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PageRecord(_Record):
    """One page as connected (or disconnected: `connected` false keeps the page from coming back
    from the TOML file). `token` is a Fernet token of the page access token, never the token itself;
    `token_id` is a random id given each time a token is stored."""

    kind: Literal["page"] = "page"
    page_id: str = Field(pattern=r"^[0-9]{1,40}$")
    name: str | None = None
    skill: str | None = Field(default=None, pattern=SKILL_PATTERN)
    locale: str = "en_US"
    enabled: bool = True
    connected: bool = True
    connected_at: int | None = None
    connected_by: str | None = None
    updated_at: int | None = None
    updated_by: str | None = None
    token: str | None = Field(default=None, repr=False)
    token_id: str | None = None
    token_expires_at: int | None = None  # epoch ms; None: never (or unknown)
    scopes: list[str] = []
    subscribed_fields: list[str] = []


class AccountRecord(_Record):
    """Account-level settings, live: the "Activate Facebook source" toggle, routing, external user."""

    kind: Literal["account"] = "account"
    active: bool = True
    mode: RoutingMode = "entry_point"
    default_skill: str = Field(default="general", pattern=SKILL_PATTERN)
    unknown_pages: UnknownPages = "default_skill"
    external_agent_id: str = "connector"
    external_nickname: str = "FB External User"
    updated_at: int | None = None
    updated_by: str | None = None


class ReauthMark(_Record):
    """Meta rejected the token `token_id` of page `page_id` (error 190) at `at`."""

    kind: Literal["reauth"] = "reauth"
    page_id: str
    token_id: str | None
    at: int
    code: int = 190
    subcode: int | None = None
    message: str = ""
    by: str | None = None


class PageActivity(_Record):
    """When a page last had an event taken in (`kind` event) or a message sent (`kind` send)."""

    page_id: str
    kind: Literal["event", "send"]
    at: int
    result: str | None = None  # for sends: sent / failed


DirectoryRecord = Annotated[PageRecord | AccountRecord | ReauthMark, Field(discriminator="kind")]
DIRECTORY_RECORD: TypeAdapter[PageRecord | AccountRecord | ReauthMark] = TypeAdapter(DirectoryRecord)
PAGE_ACTIVITY: TypeAdapter[PageActivity] = TypeAdapter(PageActivity)

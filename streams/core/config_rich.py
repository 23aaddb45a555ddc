"""Config sections of #17: the customer's profile, personas and media keeping.

`[profile]`, `[personas]` and `[media]` of the connector TOML (all off by default), validated at
start-up like every other section of `streams.core.config` (which holds them).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PERSONA_NAME_MAX = 50  # Meta: "The display name of the persona. Maximum 50 characters."
PROFILE_FIELDS = ("first_name", "last_name", "profile_pic", "locale", "timezone", "gender")
MIB = 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _http_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("https://", "http://")):
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


class Profile(_Section):
    """The User Profile API: fetched by the dispatcher when a conversation opens, kept per person
    (in the conversation's state) for `ttl_seconds`. A failed call is counted and never waited for."""

    enabled: bool = False
    fields: list[str] = Field(default_factory=lambda: ["first_name", "last_name", "profile_pic", "locale", "timezone"])
    ttl_seconds: int = Field(default=7 * 86_400, gt=0, description="a profile older than this is fetched again")
    retry_after_seconds: int = Field(default=3_600, gt=0, description="after a failed call, wait before the next")
    first_name_fallback: str = Field(default="there", max_length=40,
                                     description="{consumer_first_name} when the first name is unknown")

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in PROFILE_FIELDS]
        if unknown:
            raise ValueError(f"unknown profile field {unknown[0]!r} (known: {', '.join(PROFILE_FIELDS)})")
        if not v:
            raise ValueError("at least one profile field")
        return v


class Personas(_Section):
    """Messenger personas: automatic messages (and the CSAT survey) go out as the system persona,
    and with `agents = true` each agent's messages as a persona named after the agent's nickname."""

    enabled: bool = False
    system_name: str = Field(default="Assistant", min_length=1, max_length=PERSONA_NAME_MAX)
    system_picture_url: str | None = None
    agents: bool = False
    agent_picture_url: str | None = None
    retry_after_seconds: int = Field(default=600, gt=0, description="after a failed creation, send without a "
                                     "persona for this long before trying again")
    max_personas: int = Field(default=1_000, gt=0, description="personas remembered per dispatcher (a bound)")

    _urls = field_validator("system_picture_url", "agent_picture_url")(_http_url)

    @model_validator(mode="after")
    def _pictures(self) -> Personas:
        if self.enabled and self.system_picture_url is None:
            raise ValueError("system_picture_url is required when personas are enabled (Meta needs a picture)")
        if self.enabled and self.agents and self.agent_picture_url is None:
            raise ValueError("agent_picture_url is required when agents = true")
        return self


class Media(_Section):
    """Media keeping: `messenger-streams media` downloads inbound attachments before Meta's CDN URLs
    expire and stores them under `store` by content hash. Off while `store` is not set."""

    store: str | None = Field(default=None, description="directory of the stored files; unset: off")
    max_bytes: int = Field(default=25 * MIB, gt=0, le=1024 * MIB)
    attachment_types: list[str] = Field(default_factory=lambda: ["image", "video", "audio", "file", "sticker"])
    content_types: list[str] = Field(
        default_factory=lambda: ["image/", "video/", "audio/", "application/pdf"],
        description="MIME type prefixes kept (the server's Content-Type)",
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["fbcdn.net", "fbsbx.com", "facebook.com", "cdninstagram.com"],
        description="hosts (and their subdomains) media is fetched from: never an arbitrary address",
    )
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    concurrency: int = Field(default=4, gt=0, le=64)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for host in v:
            if not host or "/" in host or ":" in host:
                raise ValueError(f"{host!r} is not a host name (no scheme, port or path)")
        return [h.lower().lstrip(".") for h in v]

"""Messenger webhook POST bodies (`messenger.webhook.raw`): the envelope and every item kind.

Real payloads carry ids as JSON numbers or strings; every id becomes a string here and is never
parsed through a float. Timestamps are epoch milliseconds. Unknown item kinds are kept, not dropped.
Models allow extra fields: Meta adds fields over time and we must not reject them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def as_id(value: Any) -> str:
    """An id as a string: ints and non-empty strings pass, everything else is a schema violation."""
    if isinstance(value, bool):
        raise ValueError("id must be a string or an integer, not a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if not value or len(value) > 256:
            raise ValueError("id must be a non-empty string of at most 256 characters")
        return value
    raise ValueError(f"id must be a string or an integer, not {type(value).__name__}")


def as_epoch_ms(value: Any) -> int:
    """Epoch milliseconds from an int, or a numeric string; second-resolution values are scaled."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be a number")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ValueError("timestamp must be an integer (epoch ms)")
    ms: int = value
    if ms < 0:
        raise ValueError("timestamp must not be negative")
    if 0 < ms < 100_000_000_000:  # seconds, as in some Marketing Messages payloads
        ms *= 1000
    return ms


Id = Annotated[str, BeforeValidator(as_id)]
EpochMs = Annotated[int, BeforeValidator(as_epoch_ms)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Party(_Open):
    """`sender` / `recipient`: a PSID or a Page id (or a `user_ref` for checkbox opt-ins)."""

    id: Id | None = None
    user_ref: str | None = None


class Attachment(_Open):
    type: str
    payload: dict[str, Any] | None = None
    title: str | None = None
    url: str | None = None


class QuickReply(_Open):
    payload: str | None = None


class ReplyTo(_Open):
    mid: str | None = None


class Message(_Open):
    """`message`: from a person, or an echo (`is_echo`) of what the page sent."""

    mid: str | None = None
    text: str | None = None
    is_echo: bool = False
    app_id: Id | None = None
    metadata: str | None = None
    quick_reply: QuickReply | None = None
    attachments: list[Attachment] | None = None
    reply_to: ReplyTo | None = None
    sticker_id: Id | None = None
    referral: Any = None  # a Click-to-Messenger ad's referral on the first message: read leniently


class Delivery(_Open):
    watermark: EpochMs
    mids: list[str] | None = None


class Read(_Open):
    watermark: EpochMs


class Referral(_Open):
    ref: str | None = None
    source: str | None = None
    type: str | None = None
    ad_id: Id | None = None


class Postback(_Open):
    mid: str | None = None
    title: str | None = None
    payload: str | None = None
    referral: Referral | None = None


class Optin(_Open):
    ref: str | None = None
    user_ref: str | None = None
    type: str | None = None
    payload: str | None = None


class Reaction(_Open):
    reaction: str | None = None
    emoji: str | None = None
    action: str
    mid: str


class MessageEdit(_Open):
    mid: str
    text: str | None = None
    num_edit: Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, str) and v.isdigit() else v)]


class PassThreadControl(_Open):
    new_owner_app_id: Id | None = None
    previous_owner_app_id: Id | None = None
    metadata: str | None = None


class TakeThreadControl(_Open):
    previous_owner_app_id: Id | None = None
    new_owner_app_id: Id | None = None
    metadata: str | None = None


class RequestThreadControl(_Open):
    requested_owner_app_id: Id | None = None
    metadata: str | None = None


class AccountLinking(_Open):
    status: str
    authorization_code: str | None = None


class PolicyEnforcement(_Open):
    action: str
    reason: str | None = None


class GamePlay(_Open):
    game_id: Id | None = None
    player_id: Id | None = None
    context_type: str | None = None
    context_id: Id | None = None
    score: int | None = None
    payload: str | None = None


class MessagingItem(_Open):
    """One item of `entry[].messaging[]` or `entry[].standby[]`; the kind is the key present."""

    sender: Party | None = None
    recipient: Party | None = None
    timestamp: EpochMs | None = None
    message: Message | None = None
    delivery: Delivery | None = None
    read: Read | None = None
    postback: Postback | None = None
    referral: Referral | None = None
    optin: Optin | None = None
    reaction: Reaction | None = None
    message_edit: MessageEdit | None = None
    pass_thread_control: PassThreadControl | None = None
    take_thread_control: TakeThreadControl | None = None
    request_thread_control: RequestThreadControl | None = None
    app_roles: dict[str, list[str]] | None = None
    account_linking: AccountLinking | None = None
    policy_enforcement: PolicyEnforcement | None = None
    policy_enforcement_legacy: PolicyEnforcement | None = Field(default=None, alias="policy-enforcement")
    game_play: GamePlay | None = None


class Entry(_Open):
    """One `entry[]`: a page and its items. `changes[]` (feed fields) is tolerated and ignored."""

    id: Id
    time: EpochMs | None = None
    messaging: list[Any] = Field(default_factory=list)
    standby: list[Any] = Field(default_factory=list)
    changes: list[Any] | None = None


class WebhookBody(_Open):
    """The whole POST body. Items are validated one by one so one bad item spares its neighbours."""

    object: str
    entry: list[dict[str, Any]]

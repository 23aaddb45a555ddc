"""Values of the public topics of CONTRACT.md (and the internal ones other stages rely on).

- `agent.actions`: `AgentAction` (validated per type by the conversation stage)
- `skill.<skill_id>`: `ConsoleEvent` (common fields; each type adds its own, see docs/console-events.md)
- `messenger.outbound`: `OutboundRequest`
- `messenger.send.results` (internal): `SendResult`, written by the dispatcher
- `csat.responses`: `CsatResponse`
- `csat.facts` (internal): `CsatFact`, written by the conversation stage, aggregated by the CSAT stage
- `conversations.history`: `ConversationSummary`
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema

from schemas.messages import QUICK_REPLIES_MAX, MessageAttachment, QuickReplyOut, Template, inline_schema

ActionType = Literal[
    "accept", "message", "typing", "read", "transfer", "close", "open",
    "join", "leave", "return_to_queue", "set_response_time", "forget",
    "to_bot",  # #15: the thread goes to the page's bot (optional `metadata`)
]
Role = Literal["agent", "manager", "admin"]
Origin = Literal["agent", "system", "csat"]
MAX_RESPONSE_SECONDS = 30 * 86_400


def _optional(schema: dict[str, Any], description: str) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [schema, {"type": "null"}], "default": None, "description": description})


# Rich message fields (#17): any JSON passes here; `streams.rules.messages.check_message` checks them
# and rejects with `invalid_message` naming the field. The JSON Schema shows their shape and limits.
RichAttachment = Annotated[Any, _optional(inline_schema(MessageAttachment), "a file by URL: image, video, audio, file")]
RichQuickReplies = Annotated[
    Any,
    _optional(
        {"type": "array", "items": inline_schema(QuickReplyOut), "minItems": 1, "maxItems": QUICK_REPLIES_MAX},
        "quick replies under the message (with text, an attachment or a template)",
    ),
]
RichTemplate = Annotated[Any, _optional(inline_schema(Template), "a button, generic or media template")]


class AgentAction(BaseModel):
    """An agent console's action. `action_id` is unique: a repeated id is applied once.

    `role`: `manager` may act on any conversation (and `join` / `leave` it); `admin` may `forget`
    a person. `conversation_id` (optional) names the conversation the agent sees: an action for
    one that is closed is rejected at once instead of being held."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: ActionType
    action_id: str = Field(min_length=1, max_length=200)
    page_id: str = Field(min_length=1)
    psid: str = Field(min_length=1)
    agent_id: str = Field(min_length=1, max_length=128)
    role: Role = "agent"
    agent_nickname: str | None = Field(default=None, max_length=200)
    conversation_id: str | None = Field(default=None, max_length=200)
    text: str | None = None
    attachment: RichAttachment = None
    quick_replies: RichQuickReplies = None
    template: RichTemplate = None
    on: bool | None = None
    to_skill: str | None = None
    to_agent_id: str | None = Field(default=None, min_length=1, max_length=128)
    to_agent_nickname: str | None = Field(default=None, max_length=200)
    seconds: int | None = Field(default=None, gt=0, le=MAX_RESPONSE_SECONDS)
    reason: str | None = Field(default=None, max_length=64)
    metadata: str | None = Field(default=None, max_length=1000, description="#15 `to_bot`: what the bot is told")
    timestamp: int | None = None


CONSOLE_EVENT_TYPES = (
    "conversation_opened", "consumer_message", "external_message", "agent_message", "system_message", "status",
    "typing", "conversation_accepted", "conversation_transferred", "conversation_returned", "conversation_closed",
    "manager_joined", "manager_left", "agent_not_responding", "response_time_set", "urgency_changed",
    "csat_requested", "csat_received", "action_rejected", "send_failed", "referral", "reaction",
    "message_edit", "standby_event", "context_event", "profile", "media_stored", "page_status",
    # #15: bots and the checkout opt-in
    "handover_context", "thread_control", "purchase", "order_update", "order_unmatched", "conversation_relinked",
)
REJECTION_REASONS = (
    "invalid_action", "text_too_long", "window_closed", "unknown_conversation", "not_owner", "not_assigned",
    "invalid_message", "thread_not_owned",
)


class ConsoleEvent(BaseModel):
    """Common fields of every console event on `skill.<skill_id>`; types add fields of their own
    (docs/console-events.md). Consumers should ignore types they do not know."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(description="one of: " + ", ".join(CONSOLE_EVENT_TYPES)
                      + "; `action_rejected.reason` is one of: " + ", ".join(REJECTION_REASONS))
    event_id: str
    conversation_id: str | None
    page_id: str
    psid: str | None
    skill: str
    timestamp: int


class OutboundRequest(BaseModel):
    """One Send API request for the dispatcher. `request` is the exact Send API body."""

    model_config = ConfigDict(extra="allow", frozen=True)

    page_id: str
    psid: str
    outbox_id: str
    conversation_id: str | None
    origin: Origin
    request: dict[str, Any]
    skill: str | None = None
    agent_id: str | None = None
    created_at: int | None = None
    agent_nickname: str | None = Field(default=None, description="#17: names the agent's persona")
    endpoint: str | None = Field(
        default=None,
        description="the Graph edge: absent or `messages` = the Send API; `user_profile` (#17): a User Profile "
        "API read for `request.psid` and `request.fields`, its answer comes back as a SendResult with `profile`; "
        "#15: `pass_thread_control`, `take_thread_control`, `request_thread_control`, `release_thread_control` "
        "(`request` is its body)",
    )


class SendResult(BaseModel):
    """What the dispatcher got from the Graph API for one outbound request (keyed by conversation)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    outbox_id: str
    page_id: str
    psid: str
    conversation_id: str | None = None
    origin: Origin | None = None
    status: Literal["sent", "failed"]
    mid: str | None = None
    mids: list[str] = []
    code: int | None = None
    subcode: int | None = None
    message: str | None = None
    retryable: bool = False
    attempts: int = 1
    timestamp: int
    endpoint: str | None = Field(default=None, description="as on the outbound record (#17: `user_profile`, "
                                 "#15: thread control)")
    profile: dict[str, Any] | None = Field(default=None, description="#17: the User Profile API's answer")


class CsatResponse(BaseModel):
    """One counted CSAT answer on `csat.responses`."""

    model_config = ConfigDict(frozen=True)

    conversation_id: str
    page_id: str
    psid: str
    skill: str
    agent_id: str | None
    score: int = Field(ge=1, le=5)
    locale: str
    timestamp: int


class FactSource(BaseModel):
    """Where a CSAT fact was made: the conversation stage's input record (`topic`, `partition`,
    `offset`) and the fact's place among the facts of that input record (`index`, from 0).

    Facts of one source partition reach the CSAT stage in (offset, index) order, so the stage
    counts a fact only when its (offset, index) is above the highest one it counted from that
    source: the dedupe key of `csat.facts`."""

    model_config = ConfigDict(frozen=True)

    topic: str = Field(min_length=1)
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    index: int = Field(default=0, ge=0)


class CsatFact(BaseModel):
    """An internal CSAT fact for the aggregates: a survey sent, or an answer counted.

    Keyed by the skill on `csat.facts`. `fact_id` is stable for a given input
    (`<conversation_id>:survey` / `<conversation_id>:answer`). `src` (set by the conversation
    stage) is the dedupe key; facts without it (older producers) are deduplicated by `fact_id`
    within a bounded window (docs/metrics.md). `mid` is the answering message's id, passed on
    to `csat_received`."""

    model_config = ConfigDict(frozen=True)

    fact: Literal["survey_sent", "answer"]
    fact_id: str
    conversation_id: str
    page_id: str
    psid: str
    skill: str
    agent_id: str | None
    score: int | None = Field(default=None, ge=1, le=5)
    locale: str
    timestamp: int
    src: FactSource | None = None
    mid: str | None = None


class ConversationSummary(BaseModel):
    """A closed conversation on `conversations.history` (compacted, keyed by conversation id).

    `agents`: every agent who sent a message (the last 10), `skills`: the skills it went through (the
    last 8); the figures are computed by the conversation rules at the close."""

    model_config = ConfigDict(extra="allow", frozen=True)

    conversation_id: str
    conversation_key: str
    page_id: str
    psid: str
    skill: str
    skills: list[str]
    agents: list[str]
    opened_at: int
    closed_at: int
    closed_by: Literal["agent", "consumer", "system"]
    close_reason: str | None = None
    consumer_messages: int = 0
    agent_messages: int = 0
    external_messages: int = 0
    system_messages: int = 0
    csat_score: int | None = None
    opened_by: Literal["consumer", "agent", "bot", "optin"] | None = None  # bot, optin: #15
    first_agent_response_ms: int | None = Field(
        default=None, description="open → first agent message; null if no agent wrote"
    )
    queue_ms: int | None = Field(default=None, description="total time unassigned while open")
    handle_ms: int | None = Field(default=None, description="open → close")
    abandoned: bool | None = Field(default=None, description="closed before any agent message")


EXPORTS: dict[str, type[BaseModel] | TypeAdapter[Any]] = {
    "agent.actions": AgentAction,
    "skill": ConsoleEvent,
    "messenger.outbound": OutboundRequest,
    "messenger.send.results": SendResult,
    "csat.responses": CsatResponse,
    "csat.facts": CsatFact,
    "conversations.history": ConversationSummary,
}

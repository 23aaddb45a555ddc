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

ActionType = Literal["accept", "message", "typing", "read", "transfer", "close", "open"]
Origin = Literal["agent", "system", "csat"]


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
    """An agent console's action. `action_id` is unique: a repeated id is applied once."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: ActionType
    action_id: str = Field(min_length=1, max_length=200)
    page_id: str = Field(min_length=1)
    psid: str = Field(min_length=1)
    agent_id: str = Field(min_length=1)
    text: str | None = None
    attachment: RichAttachment = None
    quick_replies: RichQuickReplies = None
    template: RichTemplate = None
    on: bool | None = None
    to_skill: str | None = None
    timestamp: int | None = None


class ConsoleEvent(BaseModel):
    """Common fields of every console event on `skill.<skill_id>`; types add fields of their own."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
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


class CsatFact(BaseModel):
    """An internal CSAT fact for the aggregates: a survey sent, or an answer counted.

    `fact_id` is stable for a given input (`<conversation_id>:survey` / `<conversation_id>:answer`),
    so a redelivered fact is recognised and never counted twice."""

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


class ConversationSummary(BaseModel):
    """A closed conversation on `conversations.history` (compacted, keyed by conversation id)."""

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


EXPORTS: dict[str, type[BaseModel] | TypeAdapter[Any]] = {
    "agent.actions": AgentAction,
    "skill": ConsoleEvent,
    "messenger.outbound": OutboundRequest,
    "messenger.send.results": SendResult,
    "csat.responses": CsatResponse,
    "csat.facts": CsatFact,
    "conversations.history": ConversationSummary,
}

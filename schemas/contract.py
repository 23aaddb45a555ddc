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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

ActionType = Literal["accept", "message", "typing", "read", "transfer", "close", "open"]
Origin = Literal["agent", "system", "csat"]


class AgentAction(BaseModel):
    """An agent console's action. `action_id` is unique: a repeated id is applied once."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: ActionType
    action_id: str = Field(min_length=1, max_length=200)
    page_id: str = Field(min_length=1)
    psid: str = Field(min_length=1)
    agent_id: str = Field(min_length=1)
    text: str | None = None
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

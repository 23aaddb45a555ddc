"""Opening, assigning, queueing and closing a conversation: the steps with their console events,
automatic messages, notes and figures (the state changes themselves are `turns`' pure functions).

Notes for the stage's counters (docs/lifecycle.md): `open+`/`open-` and `queue+`/`queue-` by skill
move the open-conversation and queue-depth figures; `abandoned` by skill; figures
`first_response_seconds`, `queue_wait_seconds`, `handle_seconds` by skill.
"""

from __future__ import annotations

from typing import Any, Literal

from streams.rules.conversation import csat_hooks, rich, thread, turns
from streams.rules.conversation.api import Output
from streams.rules.conversation.context import Ctx, id_hash
from streams.rules.conversation.hours import off_hours_end
from streams.rules.conversation.state import Agent, Conv
from streams.rules.conversation.system import say

ClosedBy = Literal["agent", "consumer", "system"]
# conversations where a customer waits for an agent from the open (first response, abandoned); #15:
# a bot's hand-over is one (a checkout's opening is not: nobody asked yet)
_CUSTOMER_WAITS = ("consumer", "bot")


def _open(ctx: Ctx, conv: Conv, *, timestamp: int, **extra: Any) -> bool:
    """Make `conv` the open conversation; True when the person had conversations here before."""
    st = ctx.st
    person = st["person"]
    returning = person is not None and person["convs"] > 0
    st["person"] = {"convs": (person["convs"] if person else 0) + 1, "last_at": ctx.now}
    st["conv"] = conv
    st["expire_at"] = None
    csat_hooks.end_survey(ctx, "new_conversation")
    ctx.note("opened", conv["skill"])
    ctx.note("open+", conv["skill"])
    if conv["owner"] is None:
        ctx.note("queue+", conv["skill"])
    ctx.console("conversation_opened", timestamp=timestamp, locale=conv["locale"], opened_by=conv["opened_by"],
                returning=returning, **extra)
    rich.on_open(ctx)
    return returning


def new_conversation_id(ctx: Ctx) -> str:
    """The id of a conversation opened by this input (stable across re-runs)."""
    return f"c-{id_hash(ctx.key + '|' + ctx.inp.id, 20)}"


def open_by_consumer(ctx: Ctx, *, timestamp: int) -> None:
    """A consumer message or postback with no open conversation: into the skill's queue, with the
    welcome for a first-time or returning person, in or out of the skill's hours."""
    skill, known = ctx.route()
    if not known:
        ctx.note("unknown_page", ctx.page_id)
    locale = rich.opening_locale(ctx)
    conv = turns.new_conv(new_conversation_id(ctx), skill, locale, ctx.now, "consumer")
    returning = _open(ctx, conv, timestamp=timestamp)
    off = off_hours_end(ctx.config.skill(skill).hours, ctx.now)
    trigger = "welcome_returning" if returning else "welcome_first"
    say(ctx, trigger + ("_off_hours" if off is not None else ""))
    if off is not None:
        opened = ctx.st["conv"]
        assert opened is not None  # noqa: S101 - opened just above
        ctx.st["conv"] = {**opened, "off_hours_until": off}


def open_with(ctx: Ctx, skill: str, opened_by: str, *, timestamp: int, conversation_id: str | None = None,
              welcome: bool = True, **extra: Any) -> None:
    """#15: a conversation opened for the consumer by a bot's hand-over (`bot`) or a checkout
    (`optin`): into `skill`'s queue, with the welcome (in or out of hours) when `welcome`."""
    locale = ctx.env.page.locale if ctx.env.page else "en_US"
    conv = turns.new_conv(conversation_id or new_conversation_id(ctx), skill, locale, ctx.now, opened_by)
    returning = _open(ctx, conv, timestamp=timestamp, **extra)
    off = off_hours_end(ctx.config.skill(skill).hours, ctx.now)
    if welcome:
        trigger = "welcome_returning" if returning else "welcome_first"
        say(ctx, trigger + ("_off_hours" if off is not None else ""))
    if off is not None:
        opened = ctx.st["conv"]
        assert opened is not None  # noqa: S101 - opened just above
        ctx.st["conv"] = {**opened, "off_hours_until": off}


def open_by_agent(ctx: Ctx, agent: Agent) -> None:
    """A proactive `open`: assigned to the agent, the consumer's turn from now (no welcome, no
    "connected" message: the agent's own message follows)."""
    skill, known = ctx.route()
    if not known:
        ctx.note("unknown_page", ctx.page_id)
    locale = rich.opening_locale(ctx)
    conv = turns.new_conv(new_conversation_id(ctx), skill, locale, ctx.now, "agent", owner=agent)
    _open(ctx, conv, timestamp=ctx.now)
    ctx.console("conversation_accepted", agent_id=agent["id"])


def take(ctx: Ctx, agent: Agent, *, announce: bool = True) -> None:
    """`agent` takes the conversation (accept, auto-accept, manager take-over)."""
    conv = ctx.st["conv"]
    assert conv is not None  # noqa: S101 - callers check
    leave_queue(ctx, conv)
    ctx.st["conv"] = turns.assign(conv, agent, ctx.now)
    ctx.console("conversation_accepted", agent_id=agent["id"])
    if announce:
        say(ctx, "accepted")


def leave_queue(ctx: Ctx, conv: Conv) -> None:
    """Notes and figure for the end of a queue stay (no state change)."""
    if conv["queue_since"] is not None and conv["owner"] is None:
        ctx.figure("queue_wait_seconds", conv["skill"], turns.queue_stay_ms(conv, ctx.now) / 1000)
        ctx.note("queue-", conv["skill"])


def to_queue(ctx: Ctx) -> None:
    """The conversation goes back to its skill's queue."""
    conv = ctx.st["conv"]
    assert conv is not None  # noqa: S101 - callers check
    if conv["owner"] is not None:
        ctx.note("queue+", conv["skill"])
    ctx.st["conv"] = turns.unassign(conv, ctx.now)


def agent_wrote(ctx: Ctx, agent_id: str) -> None:
    """A human agent's message went out: turns, figures, notes."""
    conv = ctx.st["conv"]
    assert conv is not None  # noqa: S101 - callers check
    if conv["first_agent_at"] is None and conv["opened_by"] in _CUSTOMER_WAITS:
        ctx.figure("first_response_seconds", conv["skill"], max(0, ctx.now - conv["opened_at"]) / 1000)
    ctx.st["conv"] = turns.agent_line(conv, agent_id, ctx.now)
    ctx.note("agent_message", agent_id)


def close(ctx: Ctx, *, closed_by: ClosedBy, reason: str, agent_id: str | None, nickname: str | None = None) -> None:
    """Close the open conversation: its message, the console event, the history summary with its
    figures, the CSAT survey when it applies; the state is kept whole for `retention.closed_state_seconds`."""
    st = ctx.st
    conv = st["conv"]
    assert conv is not None  # noqa: S101 - callers check
    if closed_by == "agent":
        say(ctx, "closed_by_agent", nickname=ctx.config.nickname(agent_id, nickname, conv["locale"]))
    elif closed_by == "system":
        say(ctx, "closed_idle")
    conv = st["conv"]
    assert conv is not None  # noqa: S101 - still open
    ctx.console("conversation_closed", closed_by=closed_by, reason=reason, agent_id=agent_id)
    summary = turns.summary(conv, key=ctx.key, page_id=ctx.page_id, psid=ctx.psid, now=ctx.now,
                            closed_by=closed_by, reason=reason)
    ctx.outputs.append(Output("history", conv["id"], summary))
    skill = conv["skill"]
    ctx.note("closed", skill)
    ctx.note("open-", skill)
    leave_queue(ctx, conv)
    if summary["abandoned"] and conv["opened_by"] in _CUSTOMER_WAITS:
        ctx.note("abandoned", skill)
    ctx.figure("handle_seconds", skill, summary["handle_ms"] / 1000)
    csat_hooks.survey_on_close(ctx, conv, summary, closed_by)
    person = st["person"]
    st["person"] = {"convs": person["convs"] if person else 1, "last_at": ctx.now}
    st["conv"] = None
    st["last_closed"] = conv["id"]
    st["expire_at"] = ctx.now + ctx.config.retention.closed_state_seconds * 1000
    survey = st["survey"]  # #15: the thread goes back to the bot once the survey is over
    surveyed = survey is not None and survey["conversation_id"] == conv["id"]
    until = survey["sent_at"] + ctx.config.csat.expire_after_seconds * 1000 if survey and surveyed else None
    thread.on_close(ctx, conv["id"], skill, closed_by, reason, until)


"""`Decider.decide(state, inp, key, env) -> Decision`: one input applied to one conversation key.

A thin dispatcher over the rule modules of this package: `events` (consumer-side events and send
results), `actions` (agent actions, ownership, held actions), `timers` (timers by turn on stream
time), `retention` (compaction and deletion), with `lifecycle`, `turns`, `system` (automatic
messages), `csat_hooks`, `windows` and `hours` below them. The stored state is migrated by
`state.migrate`, never changed in place, and returned as a new shallow copy (copy-on-write).
"""

from __future__ import annotations

from typing import Any

from streams.core.config import ConnectorConfig
from streams.core.settings import Settings
from streams.rules.conversation import actions, events, held, retention, timers
from streams.rules.conversation.api import Decision, Env, Input
from streams.rules.conversation.context import Ctx, Rules
from streams.rules.conversation.state import migrate

_DEFAULT_HORIZON_MS = Settings.model_fields["dedupe_horizon_seconds"].default * 1000
_DEFAULT_MAX_KEYS = Settings.model_fields["dedupe_max_keys"].default


class Decider:
    """The conversation rules for one connector config."""

    def __init__(self, config: ConnectorConfig, *, dedupe_horizon_ms: int = _DEFAULT_HORIZON_MS,
                 dedupe_max_keys: int = _DEFAULT_MAX_KEYS) -> None:
        self.config = config
        self.rules = Rules(config, dedupe_horizon_ms, dedupe_max_keys, frozenset(config.all_skills()))

    def env_for(self, page_id: str) -> Env:
        """The Env of a page from the static config (tests and callers without a live page directory)."""
        return Env(self.config.page(page_id), self.config.routing, self.config.external_user)

    def decide(self, state: dict[str, Any] | None, inp: Input, key: str, env: Env | None = None) -> Decision:
        """Apply one input to one conversation key's state (`env` defaults to the static config's).
        Raises ValueError for a stored state of a newer version (the stage dead-letters the input)."""
        if env is None:
            env = self.env_for(key.partition(":")[0])
        stored = migrate(state)
        ctx = Ctx(self.rules, stored, inp, key, env)
        before = stored["conv"]["id"] if stored["conv"] else None
        if inp.source == "event":
            if events.on_event(ctx, inp.data):
                return Decision(dict(stored), notes=ctx.notes, duplicate=True)
        elif inp.source == "action":
            if actions.on_action(ctx, inp.data):
                return _forget(ctx)
        elif inp.source == "result":
            events.on_result(ctx, inp.data)
        else:
            timers.fire(ctx)
            held.expire_held(ctx)
            st = ctx.st
            if st["conv"] is None and st["expire_at"] is not None and st["expire_at"] <= ctx.now:
                kept = retention.compact(st, ctx.now, self.config, self.rules.horizon_ms)
                if kept is None:
                    ctx.note("state", "deleted")
                    return Decision(None, ctx.outputs, [], ctx.notes, figures=ctx.figures)
                ctx.note("state", "compacted")
                ctx.st = kept
        conv = ctx.st["conv"]
        if conv is not None and conv["id"] != before:
            actions.release_held(ctx)
        retention.ensure_expiry(ctx.st, ctx.now, self.config)
        timers.schedule(ctx)
        return Decision(dict(ctx.st), ctx.outputs, ctx.arms, ctx.notes, figures=ctx.figures)


def _forget(ctx: Ctx) -> Decision:
    """`forget`: the key's state is erased (a tombstone); an open conversation is shown closed."""
    conv = ctx.st["conv"]
    if conv is not None:
        ctx.console("conversation_closed", closed_by="system", reason="forgotten", agent_id=None)
        ctx.note("open-", conv["skill"])
        if conv["owner"] is None:
            ctx.note("queue-", conv["skill"])
    ctx.note("forgotten", "state")
    return Decision(None, ctx.outputs, [], ctx.notes, figures=ctx.figures)

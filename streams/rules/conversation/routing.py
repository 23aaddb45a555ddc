"""Routing: which skill a conversation of a page goes to (pure).

`entry_point`: the page's skill (the page as connected now, `Env.page`); `manual`, a page without a
skill, or a page not connected: `routing.default_skill`. Transfers pick among the skills whose topic
exists: `Env.skills` (the configured skills plus those of pages connected live, issue 14), else the
configured ones.
"""

from __future__ import annotations

from streams.rules.conversation.api import Env


def route(env: Env) -> tuple[str, bool]:
    """(skill, is the page connected?) for a conversation opened now."""
    page = env.page
    if env.routing.mode == "manual":
        return env.routing.default_skill, page is not None
    if page is not None and page.skill:
        return page.skill, True
    return env.routing.default_skill, page is not None


def transfer_target(to_skill: str | None, current: str, skills: frozenset[str]) -> str | None:
    """The skill a transfer goes to (the current one when none is named); None when `to_skill` is
    not one of `skills`."""
    if to_skill is None:
        return current
    return to_skill if to_skill in skills else None

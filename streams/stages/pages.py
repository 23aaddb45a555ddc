"""The page directory inside a worker: what the ingest and conversation stages ask about pages.

`LivePages` wraps the process's `PageDirectory` (streams/core/pages.py) with the three questions the
stages ask, each a dict lookup on the event path:

- `gate(events)` (ingest stage): which events may go on; the others become dead letters with reason
  `page_disabled` / `page_not_connected` (the raw body is kept, so `dlq replay` brings them back);
- `env_for(page_id)` (conversation stage): the `Env` the rules decide with (the live page record,
  routing, external user, and `skills`: every skill whose topic exists, so transfers reach skills
  connected live), cached per page and dropped when the directory changes;
- `skill_topics`: skill → topic name for every skill whose topic exists, growing as pages are
  connected live with new skills (the directory creates a topic before routing to it). The stage
  holds this very dict, so it sees new skills at once.

`PagesService` starts the directory with the Faust app, before the consumer and the agents, so no
event is decided before the directory has been read to its end.
"""

from __future__ import annotations

from collections.abc import Iterable

from mode import Service

from schemas.events import NormalizedEvent
from streams.core.pages import REASON_DISABLED, PageDirectory
from streams.core.settings import Settings
from streams.rules.conversation.api import Env
from streams.rules.normalize import Rejected

MAX_ENVS = 10_000  # cached Envs (one per page id seen); emptied when full (unknown page ids are unbounded)


class LivePages:
    """The page questions of the stages, answered from the live directory."""

    def __init__(self, directory: PageDirectory, settings: Settings) -> None:
        self.directory = directory
        self._topics = settings.topics
        self.skill_topics: dict[str, str] = {}
        self._skills: frozenset[str] = frozenset()  # the keys of skill_topics, for Env.skills
        self._envs: dict[str, Env] = {}
        self._sync_skills()
        directory.add_listener(self._changed)

    def env_for(self, page_id: str) -> Env:
        """The rules' Env for a conversation of `page_id`: its page as connected now (None: not connected)."""
        env = self._envs.get(page_id)
        if env is None:
            d = self.directory
            env = Env(d.page(page_id), d.routing, d.external_user, self._skills)
            if len(self._envs) >= MAX_ENVS:
                self._envs.clear()
            self._envs[page_id] = env
        return env

    def gate(self, events: Iterable[NormalizedEvent], at: int) -> tuple[list[NormalizedEvent], list[Rejected]]:
        """Split events into those to take in and dead letters (reason, error, item index), noting
        each page's last event time for `pages list`."""
        d = self.directory
        admitted: list[NormalizedEvent] = []
        blocked: list[Rejected] = []
        for ev in events:
            d.note_event(ev.page_id, at)
            reason = d.admit(ev.page_id)
            if reason is None:
                admitted.append(ev)
                continue
            if not d.account.active:
                error = "the Facebook source is switched off"
            elif reason == REASON_DISABLED:
                error = f"page {ev.page_id} is switched off"
            else:
                error = f"page {ev.page_id} is not connected"
            blocked.append(Rejected(reason, error, ev.source.index))
        return admitted, blocked

    def _changed(self, page_id: str | None) -> None:
        if self._sync_skills() or page_id is None:
            self._envs.clear()  # every Env names the skills (and the account's settings)
        else:
            self._envs.pop(page_id, None)

    def _sync_skills(self) -> bool:
        """Add the directory's new skills (their topics exist); True when there were any."""
        new = [skill for skill in self.directory.skills if skill not in self.skill_topics]
        for skill in new:
            self.skill_topics[skill] = self._topics.skill(skill)
        if new:
            self._skills = frozenset(self.skill_topics)
        return bool(new)


class PagesService(Service):
    """Starts the page directory with the app (first, before consumer and agents) and stops it after."""

    def __init__(self, directory: PageDirectory) -> None:
        super().__init__()
        self.directory = directory

    async def on_start(self) -> None:
        await self.directory.start()

    async def on_stop(self) -> None:
        await self.directory.stop()


def attach(app: object, settings: Settings, directory: PageDirectory) -> LivePages:
    """Make `directory` start and stop with the Faust `app`; the stages' view of it."""
    app.add_dependency(PagesService(directory))  # type: ignore[attr-defined]  # faust is untyped
    return LivePages(directory, settings)

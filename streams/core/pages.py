"""The page directory: which Facebook pages are connected, how, and the account's live settings.

Pages are data. The compacted topic `connector.pages` (schemas/pages.py) holds one record per page
(key: page id), the account settings (key `account`) and re-authorisation marks (key
`reauth:<page_id>`). Every worker and every dispatcher follows it with a `TopicMirror`, so a page
connected, changed, switched off or marked `needs_reauth` anywhere is seen everywhere within a
poll interval (0.2 s), without a restart.

Precedence: a record in the topic wins over the TOML file. The `[[pages]]` of the TOML file are the
initial set: a page listed there and never written to the topic is connected as listed (active,
enabled, its token from the dispatcher's tokens file); once the topic holds a record of it, the
record is what counts (disconnecting writes a record with `connected: false`, so the page does not
come back from the file). The account record, once written, replaces `[routing]` and
`[external_user]` of the file (the file's `routing.unknown_pages` is its initial value).

Skills: a worker routes only to skill topics that exist. When a record names a skill whose topic
this process has not seen yet (`ensure_skills=True`, the workers), the record is held back (the
page keeps its previous view) until a background task has created the topic; the writers
(`pages` commands, the admin page) create the topic before they write the record, so the hold is
one admin round trip. Nothing on the event path ever creates a topic.

Memory: one entry per key of the topic (pages, marks, the account) plus one view per page; the
activity notes (last event / last send) are at most MAX_ACTIVITY entries between two flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from schemas.pages import (
    ACCOUNT_KEY,
    DIRECTORY_RECORD,
    REAUTH_PREFIX,
    AccountRecord,
    PageActivity,
    PageRecord,
    PageStatus,
    ReauthMark,
)
from streams.core import metrics
from streams.core.config import ConnectorConfig, ExternalUser, Page, Routing
from streams.core.mirror import MirrorError, TopicMirror
from streams.core.settings import Settings
from streams.core.topics import TopicError, ensure_topic_specs, ensure_topics, page_topic_specs

log = logging.getLogger("messenger_streams.pages")

DirectoryValue = PageRecord | AccountRecord | ReauthMark

MAX_ACTIVITY = 10_000  # activity notes kept between two flushes (pages seen in one interval)
ACTIVITY_INTERVAL = 5.0  # seconds between two activity flushes

REASON_DISABLED = "page_disabled"
REASON_NOT_CONNECTED = "page_not_connected"


class PagesError(ConnectionError):
    """The page directory cannot be read or written (Kafka unreachable, topic refused): one line."""


def decode_record(value: bytes) -> DirectoryValue:
    """A `connector.pages` value; ValueError for anything else (the mirror skips it)."""
    try:
        return DIRECTORY_RECORD.validate_json(value)
    except ValidationError as exc:
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid"}
        raise ValueError(f"not a page directory record: {err.get('msg')}") from None


def now_ms() -> int:
    return int(time.time() * 1000)


def actor(prefix: str) -> str:
    """Who is writing, for `connected_by` / `updated_by`: e.g. `cli:alice@host`."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{prefix}:{user}@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class PageView:
    """A page as it counts now: settings, status, where it came from (`topic` or `config`)."""

    page_id: str
    name: str | None
    skill: str | None
    locale: str
    enabled: bool
    connected: bool
    status: PageStatus
    source: str  # "topic" or "config"
    has_token: bool = False
    token_id: str | None = None
    connected_at: int | None = None
    connected_by: str | None = None
    updated_at: int | None = None
    updated_by: str | None = None
    token_expires_at: int | None = None
    scopes: tuple[str, ...] = ()
    subscribed_fields: tuple[str, ...] = ()
    reauth: ReauthMark | None = None
    page: Page | None = field(default=None, compare=False)  # the config.Page for Env (None: not connected)

    def as_dict(self) -> dict[str, Any]:
        """For `pages list --json` and the admin page: everything but the token (only whether there is one)."""
        return {
            "page_id": self.page_id,
            "name": self.name,
            "skill": self.skill,
            "locale": self.locale,
            "enabled": self.enabled,
            "connected": self.connected,
            "status": self.status,
            "source": self.source,
            "token": "stored" if self.has_token else None,
            "token_expires_at": self.token_expires_at,
            "connected_at": self.connected_at,
            "connected_by": self.connected_by,
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
            "scopes": list(self.scopes),
            "subscribed_fields": list(self.subscribed_fields),
            "reauth": None
            if self.reauth is None
            else {"at": self.reauth.at, "code": self.reauth.code, "message": self.reauth.message},
        }


def _status(rec: PageRecord, mark: ReauthMark | None) -> PageStatus:
    if not rec.connected:
        return "disconnected"
    if not rec.enabled:
        return "disabled"
    if mark is not None and (
        mark.token_id == rec.token_id or (rec.token_id is None and (mark.token_id or "").startswith("static-"))
    ):
        return "needs_reauth"  # the mark names this token (or the tokens file's, for a page without one)
    return "active"


def view_of_record(rec: PageRecord, mark: ReauthMark | None) -> PageView:
    status = _status(rec, mark)
    page = Page(page_id=rec.page_id, skill=rec.skill, locale=rec.locale, name=rec.name) if rec.connected else None
    return PageView(
        page_id=rec.page_id,
        name=rec.name,
        skill=rec.skill,
        locale=rec.locale,
        enabled=rec.enabled,
        connected=rec.connected,
        status=status,
        source="topic",
        has_token=rec.token is not None,
        token_id=rec.token_id,
        connected_at=rec.connected_at,
        connected_by=rec.connected_by,
        updated_at=rec.updated_at,
        updated_by=rec.updated_by,
        token_expires_at=rec.token_expires_at,
        scopes=tuple(rec.scopes),
        subscribed_fields=tuple(rec.subscribed_fields),
        reauth=mark if status == "needs_reauth" else None,
        page=page,
    )


def view_of_config(page: Page, mark: ReauthMark | None) -> PageView:
    # a page from the TOML file has no token in the directory: a mark of a static token applies
    # until the page gets a record (its token id starts with "static-")
    needs = mark is not None and (mark.token_id or "").startswith("static-")
    return PageView(
        page_id=page.page_id,
        name=page.name,
        skill=page.skill,
        locale=page.locale,
        enabled=True,
        connected=True,
        status="needs_reauth" if needs else "active",
        source="config",
        reauth=mark if needs else None,
        page=page,
    )


def account_of_config(config: ConnectorConfig) -> AccountRecord:
    return AccountRecord(
        active=True,
        mode=config.routing.mode,
        default_skill=config.routing.default_skill,
        unknown_pages=config.routing.unknown_pages,
        external_agent_id=config.external_user.agent_id,
        external_nickname=config.external_user.nickname,
    )


Listener = Callable[[str | None], None]  # page id changed, or None: the account (every page) changed


class PageDirectory:
    """The live page directory of one process. Without `start()` it answers from the TOML file alone
    (unit tests, agent test contexts); after `start()` it follows `connector.pages`."""

    def __init__(
        self,
        config: ConnectorConfig,
        settings: Settings | None = None,
        *,
        ensure_skills: bool = False,
        track_activity: bool = False,
        activity_interval: float = ACTIVITY_INTERVAL,
    ) -> None:
        self.config = config
        self.settings = settings
        self.ensure_skills = ensure_skills
        self.track_activity = track_activity
        self.activity_interval = activity_interval
        self._records: dict[str, PageRecord] = {}
        self._marks: dict[str, ReauthMark] = {}
        self._account_record: AccountRecord | None = None
        self._views: dict[str, PageView] = {}
        self._account = account_of_config(config)
        self._routing = config.routing
        self._external = config.external_user
        self.skills: set[str] = set(config.all_skills())
        self._pending_skills: set[str] = set()
        self._skills_wanted = asyncio.Event()
        self._listeners: list[Listener] = []
        self._mirror: TopicMirror[DirectoryValue] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._activity: dict[tuple[str, str], PageActivity] = {}
        self.activity_dropped = 0
        self._producer: AIOKafkaProducer | None = None
        self._ready = False
        self._reauth_labelled: set[str] = set()
        for page in config.pages:
            self._views[page.page_id] = view_of_config(page, None)

    # --- reading ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    def view(self, page_id: str) -> PageView | None:
        """The page as it counts now; None for a page never connected."""
        return self._views.get(page_id)

    def views(self) -> list[PageView]:
        """Every page known (connected or not), by page id."""
        return [self._views[k] for k in sorted(self._views)]

    def page(self, page_id: str) -> Page | None:
        """The connected page (settings for the rules), or None: not connected (or disconnected)."""
        v = self._views.get(page_id)
        return v.page if v is not None else None

    @property
    def account(self) -> AccountRecord:
        return self._account

    @property
    def routing(self) -> Routing:
        return self._routing

    @property
    def external_user(self) -> ExternalUser:
        return self._external

    def record(self, page_id: str) -> PageRecord | None:
        """The page's record in the topic (with its encrypted token), if any."""
        return self._records.get(page_id)

    def reauth_mark(self, page_id: str) -> ReauthMark | None:
        """The page's latest re-authorisation mark (it counts only while it names the current token)."""
        return self._marks.get(page_id)

    def records(self) -> list[PageRecord]:
        return [self._records[k] for k in sorted(self._records)]

    def admit(self, page_id: str) -> str | None:
        """May an event of this page be taken in? None: yes; else the dead-letter reason."""
        if not self._account.active:
            return REASON_DISABLED
        v = self._views.get(page_id)
        if v is None or not v.connected:
            return REASON_NOT_CONNECTED if self._routing.unknown_pages == "dead_letter" else None
        if not v.enabled:
            return REASON_DISABLED
        return None

    def skill_of(self, page_id: str) -> str:
        """The skill a page's conversations go to (for page-level console events)."""
        page = self.page(page_id)
        if self._routing.mode == "entry_point" and page is not None and page.skill:
            return page.skill
        return self._routing.default_skill

    def add_listener(self, fn: Listener) -> None:
        """`fn(page_id)` after a page's view changed; `fn(None)` after the account settings changed."""
        self._listeners.append(fn)

    # --- activity (last event / last send) ----------------------------------------------------------
    def note_event(self, page_id: str, at: int) -> None:
        """An event of the page was taken in (or dead-lettered) at `at` (epoch ms). Cheap: one dict write."""
        self._note(PageActivity(page_id=page_id, kind="event", at=at))

    def note_send(self, page_id: str, at: int, result: str) -> None:
        """A dispatcher finished a send for the page (`result`: sent / failed)."""
        self._note(PageActivity(page_id=page_id, kind="send", at=at, result=result))

    def _note(self, act: PageActivity) -> None:
        if not self.track_activity:
            return
        key = (act.kind, act.page_id)
        old = self._activity.get(key)
        if old is None and len(self._activity) >= MAX_ACTIVITY:
            self.activity_dropped += 1
            return
        if old is None or act.at >= old.at:
            self._activity[key] = act

    def drain_activity(self) -> list[PageActivity]:
        """The notes since the last drain (at most MAX_ACTIVITY), emptied."""
        out, self._activity = list(self._activity.values()), {}
        return out

    # --- life cycle ---------------------------------------------------------------------------------
    async def start(self, timeout: float = 30.0) -> None:
        """Create the topic if missing, read it to its end, then follow it. Raises PagesError."""
        if self.settings is None:
            raise PagesError("the page directory needs the Kafka settings to start")
        s = self.settings
        try:
            await ensure_topic_specs(s.bootstrap_servers, page_topic_specs(s, "pages"), s.replication_factor, timeout)
        except TopicError as exc:
            raise PagesError(str(exc)) from None
        mirror: TopicMirror[DirectoryValue] = TopicMirror(
            s.bootstrap_servers, s.topics.name("pages"), decode_record, on_change=self._on_change
        )
        try:
            await mirror.start(timeout)
        except MirrorError as exc:
            raise PagesError(str(exc)) from None
        self._mirror = mirror
        if not await mirror.wait_ready(timeout):
            await self.stop()
            raise PagesError(f"cannot read {s.topics.name('pages')} to its end within {timeout:.0f}s")
        if self.ensure_skills:
            wanted = self._skills_referenced() - self.skills
            if wanted:
                await self._create_skill_topics(wanted, timeout)
            self._tasks.append(asyncio.create_task(self._skill_keeper(), name="pages:skills"))
        self._ready = True
        self._recompute_all()
        if self.track_activity:
            await ensure_activity_topic(s, timeout)
            self._producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", linger_ms=20)
            try:
                await asyncio.wait_for(self._producer.start(), timeout)
            except (TimeoutError, KafkaError, OSError) as exc:
                await self.stop()
                raise PagesError(f"cannot reach Kafka at {s.bootstrap_servers}: {type(exc).__name__}") from None
            self._tasks.append(asyncio.create_task(self._activity_flusher(), name="pages:activity"))
        log.info("page directory ready: %d pages (%d from the topic)", len(self._views), len(self._records))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self.flush_activity()
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None
        if self._mirror is not None:
            await self._mirror.stop()
            self._mirror = None

    # --- following ----------------------------------------------------------------------------------
    def _on_change(self, key: str, value: DirectoryValue | None) -> None:
        if key == ACCOUNT_KEY:
            self._account_record = value if isinstance(value, AccountRecord) else None
            if self._ready:
                self._recompute_account()
            return
        if key.startswith(REAUTH_PREFIX):
            page_id = key[len(REAUTH_PREFIX) :]
            if isinstance(value, ReauthMark):
                self._marks[page_id] = value
            else:
                self._marks.pop(page_id, None)
        elif isinstance(value, PageRecord):
            self._records[key] = value
            page_id = key
        elif value is None:
            self._records.pop(key, None)
            page_id = key
        else:
            log.warning("%s: key %r holds a %s record; ignored", self.settings and self.settings.topics.pages, key,
                        type(value).__name__)
            return
        if self._ready:
            self._recompute(page_id)
            self._update_metrics()

    def _skill_ok(self, skill: str | None) -> bool:
        if not self.ensure_skills or skill is None or skill in self.skills:
            return True
        self._pending_skills.add(skill)
        self._skills_wanted.set()
        return False

    def _recompute(self, page_id: str) -> None:
        rec = self._records.get(page_id)
        mark = self._marks.get(page_id)
        if rec is not None:
            if not rec.connected or self._skill_ok(rec.skill):
                new: PageView | None = view_of_record(rec, mark)
            else:
                return  # held back until the skill's topic exists; the old view stays
        else:
            cfg = self.config.page(page_id)
            new = view_of_config(cfg, mark) if cfg is not None else None
        old = self._views.get(page_id)
        if new == old:
            return
        if new is None:
            self._views.pop(page_id, None)
        else:
            self._views[page_id] = new
        self._notify(page_id)

    def _recompute_account(self) -> None:
        rec = self._account_record or account_of_config(self.config)
        if not self._skill_ok(rec.default_skill):
            return
        if rec == self._account:
            return
        self._account = rec
        self._routing = Routing(mode=rec.mode, default_skill=rec.default_skill, unknown_pages=rec.unknown_pages)
        self._external = ExternalUser(agent_id=rec.external_agent_id, nickname=rec.external_nickname)
        self._notify(None)

    def _recompute_all(self) -> None:
        self._recompute_account()
        for page_id in sorted({*self._records, *self._marks, *self.config.pages_by_id}):
            self._recompute(page_id)
        self._update_metrics()

    def _notify(self, page_id: str | None) -> None:
        for fn in self._listeners:
            try:
                fn(page_id)
            except Exception:  # a listener's bug must not stop the directory
                log.exception("page directory listener failed")

    def _update_metrics(self) -> None:
        counts: dict[str, int] = {"active": 0, "disabled": 0, "needs_reauth": 0, "disconnected": 0}
        reauth = set()
        for v in self._views.values():
            counts[v.status] += 1
            if v.status == "needs_reauth":
                reauth.add(v.page_id)
        # a page's label appears once it needs re-authorisation and drops to 0 when reconnected
        for page_id in reauth | self._reauth_labelled:
            metrics.PAGES_NEED_REAUTH.labels(page_id).set(1 if page_id in reauth else 0)
        self._reauth_labelled |= reauth
        for status, n in counts.items():
            metrics.PAGES.labels(status).set(n)

    def _skills_referenced(self) -> set[str]:
        skills = {r.skill for r in self._records.values() if r.connected and r.skill}
        if self._account_record is not None:
            skills.add(self._account_record.default_skill)
        return skills

    async def _create_skill_topics(self, skills: Iterable[str], timeout: float = 30.0) -> None:
        assert self.settings is not None  # noqa: S101 - start() checked it
        s = self.settings
        names = {s.topics.skill(k): False for k in skills}
        try:
            created = await ensure_topics(s.bootstrap_servers, names, s.partitions, s.replication_factor, timeout)
        except TopicError as exc:
            raise PagesError(str(exc)) from None
        for name in created:
            log.info("created skill topic %s for a page connected live", name)
        new = set(skills) - self.skills
        self.skills.update(skills)
        if new and self._ready:
            self._notify(None)  # listeners see the new skills (transfers to them, Env.skills)

    async def _skill_keeper(self) -> None:
        """Create the topics of skills that records name before their records are applied."""
        while True:
            await self._skills_wanted.wait()
            self._skills_wanted.clear()
            wanted, self._pending_skills = self._pending_skills - self.skills, set()
            if not wanted:
                continue
            try:
                await self._create_skill_topics(wanted)
            except PagesError as exc:
                log.warning("cannot create skill topics %s yet: %s; retrying", sorted(wanted), exc)
                self._pending_skills |= wanted
                await asyncio.sleep(2.0)
                self._skills_wanted.set()
                continue
            self._recompute_all()

    async def _activity_flusher(self) -> None:
        while True:
            await asyncio.sleep(self.activity_interval)
            try:
                await self.flush_activity()
            except (KafkaError, OSError) as exc:
                log.warning("cannot write page activity: %s", type(exc).__name__)

    async def flush_activity(self) -> int:
        """Write the activity notes to `connector.pages.activity` (one record per page and kind)."""
        if self._producer is None or self.settings is None:
            return 0
        notes = self.drain_activity()
        topic = self.settings.topics.name("pages_activity")
        futures = [
            await self._producer.send(topic, orjson.dumps(n.model_dump()), key=f"{n.kind}:{n.page_id}".encode())
            for n in notes
        ]
        for f in futures:
            await f
        return len(notes)


async def ensure_activity_topic(settings: Settings, timeout: float = 30.0) -> None:
    """Create `connector.pages.activity` (compacted) if missing."""
    try:
        await ensure_topic_specs(
            settings.bootstrap_servers, page_topic_specs(settings, "pages_activity"), settings.replication_factor,
            timeout,
        )
    except TopicError as exc:
        raise PagesError(str(exc)) from None


def decode_activity(value: bytes) -> PageActivity:
    try:
        return PageActivity.model_validate_json(value)
    except ValidationError:
        raise ValueError("not a page activity record") from None


class PagesWriter:
    """Writes `connector.pages` records (and page-level console events) with an idempotent producer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topics.name("pages")
        self._producer: AIOKafkaProducer | None = None

    async def start(self, timeout: float = 30.0) -> None:
        s = self.settings
        try:
            await ensure_topic_specs(s.bootstrap_servers, page_topic_specs(s, "pages"), s.replication_factor, timeout)
        except TopicError as exc:
            raise PagesError(str(exc)) from None
        producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", enable_idempotence=True)
        try:
            await asyncio.wait_for(producer.start(), timeout)
        except (TimeoutError, KafkaError, OSError) as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise PagesError(f"cannot reach Kafka at {s.bootstrap_servers}: {type(exc).__name__}") from None
        self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None

    async def _send(self, topic: str, key: str, value: bytes | None) -> None:
        if self._producer is None:
            raise PagesError("the page directory writer is not started")
        try:
            await asyncio.wait_for(self._producer.send_and_wait(topic, value, key=key.encode()), 30)
        except (TimeoutError, KafkaError) as exc:
            raise PagesError(f"cannot write {key} to {topic}: {type(exc).__name__}") from None

    async def put_page(self, rec: PageRecord) -> None:
        await self._send(self.topic, rec.page_id, orjson.dumps(rec.model_dump()))

    async def put_account(self, rec: AccountRecord) -> None:
        await self._send(self.topic, ACCOUNT_KEY, orjson.dumps(rec.model_dump()))

    async def put_reauth(self, mark: ReauthMark) -> None:
        await self._send(self.topic, REAUTH_PREFIX + mark.page_id, orjson.dumps(mark.model_dump()))

    async def clear_reauth(self, page_id: str) -> None:
        await self._send(self.topic, REAUTH_PREFIX + page_id, None)

    async def ensure_skill_topic(self, skill: str) -> bool:
        """Create `skill.<skill>` if missing (before a record routes to it); True when created."""
        s = self.settings
        try:
            created = await ensure_topics(
                s.bootstrap_servers, {s.topics.skill(skill): False}, s.partitions, s.replication_factor
            )
        except TopicError as exc:
            raise PagesError(str(exc)) from None
        return bool(created)

    async def page_status_event(self, directory: PageDirectory, page_id: str, status: str, detail: str = "",
                                ident: str | None = None) -> None:
        """A `page_status` console event on the page's skill topic (consoles show the page's state). The
        skill topic is created first if missing (brokers do not create topics on their own)."""
        skill = directory.skill_of(page_id)
        await self.ensure_skill_topic(skill)
        at = now_ms()
        event = {
            "type": "page_status",
            "event_id": f"page_status:{page_id}:{status}:{ident or at}",
            "conversation_id": None,
            "page_id": page_id,
            "psid": None,
            "skill": skill,
            "timestamp": at,
            "status": status,
            "detail": detail,
        }
        await self._send(self.settings.topics.skill(skill), page_id, orjson.dumps(event))


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"

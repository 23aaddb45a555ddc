"""Pure rules of the history store: records → rows, merge rules, query parameters, privacy helpers.

No I/O. The sink (`streams/edges/history.py`) feeds consumed records into a `Batch`; the store
(`streams/history/store.py`) writes the batch's rows with SQL that applies the same merge rules as
the `merge_*` functions here, so every write is idempotent and order-independent:

- a message is keyed by `ob:<outbox_id>` for what we sent (the agent's reply and its later mid
  update meet in one row), else by its `event_id`;
- an event is keyed by its `event_id`; unknown event types are kept whole (type + JSON);
- a conversation row collects facts from many records; each column has a commutative merge
  (earliest start, latest activity, set unions, the summary's values over the events').
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

# console event types that are messages, and who wrote them
MESSAGE_AUTHORS: dict[str, str] = {
    "consumer_message": "consumer",
    "postback": "consumer",
    "agent_message": "agent",
    "system_message": "system",
    "external_message": "external",
}
COMMON_FIELDS = ("type", "event_id", "conversation_id", "page_id", "psid", "skill", "timestamp")
MESSAGE_COLUMNS = ("mid", "outbox_id", "text", "attachments", "agent_id")
EVENT_COLUMNS = ("agent_id", "from_skill", "to_skill", "closed_by", "reason", "score", "status", "watermark")
SUMMARY_FIGURES = (
    "first_agent_response_ms", "queue_ms", "handle_ms", "abandoned",
    "consumer_messages", "agent_messages", "external_messages", "system_messages",
)

# locale language → PostgreSQL text search configuration (others: 'simple', no stemming)
TS_CONFIGS: dict[str, str] = {
    "ar": "arabic", "hy": "armenian", "eu": "basque", "ca": "catalan", "da": "danish", "nl": "dutch",
    "en": "english", "fi": "finnish", "fr": "french", "de": "german", "el": "greek", "hi": "hindi",
    "hu": "hungarian", "id": "indonesian", "ga": "irish", "it": "italian", "lt": "lithuanian",
    "ne": "nepali", "nb": "norwegian", "nn": "norwegian", "no": "norwegian", "pt": "portuguese",
    "ro": "romanian", "ru": "russian", "sr": "serbian", "es": "spanish", "sv": "swedish", "ta": "tamil",
    "tr": "turkish", "yi": "yiddish",
}

SECRET_KEY = re.compile(r"(?i)(token|secret|password|passwd|signature|authorization|cookie|proof|api_?key)")
SECRET_QUERY_PARAMS = {"access_token", "appsecret_proof", "client_secret", "token", "signature"}
MAX_JSON_DEPTH = 12


class RecordError(ValueError):
    """A record the sink cannot store (not JSON, missing fields): dead-lettered, never retried."""


class BadParam(ValueError):
    """A bad query parameter; `param` names it (HTTP 400, CLI exit 2)."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param}: {problem}")
        self.param = param
        self.problem = problem


# privacy ------------------------------------------------------------------------------------------


def scrub(value: Any, depth: int = 0) -> Any:
    """A copy of a JSON value without secrets: keys that name tokens, secrets, passwords or signatures
    are dropped, and URLs lose their `access_token`-like query parameters."""
    if depth > MAX_JSON_DEPTH:
        return None
    if isinstance(value, dict):
        return {k: scrub(v, depth + 1) for k, v in value.items() if not SECRET_KEY.search(str(k))}
    if isinstance(value, list):
        return [scrub(v, depth + 1) for v in value]
    if isinstance(value, str):
        value = value.replace("\x00", "")  # PostgreSQL text cannot hold NUL
        return _scrub_url(value) if "://" in value and "?" in value else value
    return value


def _scrub_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return url
    kept = [(k, v) for k, v in query if k.lower() not in SECRET_QUERY_PARAMS]
    if len(kept) == len(query):
        return url
    return urlunsplit(parts._replace(query=urlencode(kept)))


def subject(page_id: str, psid: str) -> str:
    """The digest that stands for one person in the `forgotten` table (never the ids themselves)."""
    return hashlib.sha256(f"{page_id}:{psid}".encode()).hexdigest()


def conversation_digest(conversation_id: str) -> str:
    """The digest that stands for an erased conversation in `forgotten_conversations`."""
    return hashlib.sha256(f"conversation:{conversation_id}".encode()).hexdigest()


LOCK_BUCKETS = 256
LOCK_BASE = 7_316_411_028_000


def subject_lock(subject_digest: str) -> int:
    """The PostgreSQL advisory lock key of one person: one of `LOCK_BUCKETS` keys, so a batch about
    thousands of people takes at most 256 locks (PostgreSQL's shared lock table is small)."""
    return LOCK_BASE + int(subject_digest[:8], 16) % LOCK_BUCKETS


def admin_authorized(authorization: str | None, password: str | None) -> bool:
    """True when the Authorization header (`Bearer <password>` or Basic with any user name) carries
    the admin password; compared in constant time. No password configured: nobody is admin."""
    if not password or not authorization:
        return False
    scheme, _, credential = authorization.strip().partition(" ")
    given = credential.strip()
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.encode("utf-8"), password.encode("utf-8"))


# languages ----------------------------------------------------------------------------------------


def ts_config_for(locale: str | None, available: Iterable[str] | None = None) -> str:
    """The text search configuration for a Messenger locale (`es_ES` → `spanish`), `simple` when the
    language has none (or the server lacks it: `available`)."""
    if not locale:
        return "simple"
    config = TS_CONFIGS.get(locale.replace("-", "_").split("_")[0].lower(), "simple")
    if available is not None and config not in set(available):
        return "simple"
    return config


# rows ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Src:
    """Where a record was read: the transcript's tie-breaker for events of the same millisecond."""

    topic: str
    partition: int
    offset: int


@dataclass
class ConversationRow:
    conversation_id: str
    page_id: str
    psid: str
    skill: str
    skill_rank: str
    started_at: int
    last_event_at: int
    skills: list[str] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)
    locale: str | None = None
    opened_by: str | None = None
    opened_at: int | None = None
    closed_at: int | None = None
    closed_by: str | None = None
    close_reason: str | None = None
    csat_score: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None


@dataclass
class MessageRow:
    message_key: str
    event_id: str
    type: str
    author: str
    conversation_id: str | None
    page_id: str
    psid: str
    skill: str
    sent_at: int
    src: Src
    agent_id: str | None = None
    mid: str | None = None
    outbox_id: str | None = None
    text: str | None = None
    attachments: list[Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class EventRow:
    event_id: str
    type: str
    conversation_id: str | None
    page_id: str
    psid: str | None
    skill: str
    at: int
    src: Src
    columns: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class CsatRow:
    conversation_id: str
    page_id: str
    psid: str
    skill: str
    agent_id: str | None
    score: int
    locale: str | None
    at: int


def _union(a: list[str], b: list[str]) -> list[str]:
    return sorted(set(a) | set(b))


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _first(a: Any, b: Any) -> Any:
    return a if a is not None else b


def skill_rank(final: bool, at: int, skill: str) -> str:
    """Orders the facts that set a conversation's skill: the summary's over any event's, then the
    newest event, then the name (so equal times still merge the same way in any order)."""
    return f"{int(final)}{max(at, 0):015d}{skill}"


def _better_summary(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    # the summary is written at close and once more with the CSAT score: the scored one wins
    if a is None or b is None:
        return a if b is None else b
    return b if a.get("csat_score") is None and b.get("csat_score") is not None else a


def merge_conversations(a: ConversationRow, b: ConversationRow) -> ConversationRow:
    """Two facts about one conversation as one row (the store's ON CONFLICT rule, in Python)."""
    top = a if a.skill_rank >= b.skill_rank else b
    return replace(
        a,
        skill=top.skill,
        skill_rank=top.skill_rank,
        started_at=min(a.started_at, b.started_at),
        last_event_at=max(a.last_event_at, b.last_event_at),
        skills=_union(a.skills, b.skills),
        agents=_union(a.agents, b.agents),
        locale=_first(a.locale, b.locale),
        opened_by=_first(a.opened_by, b.opened_by),
        opened_at=_min(a.opened_at, b.opened_at),
        closed_at=_first(a.closed_at, b.closed_at),
        closed_by=_first(a.closed_by, b.closed_by),
        close_reason=_first(a.close_reason, b.close_reason),
        csat_score=_first(a.csat_score, b.csat_score),
        figures={**b.figures, **{k: v for k, v in a.figures.items() if v is not None}},
        summary=_better_summary(a.summary, b.summary),
    )


def merge_messages(a: MessageRow, b: MessageRow) -> MessageRow:
    """The reply and its mid update (same outbox id) as one row; a redelivery changes nothing.
    Earliest time and read position, first known mid and text; fields already stored win."""
    src = min(a.src, b.src, key=lambda s: (s.topic, s.partition, s.offset))
    return replace(
        a,
        event_id=min(a.event_id, b.event_id),
        sent_at=min(a.sent_at, b.sent_at),
        src=src,
        mid=_first(a.mid, b.mid),
        text=_first(a.text, b.text),
        attachments=_first(a.attachments, b.attachments),
        agent_id=_first(a.agent_id, b.agent_id),
        data={**b.data, **a.data},
    )


def _str(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text.replace("\x00", "") if "\x00" in text else text


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"{name} is not a number")
    return int(value)


def _need(ev: Mapping[str, Any], name: str) -> str:
    value = _str(ev.get(name))
    if not value:
        raise RecordError(f"{name} is missing")
    return value


def _rest(ev: Mapping[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    skip = set(COMMON_FIELDS) | set(columns)
    out = scrub({k: v for k, v in ev.items() if k not in skip})
    return out if isinstance(out, dict) else {}


def decode(value: bytes | None) -> dict[str, Any]:
    """One record value as a JSON object; RecordError when it is not one."""
    if value is None:
        raise RecordError("empty value")
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RecordError("not a JSON object")
    return data


@dataclass
class Batch:
    """Rows of a batch of records, one per key (merged), ready for one transaction."""

    conversations: dict[str, ConversationRow] = field(default_factory=dict)
    messages: dict[str, MessageRow] = field(default_factory=dict)
    events: dict[str, EventRow] = field(default_factory=dict)
    csat: dict[str, CsatRow] = field(default_factory=dict)
    records: int = 0

    def __len__(self) -> int:
        return self.records

    # adding records -------------------------------------------------------------------------------
    def add(self, kind: Literal["skill", "history", "csat"], value: dict[str, Any], src: Src) -> None:
        """Add one decoded record of a skill topic, `conversations.history` or `csat.responses`."""
        if kind == "skill":
            self.add_console_event(value, src)
        elif kind == "history":
            self.add_summary(value)
        else:
            self.add_csat_response(value)
        self.records += 1

    def _conversation(self, row: ConversationRow) -> None:
        old = self.conversations.get(row.conversation_id)
        self.conversations[row.conversation_id] = row if old is None else merge_conversations(old, row)

    def add_console_event(self, ev: dict[str, Any], src: Src) -> None:
        type_ = _need(ev, "type")
        event_id = _need(ev, "event_id")
        page_id = _need(ev, "page_id")
        skill = _need(ev, "skill")
        at = _int(ev.get("timestamp"), "timestamp")
        psid = _str(ev.get("psid"))
        conversation_id = _str(ev.get("conversation_id"))
        if conversation_id and psid:
            self._conversation(self._conversation_fact(ev, type_, conversation_id, page_id, psid, skill, at))
        author = MESSAGE_AUTHORS.get(type_)
        if author is not None and psid:
            self._message(ev, type_, author, event_id, conversation_id, page_id, psid, skill, at, src)
            return
        columns = {k: ev.get(k) for k in EVENT_COLUMNS if ev.get(k) is not None}
        if "watermark" in columns:
            columns["watermark"] = _int(columns["watermark"], "watermark")
        if "score" in columns:
            columns["score"] = _int(columns["score"], "score")
        for k in ("agent_id", "from_skill", "to_skill", "closed_by", "reason", "status"):
            if k in columns:
                columns[k] = _str(columns[k])
        row = EventRow(event_id, type_, conversation_id, page_id, psid, skill, at, src, columns,
                       _rest(ev, EVENT_COLUMNS))
        old = self.events.get(event_id)
        if old is None or (old.src.topic, old.src.partition, old.src.offset) > (src.topic, src.partition, src.offset):
            self.events[event_id] = row

    def _conversation_fact(
        self, ev: dict[str, Any], type_: str, conversation_id: str, page_id: str, psid: str, skill: str, at: int
    ) -> ConversationRow:
        conv_skill = _str(ev.get("to_skill")) or skill if type_ == "conversation_transferred" else skill
        takes_part = type_ in ("agent_message", "conversation_accepted") and ev.get("agent_id")
        agents = [str(ev["agent_id"])] if takes_part else []
        row = ConversationRow(
            conversation_id, page_id, psid, conv_skill, skill_rank(False, at, conv_skill), at, at,
            skills=sorted({skill, conv_skill}), agents=agents,
        )
        if type_ == "conversation_opened":
            row.locale = _str(ev.get("locale"))
            row.opened_by = _str(ev.get("opened_by"))
            row.opened_at = at
        return row

    def _message(
        self, ev: dict[str, Any], type_: str, author: str, event_id: str, conversation_id: str | None,
        page_id: str, psid: str, skill: str, at: int, src: Src,
    ) -> None:
        outbox_id = _str(ev.get("outbox_id"))
        key = f"ob:{outbox_id}" if outbox_id else event_id
        text = _str(ev.get("text"))
        if type_ == "postback" and text is None:
            text = _str(ev.get("title"))
        attachments = ev.get("attachments")
        agent_id = _str(ev.get("agent_id"))
        if agent_id is None and isinstance(ev.get("author"), dict):
            agent_id = _str(ev["author"].get("agent_id"))
        row = MessageRow(
            key, event_id, type_, author, conversation_id, page_id, psid, skill, at, src,
            agent_id=agent_id, mid=_str(ev.get("mid")), outbox_id=outbox_id, text=text,
            attachments=scrub(attachments) if isinstance(attachments, list) and attachments else None,
            data=_rest(ev, (*MESSAGE_COLUMNS, "title" if type_ == "postback" else "")),
        )
        old = self.messages.get(key)
        self.messages[key] = row if old is None else merge_messages(old, row)

    def add_summary(self, s: dict[str, Any]) -> None:
        """A closed conversation's summary (`conversations.history`): the final skill and figures."""
        conversation_id = _need(s, "conversation_id")
        skill = _need(s, "skill")
        opened_at = _int(s.get("opened_at"), "opened_at")
        closed_at = _int(s.get("closed_at"), "closed_at")
        score = s.get("csat_score")
        clean = scrub(s)
        row = ConversationRow(
            conversation_id, _need(s, "page_id"), _need(s, "psid"), skill, skill_rank(True, closed_at, skill),
            opened_at, closed_at,
            skills=sorted({skill, *(str(x) for x in s.get("skills") or [])}),
            agents=sorted({str(x) for x in s.get("agents") or [] if x}),
            opened_at=opened_at, closed_at=closed_at,
            closed_by=_str(s.get("closed_by")), close_reason=_str(s.get("close_reason")),
            opened_by=_str(s.get("opened_by")),
            csat_score=_int(score, "csat_score") if score is not None else None,
            figures={k: s.get(k) for k in SUMMARY_FIGURES},
            summary=clean if isinstance(clean, dict) else None,
        )
        self._conversation(row)

    def add_csat_response(self, r: dict[str, Any]) -> None:
        """One counted CSAT answer (`csat.responses`), one per conversation."""
        conversation_id = _need(r, "conversation_id")
        score = _int(r.get("score"), "score")
        if not 1 <= score <= 5:
            raise RecordError("score is not 1-5")
        at = _int(r.get("timestamp"), "timestamp")
        row = CsatRow(conversation_id, _need(r, "page_id"), _need(r, "psid"), _need(r, "skill"),
                      _str(r.get("agent_id")), score, _str(r.get("locale")), at)
        self.csat[conversation_id] = row
        self._conversation(ConversationRow(
            conversation_id, row.page_id, row.psid, row.skill, skill_rank(False, at, row.skill), at, at,
            skills=[row.skill], csat_score=score,
        ))

    # privacy ----------------------------------------------------------------------------------------
    def subjects(self) -> dict[str, tuple[str, str]]:
        """digest → (page_id, psid) of every person this batch writes about."""
        people: set[tuple[str, str]] = set()
        people.update((c.page_id, c.psid) for c in self.conversations.values())
        people.update((m.page_id, m.psid) for m in self.messages.values())
        people.update((e.page_id, e.psid) for e in self.events.values() if e.psid)
        people.update((c.page_id, c.psid) for c in self.csat.values())
        return {subject(p, s): (p, s) for p, s in people}

    def drop_forgotten(self, forgotten: Mapping[tuple[str, str], int]) -> int:
        """Remove what concerns forgotten people up to their erasure time (ms); returns rows dropped."""
        if not forgotten:
            return 0

        def gone(page_id: str, psid: str | None, at: int) -> bool:
            cut = forgotten.get((page_id, psid or ""))
            return cut is not None and at <= cut

        before = len(self.conversations) + len(self.messages) + len(self.events) + len(self.csat)
        self.conversations = {k: c for k, c in self.conversations.items()
                              if not gone(c.page_id, c.psid, c.started_at)}
        self.messages = {k: m for k, m in self.messages.items() if not gone(m.page_id, m.psid, m.sent_at)}
        self.events = {k: e for k, e in self.events.items() if not gone(e.page_id, e.psid, e.at)}
        self.csat = {k: c for k, c in self.csat.items() if not gone(c.page_id, c.psid, c.at)}
        return before - (len(self.conversations) + len(self.messages) + len(self.events) + len(self.csat))

    def conversation_ids(self) -> set[str]:
        """Every conversation id this batch writes about."""
        ids = set(self.conversations) | set(self.csat)
        ids.update(m.conversation_id for m in self.messages.values() if m.conversation_id)
        ids.update(e.conversation_id for e in self.events.values() if e.conversation_id)
        return ids

    def drop_conversations(self, erased: set[str]) -> int:
        """Remove everything about erased conversations; returns rows dropped."""
        if not erased:
            return 0
        before = len(self.conversations) + len(self.messages) + len(self.events) + len(self.csat)
        self.conversations = {k: c for k, c in self.conversations.items() if k not in erased}
        self.messages = {k: m for k, m in self.messages.items() if m.conversation_id not in erased}
        self.events = {k: e for k, e in self.events.items() if e.conversation_id not in erased}
        self.csat = {k: c for k, c in self.csat.items() if k not in erased}
        return before - (len(self.conversations) + len(self.messages) + len(self.events) + len(self.csat))

    def drop_older_than(self, cutoff_ms: int) -> int:
        """Remove rows already past retention (re-reading old topics does not bring them back)."""
        before = len(self.conversations) + len(self.messages) + len(self.events) + len(self.csat)
        self.conversations = {k: c for k, c in self.conversations.items() if c.last_event_at >= cutoff_ms}
        self.messages = {k: m for k, m in self.messages.items() if m.sent_at >= cutoff_ms}
        self.events = {k: e for k, e in self.events.items() if e.at >= cutoff_ms}
        self.csat = {k: c for k, c in self.csat.items() if c.at >= cutoff_ms}
        return before - (len(self.conversations) + len(self.messages) + len(self.events) + len(self.csat))


# query parameters -------------------------------------------------------------------------------

SEARCH_PARAMS = ("skill", "page", "agent", "from", "to", "closed_by", "close_reason",
                 "csat_min", "csat_max", "q", "limit", "cursor")
CLOSED_BY = ("agent", "consumer", "system")
MAX_LIMIT = 200
DEFAULT_LIMIT = 50
MAX_Q = 200
MAX_VALUE = 200


@dataclass(frozen=True)
class Search:
    """Filters of `GET /conversations` (and `history export`). Times are epoch ms, `to` exclusive."""

    skill: str | None = None
    page: str | None = None
    agent: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    closed_by: str | None = None
    close_reason: str | None = None
    csat_min: int | None = None
    csat_max: int | None = None
    q: str | None = None
    limit: int = DEFAULT_LIMIT
    after: tuple[int, str] | None = None


def parse_time(value: str, param: str) -> int:
    """Epoch ms (digits), or an ISO 8601 date (UTC midnight) or date-time with a time zone."""
    text = value.strip()
    if re.fullmatch(r"-?\d{1,16}", text):
        return int(text)
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadParam(param, f"{value!r} is not epoch ms or an ISO 8601 date/time") from None
    if moment.tzinfo is None:
        raise BadParam(param, f"{value!r} has no time zone (add Z or +01:00)")
    return int(moment.timestamp() * 1000)


def _score(value: str, param: str) -> int:
    if not re.fullmatch(r"[1-5]", value.strip()):
        raise BadParam(param, f"{value!r} is not a score from 1 to 5")
    return int(value)


def encode_cursor(started_at: int, conversation_id: str) -> str:
    """An opaque cursor: the position after the last conversation of a page."""
    return base64.urlsafe_b64encode(orjson.dumps([started_at, conversation_id])).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        started_at, conversation_id = orjson.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise BadParam("cursor", "not a cursor given by a previous page") from None
    if not isinstance(started_at, int) or not isinstance(conversation_id, str):
        raise BadParam("cursor", "not a cursor given by a previous page")
    return started_at, conversation_id


def parse_search(params: Mapping[str, str]) -> Search:
    """`GET /conversations` query parameters → Search; BadParam names the first bad one."""
    for name in params:
        if name not in SEARCH_PARAMS:
            raise BadParam(name, f"unknown parameter (known: {', '.join(SEARCH_PARAMS)})")

    def text(name: str, limit: int = MAX_VALUE) -> str | None:
        value = params.get(name)
        if value is None or value.strip() == "":
            return None
        if len(value) > limit:
            raise BadParam(name, f"longer than {limit} characters")
        return value.strip()

    closed_by = text("closed_by")
    if closed_by is not None and closed_by not in CLOSED_BY:
        raise BadParam("closed_by", f"{closed_by!r} is not one of {', '.join(CLOSED_BY)}")
    from_ms = parse_time(params["from"], "from") if text("from") else None
    to_ms = parse_time(params["to"], "to") if text("to") else None
    if from_ms is not None and to_ms is not None and to_ms <= from_ms:
        raise BadParam("to", "must be after from")
    csat_min = _score(params["csat_min"], "csat_min") if text("csat_min") else None
    csat_max = _score(params["csat_max"], "csat_max") if text("csat_max") else None
    if csat_min is not None and csat_max is not None and csat_max < csat_min:
        raise BadParam("csat_max", "is below csat_min")
    limit = DEFAULT_LIMIT
    if (raw_limit := text("limit")) is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise BadParam("limit", f"{raw_limit!r} is not a number from 1 to {MAX_LIMIT}")
        limit = int(raw_limit)
    cursor = text("cursor", 1000)
    return Search(
        skill=text("skill"), page=text("page"), agent=text("agent"), from_ms=from_ms, to_ms=to_ms,
        closed_by=closed_by, close_reason=text("close_reason"), csat_min=csat_min, csat_max=csat_max,
        q=text("q", MAX_Q), limit=limit, after=decode_cursor(cursor) if cursor else None,
    )


def forget_action(page_id: str, psid: str, action_id: str, now_ms: int) -> dict[str, Any]:
    """The `forget` agent action (PLAN §G): the processor erases this person's conversation state."""
    return {"type": "forget", "action_id": action_id, "page_id": page_id, "psid": psid,
            "agent_id": "history-forget", "role": "admin", "timestamp": now_ms}


def ms_to_datetime(ms: int) -> datetime:
    """Epoch ms → an aware UTC datetime (what the store writes)."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def datetime_to_ms(moment: datetime | None) -> int | None:
    """An aware datetime from the store → epoch ms (what the API answers)."""
    return None if moment is None else int(round(moment.timestamp() * 1000))

"""History pages on the worker's web port (same server as /metrics and /csat).

- `GET /conversations`: filters `skill`, `page`, `agent`, `from`, `to` (epoch ms or ISO 8601),
  `closed_by`, `close_reason`, `csat_min`, `csat_max`, `q` (full text, each conversation in its
  own language), `limit`, `cursor` → `{"conversations": [...], "next_cursor": ...}`, newest first.
- `GET /conversations/{id}`: the conversation and its whole transcript, in order.
- `POST /admin/forget` (`{"page_id", "psid"}`, admin password): erase one person.

With `MESSENGER_STREAMS_ADMIN_PASSWORD` set, the reading pages need it too (transcripts are personal
data); without it they are open to whoever reaches the web port, like /metrics (fine for make run).

Bad parameters answer 400 `{"error": "...", "param": "<name>"}`. Without
`MESSENGER_STREAMS_HISTORY_DSN` the pages answer 503. The store is opened on the first request
(`embedded` starts or joins the local pgserver then).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import faust
import orjson
import psycopg
from psycopg_pool import PoolTimeout

from streams.history.embedded import EmbeddedError, resolve_dsn
from streams.history.forget import forget_person
from streams.history.store import HistoryStore, StoreError
from streams.rules.history import BadParam, admin_authorized, parse_search

if TYPE_CHECKING:
    from streams.stages.pipeline import Pipeline

log = logging.getLogger("messenger_streams.history")

MAX_ID = 200


class StoreUnavailable(Exception):
    """The history store is not configured or cannot be reached (HTTP 503)."""


class LazyStore:
    """The worker's connection pool to the history store, opened on first use, closed at shutdown."""

    def __init__(self, dsn: str | None, datadir: str) -> None:
        self.dsn = dsn
        self.datadir = datadir
        self.store: HistoryStore | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> HistoryStore:
        if self.store is not None:
            return self.store
        if not self.dsn:
            raise StoreUnavailable("history store not configured: set MESSENGER_STREAMS_HISTORY_DSN")
        async with self._lock:
            if self.store is None:
                try:
                    dsn = await asyncio.to_thread(resolve_dsn, self.dsn, self.datadir)
                    store = HistoryStore(dsn, min_size=1, max_size=4, timeout=10.0)
                    await store.open()
                except (StoreError, EmbeddedError) as exc:
                    raise StoreUnavailable(str(exc)) from None
                self.store = store
        return self.store

    async def close(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            await store.close()


def _error(view: faust.web.View, status: int, message: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> Any:
    body: dict[str, Any] = {"error": message}
    if param is not None:
        body["param"] = param
    return view.json(body, status=status, headers=headers)


def register(pipe: Pipeline) -> None:
    """Add the history pages to the worker's web server."""
    app = pipe.app
    settings = pipe.settings
    dsn = settings.history_dsn.get_secret_value().strip() if settings.history_dsn else None
    holder = LazyStore(dsn or None, settings.datadir)
    password = settings.admin_password.get_secret_value() if settings.admin_password else None
    actions_topic = settings.topics.name("actions")

    def refused(view: faust.web.View, request: Any) -> Any:
        """Transcripts are personal data: with an admin password set, reading needs it too."""
        if password and not admin_authorized(request.headers.get("Authorization"), password):
            return _error(view, 401, "admin password required", headers={
                "WWW-Authenticate": 'Basic realm="messenger-streams admin"'})
        return None

    async def call(view: faust.web.View, use: Any) -> Any:
        try:
            store = await holder.get()
            return await use(store)
        except StoreUnavailable as exc:
            return _error(view, 503, str(exc))
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.warning("history store: %s", exc)
            return _error(view, 503, "history store unavailable")

    @app.page("/conversations")
    class Conversations(faust.web.View):
        async def get(self, request: Any) -> Any:
            if (denied := refused(self, request)) is not None:
                return denied
            try:
                search = parse_search({k: request.query.getone(k) for k in request.query})
            except BadParam as exc:
                return _error(self, 400, f"bad query: {exc}", exc.param)

            async def use(store: HistoryStore) -> Any:
                return self.json(await store.search(search))

            return await call(self, use)

    @app.page("/conversations/{conversation_id}")
    class Transcript(faust.web.View):
        async def get(self, request: Any, conversation_id: str) -> Any:
            if (denied := refused(self, request)) is not None:
                return denied
            if not conversation_id or len(conversation_id) > MAX_ID:
                return _error(self, 400, "bad conversation id", "conversation_id")
            if request.query:
                name = next(iter(request.query))
                return _error(self, 400, f"bad query: {name}: unknown parameter", name)

            async def use(store: HistoryStore) -> Any:
                found = await store.transcript(conversation_id)
                if found is None:
                    return _error(self, 404, f"no conversation {conversation_id}", "conversation_id")
                return self.json(found)

            return await call(self, use)

    @app.page("/admin/forget")
    class Forget(faust.web.View):
        async def post(self, request: Any) -> Any:
            if not password:
                return _error(self, 403, "admin endpoints are off: set MESSENGER_STREAMS_ADMIN_PASSWORD")
            if not admin_authorized(request.headers.get("Authorization"), password):
                return _error(self, 401, "admin password required", headers={
                    "WWW-Authenticate": 'Basic realm="messenger-streams admin"'})
            try:
                body = orjson.loads(await request.read() or b"{}")
            except orjson.JSONDecodeError:
                return _error(self, 400, "body is not JSON", "body")
            if not isinstance(body, dict):
                return _error(self, 400, "body is not a JSON object", "body")
            for name in ("page_id", "psid"):
                value = body.get(name)
                if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip() \
                        or len(str(value)) > MAX_ID:
                    return _error(self, 400, f"{name} is missing or not an id", name)
            page_id, psid = str(body["page_id"]).strip(), str(body["psid"]).strip()

            async def send(key: bytes, value: bytes) -> None:
                await app.producer.send_and_wait(actions_topic, key, value, None, None, None)

            async def use(store: HistoryStore) -> Any:
                return self.json(await forget_person(store, send, page_id, psid))

            return await call(self, use)

    async def close_history_store(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await holder.close()

    app.on_before_shutdown.connect(close_history_store)

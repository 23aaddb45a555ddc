"""Messenger personas for the dispatcher: created once per page, remembered durably (#17).

`PersonaBook.persona_id(page_id, origin, agent_nickname, params)` gives the `persona_id` to put on a
Send API request, or None (personas off, or none to be had now: the message goes without one).

- Remembered: a compacted topic (`messenger.personas`, key `<page_id>|<persona key>`) holds every
  persona created; each dispatcher follows it with a `TopicMirror`, so a restart, another dispatcher
  or a rebalance never creates a persona twice. A record whose name or picture no longer matches the
  config is not used (a new persona is made).
- Idempotent creation: before creating, the page's personas are listed (`GET /{page_id}/personas`)
  and one with the same name is reused: a crash between Meta's answer and our record leaves no twin.
  Within one dispatcher, a lock per persona key lets one task create while the others wait.
- Failures: a failed list/create is counted (`messenger_personas{result="failed"}`) and remembered
  for `personas.retry_after_seconds`, during which the page's messages go without that persona.
- Bounded: at most `personas.max_personas` personas, locks and failure marks are kept in memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

from streams.core import metrics
from streams.core.config_rich import Personas
from streams.core.mirror import TopicMirror
from streams.rules.personas import PersonaSpec, find_existing, persona_for, record, record_key, usable

log = logging.getLogger("messenger_streams.personas")


def _decode(raw: bytes) -> dict[str, Any]:
    value = orjson.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("a persona record must be a JSON object")
    return value


class PersonaBook:
    """Persona ids by page, created on first use (see the module docstring)."""

    def __init__(self, cfg: Personas, bootstrap_servers: str, topic: str, graph_base: str,
                 *, timeout: float = 10.0) -> None:
        self.cfg = cfg
        self.topic = topic
        self.graph_base = graph_base.rstrip("/")
        self.timeout = timeout
        self.mirror: TopicMirror[dict[str, Any]] = TopicMirror(bootstrap_servers, topic, _decode)
        self.producer: AIOKafkaProducer | None = None
        self.session: aiohttp.ClientSession | None = None
        self.known: dict[str, dict[str, Any]] = {}  # created here, until the mirror has it
        self.failed_until: dict[str, float] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def start(self, producer: AIOKafkaProducer, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        self.producer, self.session = producer, session
        await self.mirror.start(timeout)
        await self.mirror.wait_ready(timeout)

    async def stop(self) -> None:
        await self.mirror.stop()

    def _bound(self, table: dict[str, Any]) -> None:
        while len(table) > self.cfg.max_personas:
            table.pop(next(iter(table)))

    def _drop_idle_locks(self) -> None:
        """Keep at most `max_personas` locks, dropping the oldest idle ones: a lock someone holds or
        waits for stays (there are at most as many of those as sends in flight)."""
        excess = len(self.locks) - self.cfg.max_personas + 1
        if excess <= 0:
            return
        for key in [k for k, lk in self.locks.items() if not lk.locked()][:excess]:
            del self.locks[key]

    async def persona_id(self, page_id: str, origin: str | None, agent_nickname: str | None,
                         params: Mapping[str, str]) -> str | None:
        """The persona to send as, or None (see the module docstring). Never raises for Graph errors."""
        spec = persona_for(origin, agent_nickname, self.cfg)
        if spec is None:
            return None
        key = record_key(page_id, spec)
        found = usable(self.mirror.get(key), spec) or usable(self.known.get(key), spec)
        if found:
            return found
        if self.failed_until.get(key, 0.0) > time.monotonic():
            return None
        lock = self.locks.get(key)
        if lock is None:
            self._drop_idle_locks()
            lock = self.locks[key] = asyncio.Lock()
        async with lock:
            found = usable(self.mirror.get(key), spec) or usable(self.known.get(key), spec)
            if found:
                return found
            return await self._obtain(page_id, spec, key, params)

    def forget(self, page_id: str, persona_id: str) -> None:
        """Meta refused a persona id (deleted at Meta?): not used again by this process until restarted
        or re-created under a new record."""
        for key, value in list(self.known.items()):
            if value.get("persona_id") == persona_id:
                del self.known[key]
        for key, value in self.mirror.items():
            if key.startswith(page_id + "|") and value.get("persona_id") == persona_id:
                self.failed_until[key] = time.monotonic() + self.cfg.retry_after_seconds
                self._bound(self.failed_until)

    async def _obtain(self, page_id: str, spec: PersonaSpec, key: str, params: Mapping[str, str]) -> str | None:
        try:
            listing = await self._call("GET", f"{page_id}/personas", params, query={"fields": "id,name",
                                                                                    "limit": "100"})
            persona_id = find_existing(listing, spec)
            result = "found"
            if persona_id is None:
                created = await self._call("POST", f"{page_id}/personas", params,
                                           body={"name": spec.name, "profile_picture_url": spec.picture_url})
                raw_id = created.get("id")
                if not isinstance(raw_id, str | int) or not str(raw_id):
                    raise ValueError("the Personas API answered without an id")
                persona_id, result = str(raw_id), "created"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self.failed_until[key] = time.monotonic() + self.cfg.retry_after_seconds
            self._bound(self.failed_until)
            metrics.PERSONAS.labels("failed").inc()
            log.warning("page %s: no persona %r (%s); sending without one for %ds", page_id, spec.name,
                        type(exc).__name__ if not isinstance(exc, ValueError) else exc, self.cfg.retry_after_seconds)
            return None
        value = record(page_id, spec, persona_id, int(time.time() * 1000))
        self.known[key] = value
        self._bound(self.known)
        if self.producer is not None:
            await self.producer.send_and_wait(self.topic, orjson.dumps(value), key=key.encode())
        metrics.PERSONAS.labels(result).inc()
        log.info("page %s: persona %r is %s (%s)", page_id, spec.name, persona_id, result)
        return persona_id

    async def _call(self, method: str, path: str, params: Mapping[str, str], *,
                    query: Mapping[str, str] | None = None, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if self.session is None:
            raise OSError("the HTTP session is closed")
        url = f"{self.graph_base}/{path}"
        async with self.session.request(method, url, params={**params, **(query or {})}, json=body,
                                        timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise ValueError(f"the Personas API answered HTTP {resp.status}")
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ValueError("the Personas API answered with a body that is not JSON") from None
        if not isinstance(doc, dict):
            raise ValueError("the Personas API answered with unexpected JSON")
        return doc


def with_persona(body: dict[str, Any], persona_id: str | None) -> dict[str, Any]:
    """A Send API body sent as the persona: messages only (sender actions go as the page)."""
    if persona_id is None or "message" not in body:
        return body
    return {**body, "persona_id": persona_id}

"""`messenger-streams dispatch`: the Send API dispatcher, the edge that talks to people.

Consumes `messenger.outbound` (OutboundRequest JSON, key `<page_id>:<psid>`) in its own consumer
group, POSTs each request to `{graph_url}/{api_version}/me/messages?access_token=<page token>` and
writes one `SendResult` per request to `messenger.send.results` (same key). A record whose
`endpoint` names a thread-control edge (#15: `pass_thread_control`, `take_thread_control`,
`request_thread_control`, `release_thread_control`) is POSTed to `.../me/<endpoint>` instead, with
the same at-most-once log; its SendResult carries the `endpoint`.

- At most once per outbox id: a sent log (streams/edges/sentlog.py; the fold in
  streams/rules/sendapi.py), co-partitioned with messenger.outbound, records each outbox id
  `in_flight` before the Graph call and `sent` / `failed` (with its SendResult) after it. A
  redelivered outbox id is answered from the log (the same SendResult again, no Graph call); one
  whose marker has no outcome (the owner died between the call and the record) is reported
  `failed` with reason `in_doubt`, never resent. Owners fence each other through claims in the log.
- Order: one task per conversation key drains that key's records strictly in order (a retry blocks
  the later records of the same key); different keys proceed concurrently.
- Rebalances: before a partition is released its in-flight sends finish or stop at a safe point
  (and are recorded); records not started are left to the next owner.
- At-least-once delivery of records to this code: manual commits; a partition's committed offset
  never passes a record that is not fully handled (recorded, and its SendResult acknowledged).
- Bad records: an invalid OutboundRequest, or any exception while handling one record, goes to the
  dead-letter topic with its original bytes; the dispatcher moves on.
- Meta's limits, error classification and backoff: streams/rules/sendapi.py; per-page token bucket.
- Page access tokens (issue 14): behind `PageCredentials` (streams/core/credentials.py): `lookup`
  gives the token with its `appsecret_proof`, or a refusal (no token, page switched off or not
  connected, needs re-authorization) that fails the request without a Graph call; a 190 is reported
  with `token_rejected`, every decided send with `note_result`; `redact` hides every token. The
  command follows the page directory (`connector.pages`), the tokens file as fallback; tests may
  give static tokens (`StaticCredentials`).
- #17: a record with `endpoint: user_profile` is a User Profile read (one attempt, answered as a
  SendResult with `profile`, not a send for `pages list`); messages may go as a persona
  (streams/edges/personas.py). Both use the page's credential, `appsecret_proof` included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from pydantic import ValidationError

from schemas.contract import OutboundRequest, SendResult
from schemas.events import Source
from streams.core import metrics, serde
from streams.core.config import ConfigError, load_config
from streams.core.config_rich import Personas
from streams.core.credentials import Credential, PageCredentials, StaticCredentials, dispatch_credentials
from streams.core.deadletter import dead_letter
from streams.core.process import CliError, configure_logging, quiet_kafka_startup, run_until_signalled
from streams.core.settings import load_settings
from streams.core.topics import ensure_topics
from streams.edges.personas import PersonaBook, with_persona
from streams.edges.sentlog import SentLedger, SentLogError, ensure_sent_log_topic
from streams.rules.profile import ENDPOINT as PROFILE_ENDPOINT
from streams.rules.sendapi import (
    DAY_MS,
    FAILED,
    IN_DOUBT,
    IN_FLIGHT,
    NEW,
    REPLAY,
    SEND,
    SENT,
    SUPERSEDED,
    Backoff,
    Limits,
    SendError,
    SentLogBounds,
    TokenBucket,
    after_marker,
    before_marker,
    classify_error,
    entry_key,
    entry_value,
    is_expired,
    prepare_requests,
)
from streams.rules.sendapi import transport_error as make_transport_error

log = logging.getLogger("messenger_streams.dispatch")

DEFAULT_GRAPH_URL = "https://graph.facebook.com"
# #15: thread-control edges (Conversation Routing) an outbound record may name in `endpoint`
THREAD_ENDPOINTS = frozenset({"pass_thread_control", "take_thread_control", "request_thread_control",
                              "release_thread_control"})
DEFAULT_API_VERSION = "v21.0"
DEFAULT_WEB_PORT = 6067
DEAD_LETTER_MAX_PAYLOAD = 512 * 1024  # a dead letter keeps at most this much of the original value

IN_DOUBT_MESSAGE = (
    "in doubt: a dispatcher stopped after calling the Graph API and before recording its answer, so this "
    "message may or may not have been delivered; it is not resent. If it was delivered, its echo (metadata = "
    "outbox id) reaches the conversation and the console shows the mid"
)


class DispatchError(RuntimeError):
    """The dispatcher cannot go on (Kafka gone while recording): exit, records are redelivered."""


@dataclass(frozen=True)
class DispatchOptions:
    """Everything the dispatcher needs; built from the command line or directly by tests."""

    bootstrap_servers: str
    outbound_topic: str
    results_topic: str
    sent_topic: str  # the sent log, co-partitioned with outbound_topic
    dlq_topic: str
    group_id: str
    tokens: dict[str, str]
    graph_url: str = DEFAULT_GRAPH_URL
    api_version: str = DEFAULT_API_VERSION
    backoff: Backoff = Backoff()
    rate_per_page: float = 300.0
    burst: float | None = None
    request_timeout: float = 10.0
    max_in_flight: int = 1000
    limits: Limits = Limits()
    sent_log: SentLogBounds = SentLogBounds()
    shutdown_timeout: float = 30.0  # longest wait for in-flight sends on revoke / stop (then cancelled)
    kafka_timeout: float = 30.0
    web_host: str = "0.0.0.0"  # noqa: S104 - /metrics is meant to be scraped
    web_port: int = 0  # 0: no HTTP server
    partitions: int = 8
    replication_factor: int = 1
    personas: Personas = Personas()  # #17: off by default
    personas_topic: str = "messenger.personas"
    profile_timeout: float = 5.0  # #17: a User Profile read that takes longer fails (never waited for)

    def __repr__(self) -> str:  # tokens never appear in reprs or logs
        return f"DispatchOptions(group_id={self.group_id!r}, pages={sorted(self.tokens)!r})"

    @property
    def send_url(self) -> str:
        return f"{self.graph_url.rstrip('/')}/{self.api_version.strip('/')}/me/messages"

    @property
    def graph_base(self) -> str:
        return f"{self.graph_url.rstrip('/')}/{self.api_version.strip('/')}"

    def url_for(self, endpoint: str | None) -> str | None:
        """#15: the Graph edge an outbound record is POSTed to: the Send API (no `endpoint`, or
        `messages`), a thread-control edge (Conversation Routing), or None for an endpoint that is no
        such edge (`user_profile` is a read: `Dispatcher.read_profile`)."""
        if endpoint is None or endpoint == "messages":
            return self.send_url
        if endpoint in THREAD_ENDPOINTS:
            return f"{self.graph_base}/me/{endpoint}"
        return None

    def knows(self, endpoint: str | None) -> bool:
        """Whether this dispatcher can handle an outbound record's `endpoint` (#15, #17)."""
        return endpoint == PROFILE_ENDPOINT or self.url_for(endpoint) is not None


@dataclass
class _Outcome:
    mid: str | None = None
    error: SendError | None = None
    attempts: int = 0
    stopped: bool = False  # the partition is being released: gave up before an attempt


@dataclass
class _Partition:
    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset handed out
    committed: int | None = None

    def committable(self) -> int | None:
        if self.pending:
            return min(self.pending)
        return self.next_offset


class OffsetTracker:
    """Per partition: offsets handed to conversation tasks and not yet done. The committable offset is
    the lowest one still pending (or one past the last handed out when none is)."""

    def __init__(self) -> None:
        self.parts: dict[TopicPartition, _Partition] = {}

    def add(self, tp: TopicPartition, offset: int) -> None:
        p = self.parts.setdefault(tp, _Partition())
        p.pending.add(offset)
        p.next_offset = max(p.next_offset or 0, offset + 1)

    def done(self, tp: TopicPartition, offset: int) -> None:
        p = self.parts.get(tp)
        if p is not None:
            p.pending.discard(offset)

    def to_commit(self, only: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        out: dict[TopicPartition, int] = {}
        for tp, p in self.parts.items():
            if only is not None and tp not in only:
                continue
            off = p.committable()
            if off is not None and off != p.committed:
                out[tp] = off
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            if tp in self.parts:
                self.parts[tp].committed = off

    def pending_in(self, tps: set[TopicPartition]) -> int:
        return sum(len(p.pending) for tp, p in self.parts.items() if tp in tps)

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self.parts.pop(tp, None)


@dataclass
class Ownership:
    """One assignment of one outbound partition to this dispatcher: its owner token in the sent log,
    and whether it is being released (then nothing new starts and waits stop)."""

    tp: TopicPartition
    token: str
    releasing: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0  # records of this partition being handled right now
    next_offset: int = 0  # one past the last record handed out under this ownership
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass
class _Item:
    own: Ownership
    rec: Any


class _Released(Exception):  # noqa: N818 - control flow, not an error
    """The record was not handled because its partition is being released: the next owner handles it."""


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka swallows listener exceptions; a failure here stops the dispatcher instead."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            await self.dispatcher.on_revoked(set(revoked))
        except Exception as exc:  # noqa: BLE001 - see class docstring
            self.dispatcher.fail(exc)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        try:
            await self.dispatcher.on_assigned(set(assigned))
        except Exception as exc:  # noqa: BLE001 - see class docstring
            self.dispatcher.fail(exc)


class Dispatcher:
    """The consume → record → send → record → result loop. `await run(stop)` until `stop` is set."""

    def __init__(self, opts: DispatchOptions, credentials: PageCredentials | None = None) -> None:
        self.opts = opts
        self.credentials: PageCredentials = credentials if credentials is not None else StaticCredentials(opts.tokens)
        self.tracker = OffsetTracker()
        self.queues: dict[str, deque[_Item]] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.owned: dict[TopicPartition, Ownership] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.slots = asyncio.Semaphore(opts.max_in_flight)
        self.fatal: BaseException | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.ledger: SentLedger | None = None
        self.session: aiohttp.ClientSession | None = None
        self._commit_lock = asyncio.Lock()
        self._ownership_changed = asyncio.Condition()
        self.personas = (PersonaBook(opts.personas, opts.bootstrap_servers, opts.personas_topic, opts.graph_base,
                                     timeout=opts.request_timeout) if opts.personas.enabled else None)

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        o = self.opts
        await self.credentials.start()  # the page directory is read to its end before any record is handled
        # linger 0: a send waits for three acks in a row (marker, outcome, result), each would pay the linger
        self.producer = AIOKafkaProducer(
            bootstrap_servers=o.bootstrap_servers, acks="all", enable_idempotence=True, linger_ms=0
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=o.bootstrap_servers,
            group_id=o.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=600_000,
            metadata_max_age_ms=5_000,
            # a dead dispatcher's partitions move within ~10 s; a rebalance is noticed within ~1 s
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            # the group waits this long for our revoke (in-flight sends finish, then are recorded)
            rebalance_timeout_ms=int((o.shutdown_timeout + 2 * o.kafka_timeout + 10) * 1000),
        )
        try:
            await asyncio.wait_for(self.producer.start(), timeout)
            self.ledger = SentLedger(o.bootstrap_servers, o.sent_topic, self.producer, o.sent_log,
                                     timeout=o.kafka_timeout)
            await self.ledger.start()
            await asyncio.wait_for(self.consumer.start(), timeout)
        except (TimeoutError, KafkaError, OSError) as exc:
            await self.stop()
            raise ConnectionError(f"cannot reach Kafka at {o.bootstrap_servers}: {type(exc).__name__}") from None
        self.consumer.subscribe([o.outbound_topic], listener=_Rebalance(self))
        # a connect that times out (ConnectionTimeoutError) never reached Graph and is retried; the total
        # timeout expiring later means the request was written: in doubt
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=o.request_timeout, connect=max(0.1, o.request_timeout / 2))
        )
        if self.personas is not None:
            await self.personas.start(self.producer, self.session, timeout)

    async def stop(self) -> None:
        if self.personas is not None:
            await self.personas.stop()
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
        if self.ledger is not None:
            await self.ledger.stop()
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
        self.consumer = self.producer = None
        self.ledger = None
        await self.credentials.stop()

    def fail(self, exc: BaseException) -> None:
        """Stop the dispatcher: it exits non-zero, uncommitted records are redelivered."""
        if self.fatal is None:
            self.fatal = exc
            log.error("dispatcher stops: %s", self.credentials.redact(f"{type(exc).__name__}: {exc}"))

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then release every partition (in-flight sends finish), commit."""
        if self.consumer is None:
            raise RuntimeError("start() the dispatcher first")
        last_commit = time.monotonic()
        try:
            while not stop.is_set() and self.fatal is None:
                batch = await self.consumer.getmany(timeout_ms=200, max_records=500)
                # the ownership each batch was fetched under, taken before any await lets a rebalance run
                fetched_under = {tp: self.owned.get(tp) for tp in batch}
                for tp, records in batch.items():
                    own = fetched_under[tp] or await self._ownership(tp, stop)
                    if own is None or own.releasing.is_set():
                        continue  # not ours any more: the next owner reads them from the committed offset
                    for rec in records:
                        if rec.offset < own.next_offset:
                            continue  # already handed out under this ownership
                        if not await self._slot(stop):
                            break  # stopping: records not handed out are not committed, so redelivered
                        own.next_offset = rec.offset + 1
                        self._enqueue(own, rec)
                if time.monotonic() - last_commit >= 0.2 or not batch:
                    await self.commit()
                    last_commit = time.monotonic()
        finally:
            with contextlib.suppress(Exception):
                await self.on_revoked(set(self.owned))
        if self.fatal is not None:
            raise DispatchError(str(self.fatal)) from self.fatal

    async def _ownership(self, tp: TopicPartition, stop: asyncio.Event) -> Ownership | None:
        """The live ownership of `tp`, waiting while its assignment callback still runs (aiokafka can
        hand out records of a partition before `on_partitions_assigned` returned)."""
        if self.consumer is None:
            return None
        async with self._ownership_changed:
            while True:
                own = self.owned.get(tp)
                if own is not None and not own.releasing.is_set():
                    return own
                if tp not in self.consumer.assignment() or stop.is_set() or self.fatal is not None:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ownership_changed.wait(), 0.5)

    async def _slot(self, stop: asyncio.Event) -> bool:
        """One of `max_in_flight` slots; False when stopping (or a fatal error) while waiting for one."""
        while True:
            try:
                await asyncio.wait_for(self.slots.acquire(), 0.5)
                return True
            except TimeoutError:
                if stop.is_set() or self.fatal is not None:
                    return False

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        if self.consumer is None:
            return
        async with self._commit_lock:
            offsets = self.tracker.to_commit(only)
            if not offsets:
                return
            try:
                await self.consumer.commit(offsets)
            except KafkaError as exc:
                log.warning("commit failed (will retry): %s", type(exc).__name__)
                return
            self.tracker.committed(offsets)

    # --- rebalances ------------------------------------------------------------------------------

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Claim the assigned partitions in the sent log and read it through the claims, before any
        of their records is handled."""
        mine = {tp for tp in assigned if tp.topic == self.opts.outbound_topic}
        if self.ledger is None or not mine:
            return
        tokens = await self.ledger.acquire({tp.partition for tp in mine})
        async with self._ownership_changed:
            for tp in mine:
                self.owned[tp] = Ownership(tp, tokens[tp.partition])
            self._ownership_changed.notify_all()
        metrics.SENT_LOG_IDS.set(self.ledger.entries())
        log.info("assigned %d partitions", len(mine))

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Release partitions: nothing new starts, sends in progress finish or stop at a safe point and
        are recorded (bounded by `shutdown_timeout`, then cancelled: their markers stay in doubt),
        handled records are committed, and the sent log stops following them."""
        owns = [o for tp, o in self.owned.items() if tp in revoked]
        for own in owns:
            own.releasing.set()
        busy = [own.idle.wait() for own in owns if own.active]
        if busy:
            _, late = await asyncio.wait([asyncio.ensure_future(b) for b in busy], timeout=self.opts.shutdown_timeout)
            if late:
                self._cancel_busy({own.tp for own in owns if own.active})
                for fut in late:
                    fut.cancel()
        await self.commit(revoked)
        self.tracker.forget(revoked)
        async with self._ownership_changed:
            for own in owns:
                if self.owned.get(own.tp) is own:
                    del self.owned[own.tp]
            self._ownership_changed.notify_all()
        if self.ledger is not None and owns:
            await self.ledger.release({o.tp.partition for o in owns})
            log.info("released %d partitions", len(owns))

    def _cancel_busy(self, tps: set[TopicPartition]) -> None:
        for key, q in list(self.queues.items()):
            if q and q[0].own.tp in tps and q[0].own.active:
                task = self.tasks.get(key)
                if task is not None:
                    log.warning("cancelling the send of %s after %.0fs: its outbox id stays in doubt",
                                key, self.opts.shutdown_timeout)
                    task.cancel()

    def _superseded(self, own: Ownership) -> None:
        """Another dispatcher claimed this partition: stop working on it until the rebalance reaches us."""
        if not own.releasing.is_set():
            log.warning("partition %d was claimed by another dispatcher: stopping work on it", own.tp.partition)
            own.releasing.set()
            if self.consumer is not None:
                with contextlib.suppress(Exception):
                    self.consumer.pause(own.tp)

    # --- per conversation ------------------------------------------------------------------------

    def _enqueue(self, own: Ownership, rec: Any) -> None:
        self.tracker.add(own.tp, rec.offset)
        key = rec.key.decode("utf-8", "replace") if rec.key is not None else f"<null>:{own.tp.partition}"
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = deque()
        q.append(_Item(own, rec))
        if key not in self.tasks:
            self.tasks[key] = asyncio.create_task(self._conversation(key), name=f"dispatch:{key}")

    async def _conversation(self, key: str) -> None:
        q = self.queues[key]
        try:
            while q and self.fatal is None:
                item = q[0]
                own = item.own
                done = False
                if not own.releasing.is_set():
                    own.active += 1
                    own.idle.clear()
                    try:
                        done = await self.handle(own, item.rec)
                    except (DispatchError, SentLogError) as exc:
                        self.fail(exc)
                        return
                    finally:
                        own.active -= 1
                        if not own.active:
                            own.idle.set()
                q.popleft()
                self.slots.release()
                if done:
                    self.tracker.done(own.tp, item.rec.offset)
        finally:
            self.tasks.pop(key, None)
            if self.fatal is None and q and q[0].own.releasing.is_set():
                q.popleft()  # the record whose send was cancelled on revoke: left to the next owner
                self.slots.release()
            if not q:
                self.queues.pop(key, None)
            elif self.fatal is None:
                self.tasks[key] = asyncio.create_task(self._conversation(key), name=f"dispatch:{key}")

    async def handle(self, own: Ownership, rec: Any) -> bool:
        """Handle one outbound record. True: done (its offset may be committed); False: left to the
        partition's next owner. Raises DispatchError / SentLogError when Kafka fails."""
        try:
            if rec.value is None:
                raise ValueError("a null value (tombstone) is not an outbound request")
            out = OutboundRequest.model_validate_json(rec.value)
        except (ValidationError, ValueError) as exc:
            metrics.SEND_RESULTS.labels("invalid").inc()
            await self.dead_letter(rec, "invalid_outbound", _describe_invalid(exc))
            return True
        try:
            return await self.dispatch(own, rec, out)
        except _Released:
            return False
        except (DispatchError, SentLogError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - one record must not stop the dispatcher
            await self.dead_letter(rec, "processing_error",
                                   self.credentials.redact(f"{type(exc).__name__}: {exc}"))
            return True

    async def dispatch(self, own: Ownership, rec: Any, out: OutboundRequest) -> bool:
        """Send one valid outbound request at most once: the sent log decides (see module docstring)."""
        ledger = self._ledger()
        p = own.tp.partition
        conv = rec.key.decode("utf-8", "replace") if rec.key is not None else f"{out.page_id}:{out.psid}"
        result_key: bytes = rec.key if rec.key is not None else conv.encode()
        key = entry_key(conv, out.outbox_id)
        seen = ledger.log(p).get(conv, out.outbox_id)
        verdict = before_marker(seen)
        if verdict == NEW:
            if own.releasing.is_set():
                raise _Released
            verdict, result = await self._new(own, out, conv, key)
            if verdict in (SENT, FAILED):
                assert result is not None  # noqa: S101 - set with the verdict
                await ledger.write(p, key, entry_value(conv, out.outbox_id, verdict, _now_ms(), own.token,
                                                       _stored(result)))
                await self._emit(result_key, serde.dumps(result), result.status)
                if out.endpoint != PROFILE_ENDPOINT:  # a profile read is no send
                    self.credentials.note_result(out.page_id, result.status)  # `pages list`: the page's last send
                return True
            seen = ledger.log(p).get(conv, out.outbox_id)
        if verdict == REPLAY and seen is not None and seen.result is not None:
            metrics.SEND_RESULTS.labels("deduplicated").inc()
            log.info("outbox %s was handled before (%s): its result again, no Graph call", out.outbox_id, seen.state)
            await self._emit(result_key, serde.dumps(_restored(out, seen.result)), None)
            return True
        result = self._failed(out, IN_DOUBT, IN_DOUBT_MESSAGE, retryable=True, attempts=0)
        log.warning("outbox %s is in doubt (a marker without outcome): reported, not resent", out.outbox_id)
        await ledger.write(p, key, entry_value(conv, out.outbox_id, FAILED, _now_ms(), own.token, _stored(result)))
        await self._emit(result_key, serde.dumps(result), IN_DOUBT)
        return True

    async def _new(self, own: Ownership, out: OutboundRequest, conv: str, key: bytes) -> tuple[str, SendResult | None]:
        """An outbox id the log has never seen: (SENT | FAILED, its result) when this call decided it,
        else the verdict of the records another owner wrote first (REPLAY / in doubt)."""
        ledger = self._ledger()
        p = own.tp.partition
        now = _now_ms()
        if is_expired(out.created_at, now, self.opts.sent_log):
            days = self.opts.sent_log.max_age_ms / DAY_MS
            return FAILED, self._failed(out, "expired", f"not sent: created more than {days:g} days ago",
                                        retryable=False, attempts=0)
        token = self.credentials.lookup(out.page_id)
        if not isinstance(token, Credential):  # refused before any Graph call: no marker, nothing in doubt
            log.warning("outbox %s not sent: %s", out.outbox_id, token.message)
            return FAILED, self._failed(out, token.reason, token.message, retryable=False, attempts=0, code=token.code)
        if not self.opts.knows(out.endpoint):  # #15: refused before any marker too
            return FAILED, self._failed(out, "unknown_endpoint", f"endpoint {out.endpoint!r} is not supported",
                                        retryable=False, attempts=0)
        parts, warnings = prepare_requests(out.request, self.opts.limits)
        for w in warnings:
            log.warning("outbox %s: %s", out.outbox_id, w)
        offset = await ledger.write(p, key, entry_value(conv, out.outbox_id, IN_FLIGHT, now, own.token))
        await ledger.wait_applied(p, offset)
        lg = ledger.log(p)
        verdict = after_marker(lg, lg.get(conv, out.outbox_id), own.token)
        if verdict == SUPERSEDED:
            mine = lg.get(conv, out.outbox_id)
            if mine is not None and mine.only_marked_by(own.token):
                await ledger.write(p, key, None)  # release our marker: nothing was sent
            self._superseded(own)
            raise _Released
        if verdict != SEND:
            return verdict, None
        result = await self.send(own, out, token, parts)
        if result is None:  # released before anything reached Graph
            await ledger.write(p, key, None)
            raise _Released
        return result.status, result

    async def send(self, own: Ownership, out: OutboundRequest, token: Credential,
                   parts: list[dict[str, Any]]) -> SendResult | None:
        """Send every part of one request in order; the SendResult of the whole, or None when the
        partition is being released and no part reached Graph."""
        if own.releasing.is_set():
            return None
        if out.endpoint == PROFILE_ENDPOINT:
            return await self.read_profile(out, token)
        url = self.opts.url_for(out.endpoint)  # the Send API or a thread-control edge (#15)
        persona = await self._persona(out, token)  # only for bodies with a `message`
        mids: list[str] = []
        last = _Outcome()
        for done, body in enumerate(parts):
            last = await self.send_one(out.page_id, token, with_persona(body, persona), own.releasing, url)
            if persona is not None and last.error is not None and last.error.code == 100 and "message" in body:
                # Meta refused the request with the persona (deleted at Meta?): once more without it
                assert self.personas is not None  # noqa: S101 - a persona comes from the book
                self.personas.forget(out.page_id, persona)
                metrics.PERSONAS.labels("refused").inc()
                persona = None
                last = await self.send_one(out.page_id, token, body, own.releasing, url)
            if last.stopped:
                if not done:
                    return None
                return self._failed(out, "cancelled", f"the dispatcher released this conversation after "
                                    f"{done} of {len(parts)} parts", retryable=True, attempts=last.attempts,
                                    mids=mids, parts=len(parts))
            if last.error is not None:
                e = last.error
                return self._failed(out, e.reason, self.credentials.redact(e.message),
                                    retryable=e.retryable or e.reason == IN_DOUBT, attempts=last.attempts,
                                    code=e.code, subcode=e.subcode, mids=mids, parts=len(parts))
            if last.mid:
                mids.append(last.mid)
        return SendResult(**_common(out), status="sent", mid=last.mid, mids=mids, attempts=last.attempts,
                          parts=len(parts), timestamp=_now_ms())

    async def send_one(self, page_id: str, token: Credential, body: dict[str, Any],
                       stop: asyncio.Event | None = None, url: str | None = None) -> _Outcome:
        """POST one body with retries on retryable errors; throttled per page. When `stop` is set, a
        wait (rate limit, backoff) ends the send before its next attempt (`stopped`)."""
        if self.session is None:
            raise DispatchError("the HTTP session is closed")
        backoff = self.opts.backoff
        err: SendError | None = None
        for attempt in range(1, backoff.max_attempts + 1):
            if not await self._throttle(page_id, stop):
                return _Outcome(attempts=attempt - 1, stopped=True)
            try:
                target = url or self.opts.send_url
                async with self.session.post(target, params=token.params(), json=body) as resp:
                    data = await resp.read()
                    if resp.status == 200:
                        return _Outcome(mid=_message_id(data), attempts=attempt)
                    err = classify_error(resp.status, data)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                err = make_transport_error(exc)  # no connection: the request cannot have reached Graph
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                err = make_transport_error(exc, reached=True)
            if err.reauth:
                self.credentials.token_rejected(token, err.code or 190, err.subcode, err.message)
            if not err.retryable or attempt >= backoff.max_attempts:
                return _Outcome(error=err, attempts=attempt)
            delay = backoff.delay(attempt)
            metrics.SEND_RESULTS.labels("retried").inc()
            log.info("page %s: %s (code %s), retry %d in %.2fs", page_id, err.reason, err.code, attempt, delay)
            if err.reason == "rate_limited":
                self._bucket(page_id).pause_until(time.monotonic() + delay)
            if await _wait(stop, delay):
                return _Outcome(error=err, attempts=attempt, stopped=True)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- #17: the customer's profile and personas ------------------------------------------------------

    async def _persona(self, out: OutboundRequest, token: Credential) -> str | None:
        """The persona to send `out` as (None: personas off, or none to be had: sent without)."""
        if self.personas is None or "message" not in out.request:
            return None
        return await self.personas.persona_id(out.page_id, out.origin, out.agent_nickname, token.params())

    async def read_profile(self, out: OutboundRequest, token: Credential) -> SendResult:
        """A User Profile API read (`endpoint: user_profile`): one attempt, `profile_timeout`, throttled
        with the page's sends; the answer (or the failure) goes back to the conversation as a SendResult."""
        if self.session is None:
            raise DispatchError("the HTTP session is closed")
        psid = str(out.request.get("psid") or out.psid)
        fields = [f for f in out.request.get("fields") or [] if isinstance(f, str)]
        common = _common(out)
        await self._throttle(out.page_id)
        err: SendError
        try:
            async with self.session.get(f"{self.opts.graph_base}/{psid}",
                                        params={"fields": ",".join(fields), **token.params()},
                                        timeout=aiohttp.ClientTimeout(total=self.opts.profile_timeout)) as resp:
                data = await resp.read()
                if resp.status == 200:
                    body = orjson.loads(data)
                    if isinstance(body, dict):
                        return SendResult(**common, status="sent", profile=body, timestamp=_now_ms())
                    err = classify_error(resp.status, b"")
                else:
                    err = classify_error(resp.status, data)
        except orjson.JSONDecodeError:
            err = classify_error(None, b"")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            err = make_transport_error(exc)
        if err.reauth:
            self.credentials.token_rejected(token, err.code or 190, err.subcode, err.message)
        log.info("page %s: no profile for a person (%s, code %s)", out.page_id, err.reason, err.code)
        return SendResult(**common, status="failed", code=err.code, subcode=err.subcode,
                          message=self.credentials.redact(err.message), retryable=False, attempts=1,
                          reason=err.reason, timestamp=_now_ms())

    def _bucket(self, page_id: str) -> TokenBucket:
        b = self.buckets.get(page_id)
        if b is None:
            b = self.buckets[page_id] = TokenBucket(self.opts.rate_per_page, self.opts.burst, time.monotonic())
        return b

    async def _throttle(self, page_id: str, stop: asyncio.Event | None = None) -> bool:
        """Wait for the page's token bucket; False when `stop` was set first."""
        wait = self._bucket(page_id).reserve(time.monotonic())
        if wait > 0:
            return not await _wait(stop, wait)
        return True

    # --- results and dead letters ------------------------------------------------------------------

    def _failed(self, out: OutboundRequest, reason: str, message: str, *, retryable: bool, attempts: int,
                code: int | None = None, subcode: int | None = None, mids: list[str] | None = None,
                parts: int | None = None) -> SendResult:
        extra: dict[str, Any] = {"reason": reason}
        if parts is not None:
            extra["parts"] = parts
        return SendResult(**_common(out), status="failed", mid=mids[-1] if mids else None, mids=mids or [],
                          code=code, subcode=subcode, message=message, retryable=retryable, attempts=attempts,
                          timestamp=_now_ms(), **extra)

    async def _emit(self, key: bytes, value: bytes, counted: str | None) -> None:
        await self._produce(self.opts.results_topic, value, key)
        if counted is not None:
            metrics.SEND_RESULTS.labels(counted).inc()

    async def dead_letter(self, rec: Any, reason: str, error: str) -> None:
        """One record to the dead-letter topic: reason, error, source and its original bytes (a prefix
        when it is too large for Kafka, with the size and SHA-256 of the whole in `error`)."""
        raw: bytes = rec.value if isinstance(rec.value, bytes) else b""
        if len(raw) > DEAD_LETTER_MAX_PAYLOAD:
            error = (f"{error} (payload truncated to {DEAD_LETTER_MAX_PAYLOAD} of {len(raw)} bytes, "
                     f"sha256 {hashlib.sha256(raw).hexdigest()})")
            raw = raw[:DEAD_LETTER_MAX_PAYLOAD]
        letter = dead_letter(raw, reason, error, Source(topic=rec.topic, partition=rec.partition, offset=rec.offset))
        log.warning("dead-lettered %s[%d]@%d: %s: %s", rec.topic, rec.partition, rec.offset, reason, error[:200])
        await self._produce(self.opts.dlq_topic, serde.dumps(letter), rec.key)
        metrics.DEAD_LETTERS.labels(reason).inc()

    async def _produce(self, topic: str, value: bytes, key: bytes | None) -> None:
        if self.producer is None:
            raise DispatchError("the producer is stopped")
        for attempt in range(1, 6):
            try:
                await asyncio.wait_for(self.producer.send_and_wait(topic, value, key=key), self.opts.kafka_timeout)
                return
            except (KafkaError, TimeoutError) as exc:
                if attempt == 5:
                    raise DispatchError(f"cannot write to {topic}: {type(exc).__name__}") from None
                await asyncio.sleep(0.5 * attempt)

    def _ledger(self) -> SentLedger:
        if self.ledger is None:
            raise DispatchError("the sent log is not started")
        return self.ledger


def _common(out: OutboundRequest) -> dict[str, Any]:
    # `endpoint` too: a profile read refused or expired before any Graph call still answers as a profile read
    return {"outbox_id": out.outbox_id, "page_id": out.page_id, "psid": out.psid,
            "conversation_id": out.conversation_id, "origin": out.origin, "endpoint": out.endpoint}


_COMMON = frozenset({"outbox_id", "page_id", "psid", "conversation_id", "origin", "endpoint"})


def _stored(result: SendResult) -> dict[str, Any]:
    """A SendResult as kept in the sent log: without what the outbound record repeats and without
    defaults (the log holds many), its message bounded."""
    data: dict[str, Any] = result.model_dump(mode="json", exclude=set(_COMMON), exclude_defaults=True)
    data["status"] = result.status
    if isinstance(data.get("message"), str):
        data["message"] = data["message"][:1000]
    return data


def _restored(out: OutboundRequest, stored: str) -> SendResult:
    """The SendResult of a stored outcome, for a redelivery of `out` (the same outbox id)."""
    fields = {k: v for k, v in orjson.loads(stored).items() if k not in _COMMON}
    return SendResult(**_common(out), **fields)


def _describe_invalid(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        errs = exc.errors()
        where = ".".join(str(p) for p in errs[0].get("loc", ())) if errs else ""
        msg = errs[0].get("msg", "invalid") if errs else "invalid"
        return f"not an outbound request: {where + ': ' if where else ''}{msg}"
    return f"not an outbound request: {exc}"


async def _wait(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep `seconds`, or less when `stop` is set first; True when stopped."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def _message_id(data: bytes) -> str | None:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        log.warning("Graph answered 200 with a body that is not JSON; counted as sent")
        return None
    mid = body.get("message_id") if isinstance(body, dict) else None
    return str(mid) if mid is not None else None


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- HTTP (/metrics, /healthz) ---------------------------------------------------------------------


async def start_web(host: str, port: int, ready: Callable[[], bool]) -> Any:
    """A small aiohttp server with /metrics and /healthz; returns its runner (cleanup() stops it)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    async def healthz(request: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"status": "ok" if ok else "starting"}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


# --- command line --------------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--graph-url", default=env("MESSENGER_STREAMS_GRAPH_URL", DEFAULT_GRAPH_URL),
                        help="Graph API base URL (env MESSENGER_STREAMS_GRAPH_URL; default %(default)s)")
    parser.add_argument("--api-version", default=env("MESSENGER_STREAMS_GRAPH_API_VERSION", DEFAULT_API_VERSION),
                        help="Graph API version (env MESSENGER_STREAMS_GRAPH_API_VERSION; default %(default)s)")
    parser.add_argument("--tokens-file", default=env("MESSENGER_STREAMS_PAGE_TOKENS_FILE"),
                        help="JSON object page_id → page access token (env MESSENGER_STREAMS_PAGE_TOKENS_FILE); "
                        "merged over env MESSENGER_STREAMS_PAGE_TOKENS")
    parser.add_argument("--group", default=None, help="consumer group (default <app_id>-dispatch)")
    parser.add_argument("--max-attempts", type=int, default=6, help="attempts per request part (default 6)")
    parser.add_argument("--backoff-base", type=float, default=0.5, help="first retry wait in seconds (default 0.5)")
    parser.add_argument("--backoff-max", type=float, default=30.0, help="longest retry wait (default 30)")
    parser.add_argument("--rate-per-page", type=float,
                        default=_env_float("MESSENGER_STREAMS_RATE_PER_PAGE", 300.0),
                        help="sends per second per page (env MESSENGER_STREAMS_RATE_PER_PAGE; default 300)")
    parser.add_argument("--request-timeout", type=float, default=10.0, help="Graph call timeout in s (default 10)")
    parser.add_argument("--max-in-flight", type=int, default=1000,
                        help="records taken from Kafka and not yet finished (default 1000)")
    parser.add_argument("--sent-log-days", type=float,
                        default=_env_float("MESSENGER_STREAMS_SENT_LOG_DAYS", SentLogBounds().max_age_ms / DAY_MS),
                        help="outbound records older than this are not sent; the sent log keeps ids one day "
                        "longer (env MESSENGER_STREAMS_SENT_LOG_DAYS; default 7)")
    parser.add_argument("--sent-log-per-conversation", type=int, default=SentLogBounds().per_conversation,
                        help="most recent outbox ids remembered per conversation (default %(default)s)")
    parser.add_argument("--sent-log-per-partition", type=int, default=SentLogBounds().per_partition,
                        help="most recent outbox ids remembered per partition (default %(default)s)")
    parser.add_argument("--web-port", type=int,
                        default=int(env("MESSENGER_STREAMS_DISPATCH_WEB_PORT") or DEFAULT_WEB_PORT),
                        help="port of /metrics and /healthz, 0 for none "
                        "(env MESSENGER_STREAMS_DISPATCH_WEB_PORT; default %(default)s)")


def load_tokens(env_value: str | None, path: str | None) -> dict[str, str]:
    """Page tokens from the env JSON and the file (the file wins); raises CliError, never showing a token."""
    tokens: dict[str, str] = {}
    sources: list[tuple[str, str]] = []
    if env_value:
        sources.append(("MESSENGER_STREAMS_PAGE_TOKENS", env_value))
    if path:
        try:
            sources.append((path, Path(path).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read tokens file {path}: {getattr(exc, 'strerror', None) or 'not UTF-8'}") from None
    for origin, text in sources:
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise CliError(f"{origin}: page tokens must be a JSON object page_id → token") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
            raise CliError(f"{origin}: page tokens must be a JSON object of non-empty strings page_id → token")
        tokens.update({str(k): v for k, v in data.items()})
    return tokens


def options_from_args(args: argparse.Namespace) -> DispatchOptions:
    """The options of the command line; raises CliError (one line). `tokens` may be empty: the page
    directory may hold every token (see `dispatch_credentials`)."""
    settings = load_settings()
    tokens = load_tokens(os.environ.get("MESSENGER_STREAMS_PAGE_TOKENS"), args.tokens_file)
    if args.max_attempts < 1 or args.backoff_base < 0 or args.backoff_max < 0:
        raise CliError("--max-attempts must be >= 1 and backoff times >= 0")
    if args.rate_per_page <= 0 or args.request_timeout <= 0 or args.max_in_flight < 1:
        raise CliError("--rate-per-page, --request-timeout and --max-in-flight must be > 0")
    if not args.sent_log_days > 0 or args.sent_log_per_conversation < 1 or args.sent_log_per_partition < 1:
        raise CliError("--sent-log-days, --sent-log-per-conversation and --sent-log-per-partition must be > 0")
    if not args.graph_url.startswith(("http://", "https://")):
        raise CliError(f"--graph-url must be an http(s) URL, got {args.graph_url!r}")
    return DispatchOptions(
        bootstrap_servers=settings.bootstrap_servers,
        outbound_topic=settings.topics.name("outbound"),
        results_topic=settings.topics.name("send_results"),
        sent_topic=settings.topics.name("dispatch_sent"),
        dlq_topic=settings.topics.name("dlq"),
        group_id=args.group or f"{settings.app_id}-dispatch",
        tokens=tokens,
        graph_url=args.graph_url,
        api_version=args.api_version,
        backoff=Backoff(base=args.backoff_base, cap=args.backoff_max, max_attempts=args.max_attempts),
        rate_per_page=args.rate_per_page,
        request_timeout=args.request_timeout,
        max_in_flight=args.max_in_flight,
        sent_log=SentLogBounds(
            max_age_ms=int(args.sent_log_days * DAY_MS),
            per_conversation=args.sent_log_per_conversation,
            per_partition=args.sent_log_per_partition,
        ),
        web_host=settings.web_host,
        web_port=args.web_port,
        partitions=settings.partitions,
        replication_factor=settings.replication_factor,
        personas=_personas_config(),
        personas_topic=settings.topics.name("personas"),
    )


def _personas_config() -> Personas:
    """`[personas]` of the connector config when one is set (MESSENGER_STREAMS_CONFIG), else off (#17)."""
    if not os.environ.get("MESSENGER_STREAMS_CONFIG"):
        return Personas()
    try:
        return load_config().personas
    except ConfigError as exc:
        raise CliError(str(exc)) from None


async def serve(
    opts: DispatchOptions,
    stop: asyncio.Event,
    on_ready: Callable[[], Awaitable[None]] | None = None,
    credentials: PageCredentials | None = None,
    dispatcher: Dispatcher | None = None,
) -> None:
    """Run a dispatcher (and its /metrics server) until `stop` is set. `credentials`: where page tokens
    come from (default: the static `opts.tokens`); `dispatcher`: run this one (a test can watch its state)."""
    d = dispatcher if dispatcher is not None else Dispatcher(opts, credentials)
    with quiet_kafka_startup():
        await ensure_topics(
            opts.bootstrap_servers,
            dict.fromkeys([opts.outbound_topic, opts.results_topic, opts.dlq_topic], False),
            opts.partitions,
            opts.replication_factor,
        )
        await ensure_sent_log_topic(opts.bootstrap_servers, opts.sent_topic, opts.outbound_topic, opts.sent_log,
                                    opts.replication_factor, opts.kafka_timeout)
        if opts.personas.enabled:  # #17: the personas created, per page (compacted)
            await ensure_topics(opts.bootstrap_servers, {opts.personas_topic: True}, 1, opts.replication_factor)
        await d.start()
    runner = None
    try:
        if opts.web_port:
            runner = await start_web(opts.web_host, opts.web_port, lambda: d.consumer is not None)
        log.info("dispatching %s → %s (%s)", opts.outbound_topic, opts.send_url, d.credentials.describe())
        if on_ready is not None:
            await on_ready()
        await d.run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        await d.stop()


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    settings = load_settings()
    configure_logging(settings.log_level)
    # the page directory (connector.pages) with the tokens file as fallback; ConfigError: one line
    credentials = dispatch_credentials(settings, opts.tokens)

    try:
        run_until_signalled(lambda stop: serve(opts, stop, credentials=credentials))
    except (ConnectionError, DispatchError) as exc:
        raise CliError(str(exc)) from None
    return 0

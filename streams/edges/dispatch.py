"""`messenger-streams dispatch`: the Send API dispatcher.

Consumes `messenger.outbound` (OutboundRequest JSON, key `<page_id>:<psid>`) in its own consumer
group, POSTs each request to `{graph_url}/{api_version}/me/messages?access_token=<page token>` and
writes one `SendResult` per request to `messenger.send.results` (same key).

- Order: one task per conversation key drains that key's records strictly in order (a retry blocks
  the later records of the same key); different keys proceed concurrently.
- At-least-once: manual commits; a partition's committed offset never passes a record that is not
  fully handled (sent or failed for good, and its SendResult acknowledged by Kafka).
- Meta's limits, error classification and backoff: `streams/sendapi.py`; per-page token bucket.
- Page access tokens: env MESSENGER_STREAMS_PAGE_TOKENS (JSON object page_id → token) and/or
  --tokens-file; never logged (every error text is redacted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from streams.core import metrics, serde
from streams.core.credentials import Credential, PageCredentials, StaticCredentials, dispatch_credentials
from streams.core.process import CliError, configure_logging, quiet_kafka_startup, run_until_signalled
from streams.core.settings import load_settings
from streams.core.topics import ensure_topics
from streams.rules.sendapi import Backoff, Limits, SendError, TokenBucket, classify_error, prepare_requests
from streams.rules.sendapi import transport_error as make_transport_error

log = logging.getLogger("messenger_streams.dispatch")

DEFAULT_GRAPH_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v21.0"
DEFAULT_WEB_PORT = 6067


class DispatchError(RuntimeError):
    """The dispatcher cannot go on (Kafka gone while writing a result): exit, records are redelivered."""


@dataclass(frozen=True)
class DispatchOptions:
    """Everything the dispatcher needs; built from the command line or directly by tests."""

    bootstrap_servers: str
    outbound_topic: str
    results_topic: str
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
    shutdown_timeout: float = 30.0
    web_host: str = "0.0.0.0"  # noqa: S104 - /metrics is meant to be scraped
    web_port: int = 0  # 0: no HTTP server
    partitions: int = 8
    replication_factor: int = 1
    credentials: PageCredentials | None = None  # #14: the page directory's; None: StaticCredentials(tokens)

    def __repr__(self) -> str:  # tokens never appear in reprs or logs
        return f"DispatchOptions(group_id={self.group_id!r}, pages={sorted(self.tokens)!r})"

    @property
    def send_url(self) -> str:
        return f"{self.graph_url.rstrip('/')}/{self.api_version.strip('/')}/me/messages"


@dataclass
class _Outcome:
    mid: str | None = None
    error: SendError | None = None
    attempts: int = 0


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


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.dispatcher.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("assigned %d partitions", len(assigned))


class Dispatcher:
    """The consume → send → result loop. `await run(stop)` until `stop` is set."""

    def __init__(self, opts: DispatchOptions) -> None:
        self.opts = opts
        self.tracker = OffsetTracker()
        self.queues: dict[str, deque[Any]] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.reauth: set[str] = set()
        self.slots = asyncio.Semaphore(opts.max_in_flight)
        self.fatal: BaseException | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.session: aiohttp.ClientSession | None = None
        self._secrets = list(opts.tokens.values())
        self.credentials: PageCredentials = opts.credentials or StaticCredentials(opts.tokens)  # #14
        self._commit_lock = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        o = self.opts
        await self.credentials.start()  # #14: follows connector.pages (a no-op for static tokens)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=o.bootstrap_servers, acks="all", enable_idempotence=True, linger_ms=2
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=o.bootstrap_servers,
            group_id=o.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=600_000,
            metadata_max_age_ms=5_000,
        )
        try:
            await asyncio.wait_for(self.producer.start(), timeout)
            await asyncio.wait_for(self.consumer.start(), timeout)
        except (TimeoutError, KafkaError, OSError) as exc:
            await self.stop()
            raise ConnectionError(f"cannot reach Kafka at {o.bootstrap_servers}: {type(exc).__name__}") from None
        self.consumer.subscribe([o.outbound_topic], listener=_Rebalance(self))
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=o.request_timeout))

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        for client in (self.consumer, self.producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self.consumer = self.producer = None
        await self.credentials.stop()  # #14

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then let in-flight records finish (shutdown_timeout), commit."""
        if self.consumer is None:
            raise RuntimeError("start() the dispatcher first")
        last_commit = time.monotonic()
        try:
            while not stop.is_set() and self.fatal is None:
                batch = await self.consumer.getmany(timeout_ms=200, max_records=500)
                for tp, records in batch.items():
                    for rec in records:
                        if not await self._slot(stop):
                            break  # stopping: records not handed out are not committed, so redelivered
                        self._enqueue(tp, rec)
                if time.monotonic() - last_commit >= 0.2 or not batch:
                    await self.commit()
                    last_commit = time.monotonic()
        finally:
            await self._drain(self.opts.shutdown_timeout)
            with contextlib.suppress(Exception):
                await self.commit()
        if self.fatal is not None:
            raise DispatchError(str(self.fatal)) from self.fatal

    async def _slot(self, stop: asyncio.Event) -> bool:
        """One of `max_in_flight` slots; False when stopping (or a fatal error) while waiting for one."""
        while True:
            try:
                await asyncio.wait_for(self.slots.acquire(), 0.5)
                return True
            except TimeoutError:
                if stop.is_set() or self.fatal is not None:
                    return False

    async def _drain(self, timeout: float) -> None:
        tasks = list(self.tasks.values())
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=timeout)
            for t in still:
                t.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)

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

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let the revoked partitions' in-flight records finish (bounded), commit them, forget them."""
        deadline = time.monotonic() + self.opts.shutdown_timeout
        while self.tracker.pending_in(revoked) and time.monotonic() < deadline and self.fatal is None:
            await asyncio.sleep(0.05)
        await self.commit(revoked)
        left = self.tracker.pending_in(revoked)
        if left:
            log.warning("%d in-flight records of revoked partitions will be redelivered", left)
        self.tracker.forget(revoked)

    # --- per conversation ------------------------------------------------------------------------

    def _enqueue(self, tp: TopicPartition, rec: Any) -> None:
        self.tracker.add(tp, rec.offset)
        key = rec.key.decode("utf-8", "replace") if rec.key is not None else f"<null>:{tp.partition}"
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = deque()
        q.append((tp, rec))
        if key not in self.tasks:
            self.tasks[key] = asyncio.create_task(self._conversation(key), name=f"dispatch:{key}")

    async def _conversation(self, key: str) -> None:
        q = self.queues[key]
        try:
            while q:
                tp, rec = q[0]
                try:
                    await self.handle(rec)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - stop everything, do not commit this record
                    self.fatal = exc
                    log.error("cannot finish a record of %s: %s", key,
                              self.credentials.redact(f"{type(exc).__name__}: {exc}"))
                    return
                q.popleft()
                self.tracker.done(tp, rec.offset)
                self.slots.release()
        finally:
            if not q or self.fatal is not None:
                self.tasks.pop(key, None)
                if not q:
                    self.queues.pop(key, None)

    async def handle(self, rec: Any) -> None:
        """Send one outbound record (all its parts) and write its SendResult."""
        try:
            out = OutboundRequest.model_validate_json(rec.value)
        except ValidationError as exc:
            metrics.SEND_RESULTS.labels("invalid").inc()
            log.warning("skipping an invalid outbound record at %s[%d]@%d: %s", rec.topic, rec.partition,
                        rec.offset, exc.errors()[0].get("msg") if exc.errors() else "invalid")
            return
        key = rec.key if rec.key is not None else f"{out.page_id}:{out.psid}".encode()
        result = await self.send(out)
        if self.producer is None:
            raise DispatchError("the results producer is stopped")
        for attempt in range(1, 6):
            try:
                await asyncio.wait_for(
                    self.producer.send_and_wait(self.opts.results_topic, serde.dumps(result), key=key), 30
                )
                break
            except (KafkaError, TimeoutError) as exc:
                if attempt == 5:
                    raise DispatchError(f"cannot write the send result: {type(exc).__name__}") from None
                await asyncio.sleep(0.5 * attempt)
        metrics.SEND_RESULTS.labels(result.status).inc()
        self.credentials.note_result(out.page_id, result.status)  # #14: `pages list` shows the last send

    async def send(self, out: OutboundRequest) -> SendResult:
        """Send every part of one request in order; the SendResult of the whole."""
        common: dict[str, Any] = {
            "outbox_id": out.outbox_id,
            "page_id": out.page_id,
            "psid": out.psid,
            "conversation_id": out.conversation_id,
            "origin": out.origin,
        }
        token = self.credentials.lookup(out.page_id)  # #14: token + appsecret_proof, or why not
        if not isinstance(token, Credential):
            log.warning("outbox %s not sent: %s", out.outbox_id, token.message)
            return SendResult(**common, status="failed", code=token.code, message=token.message, retryable=False,
                              attempts=0, reason=token.reason, timestamp=_now_ms())
        parts, warnings = prepare_requests(out.request, self.opts.limits)
        for w in warnings:
            log.warning("outbox %s: %s", out.outbox_id, w)
        mids: list[str] = []
        last = _Outcome()
        for body in parts:
            last = await self.send_one(out.page_id, token, body)
            if last.error is not None:
                e = last.error
                return SendResult(**common, status="failed", mid=mids[-1] if mids else None, mids=mids, code=e.code,
                                  subcode=e.subcode, message=self.credentials.redact(e.message), retryable=e.retryable,
                                  attempts=last.attempts, reason=e.reason, parts=len(parts), timestamp=_now_ms())
            if last.mid:
                mids.append(last.mid)
        return SendResult(**common, status="sent", mid=last.mid, mids=mids, attempts=last.attempts,
                          parts=len(parts), timestamp=_now_ms())

    async def send_one(self, page_id: str, token: Credential, body: dict[str, Any]) -> _Outcome:
        """POST one body with retries on retryable errors; throttled per page."""
        if self.session is None:
            raise DispatchError("the HTTP session is closed")
        backoff = self.opts.backoff
        err: SendError | None = None
        for attempt in range(1, backoff.max_attempts + 1):
            await self._throttle(page_id)
            try:
                async with self.session.post(self.opts.send_url, params=token.params(), json=body) as resp:
                    data = await resp.read()
                    if resp.status == 200:
                        return _Outcome(mid=_message_id(data), attempts=attempt)
                    err = classify_error(resp.status, data)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                err = make_transport_error(exc)
            if err.reauth:
                self.mark_reauth(page_id)
                self.credentials.token_rejected(token, err.code or 190, err.subcode, err.message)  # #14
            if not err.retryable or attempt >= backoff.max_attempts:
                return _Outcome(error=err, attempts=attempt)
            delay = backoff.delay(attempt)
            metrics.SEND_RESULTS.labels("retried").inc()
            log.info("page %s: %s (code %s), retry %d in %.2fs", page_id, err.reason, err.code, attempt, delay)
            if err.reason == "rate_limited":
                self._bucket(page_id).pause_until(time.monotonic() + delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def mark_reauth(self, page_id: str) -> None:
        if page_id not in self.reauth:
            log.error("page %s: Meta rejected its access token (error 190): re-authorize the page", page_id)
        self.reauth.add(page_id)
        metrics.PAGES_NEED_REAUTH.labels(page_id).set(1)

    def _bucket(self, page_id: str) -> TokenBucket:
        b = self.buckets.get(page_id)
        if b is None:
            b = self.buckets[page_id] = TokenBucket(self.opts.rate_per_page, self.opts.burst, time.monotonic())
        return b

    async def _throttle(self, page_id: str) -> None:
        wait = self._bucket(page_id).reserve(time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)


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
    settings = load_settings()
    tokens = load_tokens(os.environ.get("MESSENGER_STREAMS_PAGE_TOKENS"), args.tokens_file)
    credentials = dispatch_credentials(settings, tokens)  # #14: the page directory, tokens file as fallback
    if args.max_attempts < 1 or args.backoff_base < 0 or args.backoff_max < 0:
        raise CliError("--max-attempts must be >= 1 and backoff times >= 0")
    if args.rate_per_page <= 0 or args.request_timeout <= 0 or args.max_in_flight < 1:
        raise CliError("--rate-per-page, --request-timeout and --max-in-flight must be > 0")
    if not args.graph_url.startswith(("http://", "https://")):
        raise CliError(f"--graph-url must be an http(s) URL, got {args.graph_url!r}")
    return DispatchOptions(
        bootstrap_servers=settings.bootstrap_servers,
        outbound_topic=settings.topics.name("outbound"),
        results_topic=settings.topics.name("send_results"),
        group_id=args.group or f"{settings.app_id}-dispatch",
        tokens=tokens,
        graph_url=args.graph_url,
        api_version=args.api_version,
        backoff=Backoff(base=args.backoff_base, cap=args.backoff_max, max_attempts=args.max_attempts),
        rate_per_page=args.rate_per_page,
        request_timeout=args.request_timeout,
        max_in_flight=args.max_in_flight,
        web_host=settings.web_host,
        web_port=args.web_port,
        partitions=settings.partitions,
        replication_factor=settings.replication_factor,
        credentials=credentials,
    )


async def serve(
    opts: DispatchOptions, stop: asyncio.Event, on_ready: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Run a dispatcher (and its /metrics server) until `stop` is set."""
    d = Dispatcher(opts)
    with quiet_kafka_startup():
        await ensure_topics(
            opts.bootstrap_servers,
            dict.fromkeys([opts.outbound_topic, opts.results_topic], False),
            opts.partitions,
            opts.replication_factor,
        )
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
    configure_logging(load_settings().log_level)

    try:
        run_until_signalled(lambda stop: serve(opts, stop))
    except (ConnectionError, DispatchError) as exc:
        raise CliError(str(exc)) from None
    return 0

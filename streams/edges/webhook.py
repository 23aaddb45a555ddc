"""`messenger-streams webhook`: Meta's webhook endpoint, writing verified bodies to Kafka.

- `GET /webhook`: the verification handshake (`hub.mode=subscribe`, `hub.verify_token`, echo
  `hub.challenge` as text/plain); a wrong or unset token → 403.
- `POST /webhook`: checks `X-Hub-Signature-256` (HMAC-SHA256 of the raw body with the App Secret) and
  writes the exact body bytes to the raw topic with headers `x-hub-signature-256` and `received-at`
  (epoch ms). 200 only once Kafka acknowledged the write (acks=all); Kafka down or slow → 503 so Meta
  retries; bad or missing signature → 403; body over the limit → 413. Nothing is written unless 200.
- `GET /healthz`, `GET /metrics`.

Secrets (App Secret, verify token) are never logged; the access log has no query strings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from streams.core import metrics
from streams.core.process import CliError, configure_logging, quiet_kafka_startup, run_until_signalled
from streams.core.settings import load_settings
from streams.core.topics import ensure_topics
from streams.rules.normalize import conversation_key_of

log = logging.getLogger("messenger_streams.webhook")

SIGNATURE_HEADER = "X-Hub-Signature-256"
DEFAULT_PORT = 8080


def sign(body: bytes, secret: bytes) -> str:
    """The `X-Hub-Signature-256` value Meta sends for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def body_key(body: bytes, max_bytes: int) -> bytes | None:
    """The raw record's key: the body's conversation key when it holds one conversation, else None.
    A body the rules cannot read goes unkeyed (the splitter dead-letters it with its reason)."""
    try:
        key = conversation_key_of(body, max_bytes)
    except Exception:  # noqa: BLE001 - the key is an optimisation; the body is accepted whatever it holds
        log.debug("cannot key a webhook body", exc_info=True)
        return None
    return key.encode() if key is not None else None


def verify_signature(body: bytes, header: str | None, secret: bytes) -> bool:
    """Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of the exact `body` bytes under `secret`."""
    if not header or not secret:
        return False
    scheme, _, given = header.strip().partition("=")
    if scheme.lower() != "sha256" or not given:
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode("ascii")
    return hmac.compare_digest(expected, given.strip().lower().encode("utf-8", "replace"))


class _Producer(Protocol):
    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = ..., headers: Any = ...) -> Any: ...


@dataclass(frozen=True)
class WebhookOptions:
    bootstrap_servers: str
    raw_topic: str
    app_secret: bytes
    verify_token: str | None = None
    path: str = "/webhook"
    host: str = "0.0.0.0"  # noqa: S104 - Meta must reach it
    port: int = DEFAULT_PORT
    max_body_bytes: int = 1_048_576
    kafka_timeout: float = 5.0
    partitions: int = 8
    replication_factor: int = 1

    def __repr__(self) -> str:  # secrets never appear in reprs or logs
        return f"WebhookOptions(raw_topic={self.raw_topic!r}, port={self.port})"


class _AccessLogger(AbstractAccessLogger):
    """Method, path without the query string (it holds hub.verify_token), status, time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %.1fms", request.method, request.path, response.status, time * 1000)


def create_app(opts: WebhookOptions, producer: _Producer, ready: Callable[[], bool] = lambda: True) -> web.Application:
    """The aiohttp application; `producer` is an started AIOKafkaProducer (or a stand-in in tests)."""

    async def verify(request: web.Request) -> web.Response:
        q = request.query
        token = q.get("hub.verify_token", "")
        ok = (
            q.get("hub.mode") == "subscribe"
            and opts.verify_token is not None
            and hmac.compare_digest(token.encode("utf-8", "replace"), opts.verify_token.encode("utf-8"))
        )
        if not ok:
            log.warning("webhook verification refused (mode %r)", q.get("hub.mode"))
            return web.Response(status=403, text="forbidden")
        return web.Response(status=200, text=q.get("hub.challenge", ""), content_type="text/plain")

    async def receive(request: web.Request) -> web.Response:
        received_at = int(time.time() * 1000)
        if request.content_length is not None and request.content_length > opts.max_body_bytes:
            metrics.WEBHOOK_REQUESTS.labels("too_large").inc()
            return web.Response(status=413, text="body too large")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            metrics.WEBHOOK_REQUESTS.labels("too_large").inc()
            return web.Response(status=413, text="body too large")
        if len(body) > opts.max_body_bytes:  # belt and braces: client_max_size already enforces it
            metrics.WEBHOOK_REQUESTS.labels("too_large").inc()
            return web.Response(status=413, text="body too large")
        header = request.headers.get(SIGNATURE_HEADER)
        if header is None:
            metrics.WEBHOOK_REQUESTS.labels("missing_signature").inc()
            log.warning("webhook POST without %s refused", SIGNATURE_HEADER)
            return web.Response(status=403, text="missing signature")
        if not verify_signature(body, header, opts.app_secret):
            metrics.WEBHOOK_REQUESTS.labels("bad_signature").inc()
            log.warning("webhook POST with a wrong signature refused (%d bytes)", len(body))
            return web.Response(status=403, text="bad signature")
        headers = [("x-hub-signature-256", header.encode("ascii", "replace")),
                   ("received-at", str(received_at).encode("ascii"))]
        # keyed by its conversation when it holds one: it lands on that conversation's partition and is
        # decided there in place (one hop, docs/architecture.md); other bodies go unkeyed and are split
        key = body_key(body, opts.max_body_bytes)
        try:
            await asyncio.wait_for(producer.send_and_wait(opts.raw_topic, body, key=key, headers=headers),
                                   opts.kafka_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any Kafka failure: Meta must retry
            metrics.WEBHOOK_REQUESTS.labels("kafka_error").inc()
            log.error("cannot write a webhook body to Kafka (%s): answering 503", type(exc).__name__)
            return web.Response(status=503, text="try again later")
        metrics.WEBHOOK_REQUESTS.labels("accepted").inc()
        return web.Response(status=200, text="EVENT_RECEIVED")

    async def healthz(request: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"status": "ok" if ok else "starting"}, status=200 if ok else 503)

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    # client_max_size: aiohttp refuses to read more than the limit (also for chunked bodies)
    app = web.Application(client_max_size=opts.max_body_bytes)
    app.router.add_get(opts.path, verify)
    app.router.add_post(opts.path, receive)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    return app



async def serve(opts: WebhookOptions, stop: asyncio.Event,
                on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run the endpoint until `stop` is set; in-flight requests finish before the producer stops."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    with quiet_kafka_startup():
        await ensure_topics(opts.bootstrap_servers, {opts.raw_topic: False}, opts.partitions, opts.replication_factor)
    producer = AIOKafkaProducer(
        bootstrap_servers=opts.bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=1,
        max_request_size=max(1_048_576, opts.max_body_bytes + 65_536),
        request_timeout_ms=max(1000, int(opts.kafka_timeout * 1000)),
    )
    try:
        with quiet_kafka_startup():
            await asyncio.wait_for(producer.start(), 30)
    except (TimeoutError, KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise ConnectionError(f"cannot reach Kafka at {opts.bootstrap_servers}: {type(exc).__name__}") from None
    runner = web.AppRunner(create_app(opts, producer), access_log_class=_AccessLogger, shutdown_timeout=10.0)
    try:
        await runner.setup()
        await web.TCPSite(runner, opts.host, opts.port).start()
        log.info("webhook on %s:%d%s → %s", opts.host, opts.port, opts.path, opts.raw_topic)
        if on_ready is not None:
            await on_ready()
        await stop.wait()
    finally:
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await producer.stop()


# --- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--host", default=env("MESSENGER_STREAMS_WEBHOOK_HOST", "0.0.0.0"),  # noqa: S104
                        help="listen address (env MESSENGER_STREAMS_WEBHOOK_HOST; default %(default)s)")
    parser.add_argument("--port", type=int, default=int(env("MESSENGER_STREAMS_WEBHOOK_PORT") or DEFAULT_PORT),
                        help="listen port (env MESSENGER_STREAMS_WEBHOOK_PORT; default %(default)s)")
    parser.add_argument("--path", default="/webhook", help="webhook path (default %(default)s)")
    parser.add_argument("--verify-token", default=None,
                        help="token of Meta's verification handshake (default: env MESSENGER_STREAMS_VERIFY_TOKEN)")
    parser.add_argument("--app-secret-file", default=env("MESSENGER_STREAMS_APP_SECRET_FILE"),
                        help="file holding the App Secret (default: env MESSENGER_STREAMS_APP_SECRET, or the file "
                        "in env MESSENGER_STREAMS_APP_SECRET_FILE)")
    parser.add_argument("--max-body-bytes", type=int, default=None,
                        help="bigger bodies get 413 (default: MESSENGER_STREAMS_MAX_BODY_BYTES, 1 MiB)")
    parser.add_argument("--kafka-timeout", type=float, default=5.0,
                        help="seconds to wait for Kafka's acknowledgement before answering 503 (default 5)")


def options_from_args(args: argparse.Namespace) -> WebhookOptions:
    settings = load_settings()
    secret: str | None = None
    if args.app_secret_file:
        try:
            secret = Path(args.app_secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read the app secret file {args.app_secret_file}: "
                           f"{getattr(exc, 'strerror', None) or 'not UTF-8'}") from None
    else:
        secret = (os.environ.get("MESSENGER_STREAMS_APP_SECRET") or "").strip() or None
    if not secret:
        raise CliError("no app secret: set MESSENGER_STREAMS_APP_SECRET or --app-secret-file")
    verify_token = args.verify_token or os.environ.get("MESSENGER_STREAMS_VERIFY_TOKEN") or None
    max_body = args.max_body_bytes if args.max_body_bytes is not None else settings.max_body_bytes
    if max_body <= 0:
        raise CliError("--max-body-bytes must be > 0")
    if not 0 <= args.port <= 65535:
        raise CliError("--port must be 0..65535")
    if args.kafka_timeout <= 0:
        raise CliError("--kafka-timeout must be > 0")
    if not args.path.startswith("/"):
        raise CliError("--path must start with /")
    return WebhookOptions(
        bootstrap_servers=settings.bootstrap_servers,
        raw_topic=settings.topics.name("raw"),
        app_secret=secret.encode("utf-8"),
        verify_token=verify_token,
        path=args.path,
        host=args.host,
        port=args.port,
        max_body_bytes=max_body,
        kafka_timeout=args.kafka_timeout,
        partitions=settings.partitions,
        replication_factor=settings.replication_factor,
    )


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    configure_logging(load_settings().log_level)
    if opts.verify_token is None:
        log.warning("no verify token (MESSENGER_STREAMS_VERIFY_TOKEN): every verification handshake gets 403")

    try:
        run_until_signalled(lambda stop: serve(opts, stop))
    except ConnectionError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # e.g. the port is taken
        raise CliError(f"cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}") from None
    return 0

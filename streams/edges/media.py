"""`messenger-streams media`: keep inbound attachments before Meta's CDN URLs expire.

A small separate process (it talks to the outside world, so it is an edge, and a slow download
never holds up a conversation). It follows every skill topic (`skill.*`, by pattern, so skills
added later are followed too) in its own consumer group, and for each `consumer_message` with
attachments it downloads each kept attachment (`[media]` settings: attachment types, allowed hosts,
content types, size limit, timeout, concurrency), stores it under `media.store` by content hash
(`streams.rules.media`), and writes a `media_stored` console event to the same skill topic with the
same key, so the console that showed the message gets the stored location.

- Never blocking, never fatal for a file: a refused or failed download is counted
  (`messenger_media_failures{reason}`) and logged; the event's other attachments are still kept.
- At-least-once: a batch's offsets are committed after its `media_stored` events are acknowledged;
  a redelivered event is downloaded again and gives the same file (same hash) and the same event id.
- Bounded: `concurrency` downloads at a time, each at most `max_bytes` (streamed to a temporary file,
  never held in memory), `timeout_seconds` each; no redirects (a redirect could leave the allowed hosts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from streams.core import metrics
from streams.core.config import load_config
from streams.core.config_rich import Media
from streams.core.process import CliError, configure_logging, quiet_kafka_startup, run_until_signalled
from streams.core.settings import load_settings
from streams.edges.dispatch import start_web
from streams.rules.media import Stored, Wanted, content_type_allowed, media_stored_event, stored_key, wanted

log = logging.getLogger("messenger_streams.media")

DEFAULT_WEB_PORT = 6069  # 6066 worker, 6067 dispatch, 6068 admin page
CHUNK = 65_536


@dataclass(frozen=True)
class MediaOptions:
    """What the media keeper needs; built from the command line or directly by tests."""

    bootstrap_servers: str
    skill_topic_prefix: str
    group_id: str
    media: Media
    web_host: str = "127.0.0.1"
    web_port: int = 0  # 0: no HTTP server

    @property
    def store(self) -> Path:
        if self.media.store is None:
            raise CliError("media keeping is off: set `store` in the [media] section of the config")
        return Path(self.media.store)


class MediaKeeper:
    """Consume skill topics, keep attachments, write `media_stored`. `await run(stop)` until `stop`."""

    def __init__(self, opts: MediaOptions) -> None:
        self.opts = opts
        self.cfg = opts.media
        self.store = opts.store
        self.slots = asyncio.Semaphore(self.cfg.concurrency)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self, timeout: float = 30.0) -> None:
        self._check_store()
        o = self.opts
        self.producer = AIOKafkaProducer(bootstrap_servers=o.bootstrap_servers, acks="all", linger_ms=5)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=o.bootstrap_servers,
            group_id=o.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=5_000,  # new skill topics are followed within seconds
            max_poll_interval_ms=600_000,
        )
        try:
            await asyncio.wait_for(self.producer.start(), timeout)
            await asyncio.wait_for(self.consumer.start(), timeout)
        except (TimeoutError, KafkaError, OSError) as exc:
            await self.stop()
            raise ConnectionError(f"cannot reach Kafka at {o.bootstrap_servers}: {type(exc).__name__}") from None
        self.consumer.subscribe(pattern=f"^{re.escape(o.skill_topic_prefix)}.+")
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_seconds))

    def _check_store(self) -> None:
        probe = self.store / ".tmp" / f"probe-{uuid.uuid4().hex}"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CliError(f"media store {self.store} is not a writable directory: {exc.strerror}") from None

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        for client in (self.consumer, self.producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self.consumer = self.producer = None

    async def run(self, stop: asyncio.Event) -> None:
        """Batches until `stop`: keep the batch's attachments, write the events, then commit."""
        if self.consumer is None:
            raise RuntimeError("start() the media keeper first")
        while not stop.is_set():
            batch = await self.consumer.getmany(timeout_ms=300, max_records=200)
            records = [r for recs in batch.values() for r in recs]
            if not records:
                continue
            await self.handle(records)
            await self.consumer.commit()

    async def handle(self, records: list[Any]) -> None:
        """Keep every wanted attachment of these records (concurrently) and write their events."""
        jobs: list[tuple[Any, dict[str, Any], Wanted]] = []
        for rec in records:
            try:
                event = orjson.loads(rec.value) if rec.value is not None else None
            except orjson.JSONDecodeError:
                continue  # not ours to judge: consoles see the same record
            if not isinstance(event, dict):
                continue
            items, refused = wanted(event, self.cfg)
            for reason in refused:
                metrics.MEDIA_FAILURES.labels(reason).inc()
                log.warning("not kept (%s): an attachment of %s", reason, event.get("event_id"))
            jobs.extend((rec, event, item) for item in items)
        if not jobs:
            return
        outcomes = await asyncio.gather(*(self.keep(item) for _, _, item in jobs))
        if self.producer is None:
            raise RuntimeError("the producer is stopped")
        sends = []
        for (rec, event, item), outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, str):
                metrics.MEDIA_FAILURES.labels(outcome).inc()
                log.warning("not kept (%s): attachment %d of %s", outcome, item.index, event.get("event_id"))
                continue
            value = media_stored_event(event, item, outcome, str(self.store))
            sends.append(await self.producer.send(rec.topic, orjson.dumps(value), key=rec.key))
        for fut in sends:
            await fut  # a failed write raises: the batch is not committed, the process exits

    async def keep(self, item: Wanted) -> Stored | str:
        """Download and store one attachment; a Stored, or the failure reason."""
        async with self.slots:
            try:
                return await self._download(item.url)
            except TimeoutError:
                return "timeout"
            except aiohttp.ClientError:  # before OSError: connection errors are OSErrors too
                return "connection_error"
            except OSError as exc:
                log.error("cannot write to the media store %s: %s", self.store, exc.strerror)
                return "write_error"

    async def _download(self, url: str) -> Stored | str:
        if self.session is None:
            raise RuntimeError("the HTTP session is closed")
        limit = self.cfg.max_bytes
        async with self.session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                return "http_error"
            content_type = resp.headers.get("Content-Type", "")
            if not content_type_allowed(content_type, self.cfg.content_types):
                return "type_not_allowed"
            if resp.content_length is not None and resp.content_length > limit:
                return "too_large"
            tmp = self.store / ".tmp" / uuid.uuid4().hex
            digest = hashlib.sha256()
            size = 0
            try:
                with open(tmp, "wb") as f:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        if size > limit:
                            return "too_large"
                        digest.update(chunk)
                        f.write(chunk)
                mime = content_type.split(";")[0].strip().lower()
                key = stored_key(digest.hexdigest(), mime)
                final = self.store / key
                if not final.exists():  # else: the same content is kept already
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, final)
                    metrics.MEDIA_STORED_BYTES.inc(size)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        metrics.MEDIA_STORED.inc()
        return Stored(digest.hexdigest(), size, mime, key)


# --- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--store", default=None, help="directory of the kept files (default: [media] store)")
    parser.add_argument("--group", default=None, help="consumer group (default <app_id>-media)")
    parser.add_argument("--web-port", type=int,
                        default=int(env("MESSENGER_STREAMS_MEDIA_WEB_PORT") or DEFAULT_WEB_PORT),
                        help="port of /metrics and /healthz, 0 for none "
                        "(env MESSENGER_STREAMS_MEDIA_WEB_PORT; default %(default)s)")


def options_from_args(args: argparse.Namespace) -> MediaOptions:
    settings = load_settings()
    config = load_config()
    store = args.store or config.media.store
    if not store:
        raise CliError("media keeping is off: set `store` in the [media] section of the config (or --store)")
    if not 0 <= args.web_port <= 65535:
        raise CliError("--web-port must be 0..65535")
    return MediaOptions(
        bootstrap_servers=settings.bootstrap_servers,
        skill_topic_prefix=settings.topics.skill(""),
        group_id=args.group or f"{settings.app_id}-media",
        media=config.media.model_copy(update={"store": store}),
        web_host=settings.web_host,
        web_port=args.web_port,
    )


async def serve(opts: MediaOptions, stop: asyncio.Event,
                on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run a media keeper (and its /metrics server) until `stop` is set."""
    keeper = MediaKeeper(opts)
    with quiet_kafka_startup():
        await keeper.start()
    runner = None
    try:
        if opts.web_port:
            runner = await start_web(opts.web_host, opts.web_port, lambda: keeper.consumer is not None)
        log.info("keeping media of %s* in %s", opts.skill_topic_prefix, opts.store)
        if on_ready is not None:
            await on_ready()
        await keeper.run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        await keeper.stop()


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    configure_logging(load_settings().log_level)
    try:
        run_until_signalled(lambda stop: serve(opts, stop))
    except ConnectionError as exc:
        raise CliError(str(exc)) from None
    return 0

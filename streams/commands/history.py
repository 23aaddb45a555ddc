"""`messenger-streams history`: the history sink, exports for analysts, and erasing a person.

    messenger-streams history sink                      # Kafka → PostgreSQL, until SIGTERM
    messenger-streams history export --from 2026-01-01 --to 2026-02-01 --skill billing --format csv
    messenger-streams history export --from 2026-01-01 --to 2026-02-01 --messages --format jsonl -o out.jsonl
    messenger-streams history forget --page 1691462197845448 --psid 24523425234
    messenger-streams history migrate                   # apply pending schema migrations and exit
    messenger-streams history retain [--days 30]        # delete old conversations once and exit

The store is `MESSENGER_STREAMS_HISTORY_DSN`: a PostgreSQL URI, or `embedded` for the local
pgserver of `make run`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import IO, Any, Literal, TypeVar

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streams.core.config import load_config
from streams.core.process import CliError, configure_logging, quiet_kafka_startup, run_until_signalled
from streams.core.settings import Settings, load_settings
from streams.core.topics import ensure_contract_topics
from streams.edges import history as sink
from streams.history.embedded import EmbeddedError, resolve_dsn
from streams.history.forget import forget_person
from streams.history.store import CONVERSATION_FIELDS, MESSAGE_FIELDS, TIME_FIELDS, HistoryStore
from streams.rules.history import BadParam, Search, parse_time

T = TypeVar("T")
PROGRESS_SECONDS = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="history_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("sink", help="write skill topics, conversations.history and csat.responses to PostgreSQL")
    p.add_argument("--group", default=None, help="consumer group (default <app_id>-history)")

    p = sub.add_parser("export", help="write conversations (or their messages) as CSV or JSON lines")
    p.add_argument("--from", dest="from_", required=True, help="start (epoch ms, or ISO 8601 date / date-time)")
    p.add_argument("--to", required=True, help="end, exclusive (epoch ms, or ISO 8601 date / date-time)")
    p.add_argument("--skill", action="append", default=[], help="only conversations of this skill (repeatable)")
    p.add_argument("--page", default=None, help="only conversations of this page id")
    p.add_argument("--agent", default=None, help="only conversations this agent took part in")
    p.add_argument("--format", choices=("csv", "jsonl"), default="jsonl", help="output format (default jsonl)")
    p.add_argument("--messages", action="store_true", help="one row per message instead of per conversation")
    p.add_argument("-o", "--output", default="-", help="output file (default stdout)")

    p = sub.add_parser("forget", help="erase one person's transcripts and conversation state")
    p.add_argument("--page", required=True, help="page id")
    p.add_argument("--psid", required=True, help="the person's page-scoped id")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    sub.add_parser("migrate", help="apply pending schema migrations and print the schema version")

    p = sub.add_parser("retain", help="delete conversations idle longer than the retention, once")
    p.add_argument("--days", type=int, default=None, help="retention in days (default: history.retain_days)")


def _dsn(settings: Settings) -> str:
    if settings.history_dsn is None or not settings.history_dsn.get_secret_value().strip():
        raise CliError("no history store: set MESSENGER_STREAMS_HISTORY_DSN to a PostgreSQL URI "
                       "(or 'embedded' for the local PostgreSQL of make run)")
    try:
        return resolve_dsn(settings.history_dsn.get_secret_value().strip(), settings.datadir)
    except EmbeddedError as exc:
        raise CliError(str(exc)) from None


def _run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    try:
        return asyncio.run(main())
    except ConnectionError as exc:  # StoreError, unreachable Kafka
        raise CliError(str(exc)) from None


async def _with_store(dsn: str, use: Callable[[HistoryStore], Awaitable[T]]) -> T:
    store = HistoryStore(dsn, max_size=2)
    await store.open()
    try:
        return await use(store)
    finally:
        await store.close()


# export ---------------------------------------------------------------------------------------------


def _iso(ms: Any) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _csv_cell(name: str, value: Any) -> Any:
    if name in TIME_FIELDS:
        return _iso(value)
    if isinstance(value, list | dict):
        return orjson.dumps(value).decode("utf-8")
    return "" if value is None else value


class Progress:
    """'exported N/total rows (rate)' on stderr, at most once a second, and once at the end."""

    def __init__(self, what: str, total: int | None, out: IO[str]) -> None:
        self.what = what
        self.total = total
        self.out = out
        self.start = time.monotonic()
        self.last = self.start
        self.rows = 0

    def tick(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = self.rows / max(now - self.start, 1e-6)
        of = f"/{self.total}" if self.total is not None else ""
        state = "done:" if final else "export:"
        print(f"{state} {self.rows}{of} {self.what} ({rate:.0f}/s)", file=self.out, flush=True)


async def export(store: HistoryStore, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    try:
        search = Search(from_ms=parse_time(args.from_, "--from"), to_ms=parse_time(args.to, "--to"),
                        page=args.page, agent=args.agent)
    except BadParam as exc:
        raise CliError(str(exc)) from None
    if search.to_ms is not None and search.from_ms is not None and search.to_ms <= search.from_ms:
        raise CliError("--to: must be after --from")
    what: Literal["conversations", "messages"] = "messages" if args.messages else "conversations"
    total = await store.count(search, args.skill) if what == "conversations" else None
    fields: tuple[str, ...] = (*CONVERSATION_FIELDS, "ts_config")
    if what == "messages":
        fields = ("conversation_id", *[f for f in MESSAGE_FIELDS if f != "conversation_id"], "page_id", "psid")
    progress = Progress(what, total, err)
    writer = csv.writer(out) if args.format == "csv" else None
    if writer is not None:
        writer.writerow(fields)
    rows: AsyncIterator[dict[str, Any]] = store.export(search, what, args.skill)
    async for row in rows:
        if writer is not None:
            writer.writerow([_csv_cell(f, row.get(f)) for f in fields])
        else:
            out.write(orjson.dumps({f: row.get(f) for f in fields}).decode("utf-8") + "\n")
        progress.rows += 1
        progress.tick()
    out.flush()
    progress.tick(final=True)
    return 0


# forget ---------------------------------------------------------------------------------------------


async def forget(store: HistoryStore, settings: Settings, page_id: str, psid: str) -> dict[str, Any]:
    await ensure_contract_topics(settings, "actions")  # the broker creates no topic on its own
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    try:
        with quiet_kafka_startup():
            await asyncio.wait_for(producer.start(), 30)
    except (TimeoutError, KafkaError, OSError) as exc:
        await producer.stop()
        raise ConnectionError(f"cannot reach Kafka at {settings.bootstrap_servers}: {type(exc).__name__}") from None
    topic = settings.topics.name("actions")

    async def send(key: bytes, value: bytes) -> None:
        await producer.send_and_wait(topic, value, key=key)

    try:
        return await forget_person(store, send, page_id, psid)
    finally:
        await producer.stop()


def describe_forget(report: dict[str, Any], actions_topic: str) -> str:
    """What `forget` erased, for people."""
    erased = report["erased"]
    ids = ", ".join(erased["conversation_ids"]) or "none"
    return (
        f"erased from the history store: {erased['conversations']} conversations ({ids}), "
        f"{erased['messages']} messages, {erased['events']} events, {erased['csat_responses']} CSAT answers\n"
        f"wrote forget action {report['forget_action_id']} to {actions_topic}: the processor erases this "
        f"person's conversation state; records about them up to now are not stored again"
    )


# entry ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    command = args.history_command
    if command == "sink":
        config = load_config()
        configure_logging(settings.log_level)
        dsn = _dsn(settings)
        if args.group:
            settings = settings.model_copy(update={"history_group": args.group})
        try:
            run_until_signalled(lambda stop: sink.serve(settings, config, dsn, stop))
        except ConnectionError as exc:
            raise CliError(str(exc)) from None
        return 0
    if command == "export":
        if args.output != "-":
            try:
                handle: IO[str] = open(args.output, "w", encoding="utf-8", newline="")  # noqa: SIM115
            except OSError as exc:
                raise CliError(f"cannot write {args.output}: {exc.strerror}") from None
        else:
            handle = sys.stdout
        dsn = _dsn(settings)
        try:
            return _run(lambda: _with_store(dsn, lambda store: export(store, args, handle, sys.stderr)))
        finally:
            if handle is not sys.stdout:
                handle.close()
    if command == "forget":
        page_id, psid = args.page.strip(), args.psid.strip()
        if not page_id or not psid:
            raise CliError("--page and --psid must not be empty")
        dsn = _dsn(settings)
        report = _run(lambda: _with_store(dsn, lambda store: forget(store, settings, page_id, psid)))
        if args.json:
            print(orjson.dumps(report).decode("utf-8"))
        else:
            print(describe_forget(report, settings.topics.name("actions")))
        return 0
    if command == "migrate":
        dsn = _dsn(settings)

        async def migrate(store: HistoryStore) -> int:
            return await store.schema_version()

        version = _run(lambda: _with_store(dsn, migrate))
        print(f"history schema at version {version}")
        return 0
    # retain
    days = args.days if args.days is not None else load_config().history.retain_days
    if days <= 0:
        raise CliError("--days must be > 0 (history.retain_days = 0 keeps everything)")
    dsn = _dsn(settings)
    erased = _run(lambda: _with_store(dsn, lambda store: store.retain(days)))
    print("deleted " + ", ".join(f"{n} {table}" for table, n in erased.items()))
    return 0

"""The history store in PostgreSQL: migrations, idempotent batched writes, search, transcripts,
export, retention and erasure. Used by the sink, the worker's web pages and the CLI.

Writes apply one `streams.rules.history.Batch` per transaction; each table's ON CONFLICT clause is
the merge rule of the matching `merge_*` function there, so re-reading topics, a crash mid-batch
(nothing of the batch is committed, its offsets are not either) or two sinks writing the same
records leave the same rows. Rows are written in key order so two racing writers take row locks in
the same order; a deadlock or serialization failure is retried.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, LiteralString

import orjson
import psycopg
from psycopg import errors, sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from streams.rules.history import (
    Batch,
    Search,
    conversation_digest,
    datetime_to_ms,
    encode_cursor,
    subject,
    subject_lock,
    ts_config_for,
)

log = logging.getLogger("messenger_streams.history")

MIGRATION_LOCK = 7_316_411_027_001  # pg_advisory_lock key: one migrator at a time
RETENTION_LOCK = 7_316_411_027_002
WRITE_RETRIES = 5
TABLES = ("conversations", "messages", "events", "csat_responses")


class StoreError(ConnectionError):
    """The store cannot be used: unreachable, or a schema newer than this program."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The schema migrations shipped with the package, in order (`migrations/NNNN_name.sql`)."""
    found: list[Migration] = []
    for entry in resources.files("streams.history").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append(Migration(int(name[:4]), name[5:-4], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


SCHEMA_VERSION = migrations()[-1].version


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode("utf-8")


@dataclass
class WriteResult:
    conversations: int = 0
    messages: int = 0
    events: int = 0
    csat_responses: int = 0
    dropped_forgotten: int = 0


class HistoryStore:
    """A pool of connections to the history database. `open()` applies pending migrations."""

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 4, timeout: float = 30.0) -> None:
        self.dsn = dsn
        self.timeout = timeout
        self.pool = AsyncConnectionPool(
            dsn, min_size=min_size, max_size=max_size, open=False, timeout=timeout,
            kwargs={"autocommit": True}, name="history",
        )
        self.available_configs: frozenset[str] = frozenset({"simple"})

    async def open(self, migrate: bool = True) -> None:
        """Connect (raises StoreError when the server cannot be reached) and migrate the schema."""
        try:
            # one direct connection first: fails fast, with the server's own words, when unreachable
            probe = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=max(1, int(self.timeout)))
            await probe.close()
            await self.pool.open(wait=True, timeout=self.timeout)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            await self.pool.close()
            raise StoreError(f"cannot reach the history database: {_first_line(exc)}") from None
        try:
            if migrate:
                await self.migrate()
            async with self.pool.connection() as conn:
                rows = await (await conn.execute("SELECT cfgname FROM pg_ts_config")).fetchall()
            self.available_configs = frozenset(str(r[0]) for r in rows)
        except BaseException:
            await self.pool.close()
            raise

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> HistoryStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # schema --------------------------------------------------------------------------------------
    async def migrate(self) -> list[int]:
        """Apply the migrations the database lacks, each in its own transaction; returns them.
        Several processes may start at once: an advisory lock lets one migrate at a time."""
        applied: list[int] = []
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK])
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                    "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                row = await (await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")).fetchone()
                current = int(row[0]) if row else 0
                if current > SCHEMA_VERSION:
                    raise StoreError(f"the history database has schema version {current}, newer than this "
                                     f"program's {SCHEMA_VERSION}: upgrade messenger-streams")
                for m in migrations():
                    if m.version <= current:
                        continue
                    async with conn.transaction():
                        await conn.execute(m.sql.encode("utf-8"))
                        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                           [m.version, m.name])
                    applied.append(m.version)
                    log.info("history schema: applied migration %04d %s", m.version, m.name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK])
        return applied

    async def schema_version(self) -> int:
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")).fetchone()
        return int(row[0]) if row else 0

    # writing -------------------------------------------------------------------------------------
    async def write(self, batch: Batch) -> WriteResult:
        """Write one batch in one transaction (retried on deadlock / serialization failure)."""
        for attempt in range(1, WRITE_RETRIES + 1):
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    return await self._write(conn, batch)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == WRITE_RETRIES:
                    raise
                log.info("history write: lock conflict, retrying (attempt %d)", attempt)
                await asyncio.sleep(0.05 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write(self, conn: psycopg.AsyncConnection[Any], batch: Batch) -> WriteResult:
        result = WriteResult()
        people = batch.subjects()
        if people:
            keys = sorted({subject_lock(s) for s in people})
            # shared per-person locks: `forget` takes the exclusive one, so it never interleaves
            await conn.execute("SELECT count(pg_advisory_xact_lock_shared(k)) FROM unnest(%s::bigint[]) AS k", [keys])
            cur = await conn.execute(
                "SELECT subject, (extract(epoch FROM forgotten_at) * 1000)::bigint FROM forgotten "
                "WHERE subject = ANY(%s)", [sorted(people)])
            forgotten = {people[s]: int(ms) for s, ms in await cur.fetchall()}
            result.dropped_forgotten = batch.drop_forgotten(forgotten)
            digests = {conversation_digest(c): c for c in batch.conversation_ids()}
            if digests:
                cur = await conn.execute("SELECT digest FROM forgotten_conversations WHERE digest = ANY(%s)",
                                         [sorted(digests)])
                erased = {digests[str(r[0])] for r in await cur.fetchall()}
                result.dropped_forgotten += batch.drop_conversations(erased)
        result.conversations = await self._write_conversations(conn, batch)
        result.messages = await self._write_messages(conn, batch)
        result.events = await self._write_events(conn, batch)
        result.csat_responses = await self._write_csat(conn, batch)
        return result

    async def _write_conversations(self, conn: psycopg.AsyncConnection[Any], batch: Batch) -> int:
        rows = [batch.conversations[k] for k in sorted(batch.conversations)]
        if not rows:
            return 0
        configs = [ts_config_for(r.locale, self.available_configs) for r in rows]
        figures = ("first_agent_response_ms", "queue_ms", "handle_ms", "consumer_messages", "agent_messages",
                   "external_messages", "system_messages")
        params: list[Any] = [
            [r.conversation_id for r in rows], [r.page_id for r in rows], [r.psid for r in rows],
            [r.skill for r in rows], [r.skill_rank for r in rows],
            [_json(r.skills) for r in rows], [_json(r.agents) for r in rows],
            [r.locale for r in rows], configs, [r.opened_by for r in rows],
            [r.started_at for r in rows], [r.opened_at for r in rows], [r.last_event_at for r in rows],
            [r.closed_at for r in rows], [r.closed_by for r in rows], [r.close_reason for r in rows],
            [r.csat_score for r in rows],
            *[[_int_or_none(r.figures.get(f)) for r in rows] for f in figures],
            [_bool_or_none(r.figures.get("abandoned")) for r in rows],
            [_json(r.summary) for r in rows],
        ]
        await conn.execute(
            """
            INSERT INTO conversations AS c (
                conversation_id, page_id, psid, skill, skill_rank, skills, agents, locale, ts_config, opened_by,
                started_at, opened_at, last_event_at, closed_at, closed_by, close_reason, csat_score,
                first_agent_response_ms, queue_ms, handle_ms, consumer_messages, agent_messages,
                external_messages, system_messages, abandoned, summary)
            SELECT u.id, u.page_id, u.psid, u.skill, u.skill_rank,
                   ARRAY(SELECT jsonb_array_elements_text(u.skills::jsonb)),
                   ARRAY(SELECT jsonb_array_elements_text(u.agents::jsonb)),
                   u.locale, u.ts_config::regconfig, u.opened_by,
                   to_timestamp(u.started / 1000.0), to_timestamp(u.opened / 1000.0),
                   to_timestamp(u.last / 1000.0), to_timestamp(u.closed / 1000.0),
                   u.closed_by, u.close_reason, u.csat,
                   u.farm, u.queue, u.handle, u.nc, u.na, u.ne, u.ns, u.abandoned, u.summary::jsonb
            FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                        %s::text[], %s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[],
                        %s::bigint[], %s::text[], %s::text[], %s::smallint[], %s::bigint[], %s::bigint[],
                        %s::bigint[], %s::int[], %s::int[], %s::int[], %s::int[], %s::boolean[], %s::text[])
                 AS u(id, page_id, psid, skill, skill_rank, skills, agents, locale, ts_config, opened_by,
                      started, opened, last, closed, closed_by, close_reason, csat,
                      farm, queue, handle, nc, na, ne, ns, abandoned, summary)
            ORDER BY u.id
            ON CONFLICT (conversation_id) DO UPDATE SET
                skill = CASE WHEN EXCLUDED.skill_rank > c.skill_rank THEN EXCLUDED.skill ELSE c.skill END,
                skill_rank = GREATEST(c.skill_rank, EXCLUDED.skill_rank),
                skills = ARRAY(SELECT DISTINCT x FROM unnest(c.skills || EXCLUDED.skills) AS x ORDER BY x),
                agents = ARRAY(SELECT DISTINCT x FROM unnest(c.agents || EXCLUDED.agents) AS x ORDER BY x),
                locale = COALESCE(c.locale, EXCLUDED.locale),
                ts_config = CASE WHEN c.locale IS NULL THEN EXCLUDED.ts_config ELSE c.ts_config END,
                opened_by = COALESCE(c.opened_by, EXCLUDED.opened_by),
                started_at = LEAST(c.started_at, EXCLUDED.started_at),
                opened_at = LEAST(c.opened_at, EXCLUDED.opened_at),
                last_event_at = GREATEST(c.last_event_at, EXCLUDED.last_event_at),
                closed_at = COALESCE(c.closed_at, EXCLUDED.closed_at),
                closed_by = COALESCE(c.closed_by, EXCLUDED.closed_by),
                close_reason = COALESCE(c.close_reason, EXCLUDED.close_reason),
                csat_score = COALESCE(c.csat_score, EXCLUDED.csat_score),
                first_agent_response_ms = COALESCE(c.first_agent_response_ms, EXCLUDED.first_agent_response_ms),
                queue_ms = COALESCE(c.queue_ms, EXCLUDED.queue_ms),
                handle_ms = COALESCE(c.handle_ms, EXCLUDED.handle_ms),
                consumer_messages = COALESCE(c.consumer_messages, EXCLUDED.consumer_messages),
                agent_messages = COALESCE(c.agent_messages, EXCLUDED.agent_messages),
                external_messages = COALESCE(c.external_messages, EXCLUDED.external_messages),
                system_messages = COALESCE(c.system_messages, EXCLUDED.system_messages),
                abandoned = COALESCE(c.abandoned, EXCLUDED.abandoned),
                summary = CASE
                    WHEN EXCLUDED.summary IS NOT NULL AND (c.summary IS NULL OR (
                        jsonb_typeof(c.summary -> 'csat_score') IS DISTINCT FROM 'number'
                        AND jsonb_typeof(EXCLUDED.summary -> 'csat_score') = 'number'))
                    THEN EXCLUDED.summary ELSE c.summary END
            """,
            params,
        )
        with_locale = sorted({r.conversation_id for r in rows if r.locale})
        new_configs = sorted({c for c in configs if c != "simple"})
        if new_configs:
            await conn.execute(
                "INSERT INTO search_configs SELECT c::regconfig FROM unnest(%s::text[]) AS c ON CONFLICT DO NOTHING",
                [new_configs])
        if with_locale:
            # messages written before their conversation's language was known are indexed again
            await conn.execute(
                "UPDATE messages AS m SET ts_config = c.ts_config FROM conversations AS c "
                "WHERE c.conversation_id = ANY(%s) AND m.conversation_id = c.conversation_id "
                "AND m.ts_config <> c.ts_config", [with_locale])
        return len(rows)

    async def _write_messages(self, conn: psycopg.AsyncConnection[Any], batch: Batch) -> int:
        rows = [batch.messages[k] for k in sorted(batch.messages)]
        if not rows:
            return 0
        params: list[Any] = [
            [r.message_key for r in rows], [r.event_id for r in rows], [r.type for r in rows],
            [r.author for r in rows], [r.conversation_id for r in rows], [r.page_id for r in rows],
            [r.psid for r in rows], [r.skill for r in rows], [r.agent_id for r in rows], [r.mid for r in rows],
            [r.outbox_id for r in rows], [r.text for r in rows], [_json(r.attachments) for r in rows],
            [r.sent_at for r in rows], [r.src.topic for r in rows], [r.src.partition for r in rows],
            [r.src.offset for r in rows], [_json(r.data) for r in rows],
        ]
        await conn.execute(
            """
            INSERT INTO messages AS m (
                message_key, event_id, type, author, conversation_id, page_id, psid, skill, agent_id, mid,
                outbox_id, text, attachments, sent_at, src_topic, src_partition, src_offset, ts_config, data)
            SELECT u.k, u.event_id, u.type, u.author, u.conversation_id, u.page_id, u.psid, u.skill, u.agent_id,
                   u.mid, u.outbox_id, u.text, u.attachments::jsonb, to_timestamp(u.sent / 1000.0),
                   u.topic, u.part, u.off,
                   COALESCE(c.ts_config, 'simple'::regconfig), u.data::jsonb
            FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                        %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[],
                        %s::text[], %s::int[], %s::bigint[], %s::text[])
                 AS u(k, event_id, type, author, conversation_id, page_id, psid, skill, agent_id, mid,
                      outbox_id, text, attachments, sent, topic, part, off, data)
            LEFT JOIN conversations AS c ON c.conversation_id = u.conversation_id
            ORDER BY u.k
            ON CONFLICT (message_key) DO UPDATE SET
                event_id = LEAST(m.event_id, EXCLUDED.event_id),
                sent_at = LEAST(m.sent_at, EXCLUDED.sent_at),
                mid = COALESCE(m.mid, EXCLUDED.mid),
                text = COALESCE(m.text, EXCLUDED.text),
                attachments = COALESCE(m.attachments, EXCLUDED.attachments),
                agent_id = COALESCE(m.agent_id, EXCLUDED.agent_id),
                src_topic = CASE WHEN (EXCLUDED.src_topic, EXCLUDED.src_partition, EXCLUDED.src_offset)
                    < (m.src_topic, m.src_partition, m.src_offset) THEN EXCLUDED.src_topic ELSE m.src_topic END,
                src_partition = CASE WHEN (EXCLUDED.src_topic, EXCLUDED.src_partition, EXCLUDED.src_offset)
                    < (m.src_topic, m.src_partition, m.src_offset) THEN EXCLUDED.src_partition ELSE m.src_partition END,
                src_offset = CASE WHEN (EXCLUDED.src_topic, EXCLUDED.src_partition, EXCLUDED.src_offset)
                    < (m.src_topic, m.src_partition, m.src_offset) THEN EXCLUDED.src_offset ELSE m.src_offset END,
                data = EXCLUDED.data || m.data
            WHERE EXCLUDED.event_id < m.event_id OR EXCLUDED.sent_at < m.sent_at
               OR (m.mid IS NULL AND EXCLUDED.mid IS NOT NULL) OR (m.text IS NULL AND EXCLUDED.text IS NOT NULL)
               OR (m.attachments IS NULL AND EXCLUDED.attachments IS NOT NULL)
               OR (m.agent_id IS NULL AND EXCLUDED.agent_id IS NOT NULL)
               OR (EXCLUDED.src_topic, EXCLUDED.src_partition, EXCLUDED.src_offset)
                  < (m.src_topic, m.src_partition, m.src_offset)
               OR (EXCLUDED.data || m.data) <> m.data
            """,
            params,
        )
        return len(rows)

    async def _write_events(self, conn: psycopg.AsyncConnection[Any], batch: Batch) -> int:
        rows = [batch.events[k] for k in sorted(batch.events)]
        if not rows:
            return 0

        def col(name: str) -> list[Any]:
            return [r.columns.get(name) for r in rows]

        params: list[Any] = [
            [r.event_id for r in rows], [r.type for r in rows], [r.conversation_id for r in rows],
            [r.page_id for r in rows], [r.psid for r in rows], [r.skill for r in rows], [r.at for r in rows],
            col("agent_id"), col("from_skill"), col("to_skill"), col("closed_by"), col("reason"), col("score"),
            col("status"), col("watermark"), [r.src.topic for r in rows], [r.src.partition for r in rows],
            [r.src.offset for r in rows], [_json(r.data) for r in rows],
        ]
        await conn.execute(
            """
            INSERT INTO events AS e (
                event_id, type, conversation_id, page_id, psid, skill, at, agent_id, from_skill, to_skill,
                closed_by, reason, score, status, watermark, src_topic, src_partition, src_offset, data)
            SELECT u.id, u.type, u.conversation_id, u.page_id, u.psid, u.skill, to_timestamp(u.at / 1000.0), u.agent_id,
                   u.from_skill, u.to_skill, u.closed_by, u.reason, u.score, u.status, to_timestamp(u.wm / 1000.0),
                   u.topic, u.part, u.off, u.data::jsonb
            FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[],
                        %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::smallint[], %s::text[],
                        %s::bigint[], %s::text[], %s::int[], %s::bigint[], %s::text[])
                 AS u(id, type, conversation_id, page_id, psid, skill, at, agent_id, from_skill, to_skill,
                      closed_by, reason, score, status, wm, topic, part, off, data)
            ORDER BY u.id
            ON CONFLICT (event_id) DO UPDATE SET
                src_topic = EXCLUDED.src_topic, src_partition = EXCLUDED.src_partition,
                src_offset = EXCLUDED.src_offset
            WHERE (EXCLUDED.src_topic, EXCLUDED.src_partition, EXCLUDED.src_offset)
                  < (e.src_topic, e.src_partition, e.src_offset)
            """,
            params,
        )
        return len(rows)

    async def _write_csat(self, conn: psycopg.AsyncConnection[Any], batch: Batch) -> int:
        rows = [batch.csat[k] for k in sorted(batch.csat)]
        if not rows:
            return 0
        await conn.execute(
            """
            INSERT INTO csat_responses (conversation_id, page_id, psid, skill, agent_id, score, locale, at)
            SELECT u.id, u.page_id, u.psid, u.skill, u.agent_id, u.score, u.locale, to_timestamp(u.at / 1000.0)
            FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::smallint[], %s::text[],
                        %s::bigint[]) AS u(id, page_id, psid, skill, agent_id, score, locale, at)
            ORDER BY u.id
            ON CONFLICT (conversation_id) DO NOTHING
            """,
            [[r.conversation_id for r in rows], [r.page_id for r in rows], [r.psid for r in rows],
             [r.skill for r in rows], [r.agent_id for r in rows], [r.score for r in rows],
             [r.locale for r in rows], [r.at for r in rows]],
        )
        return len(rows)

    # reading -------------------------------------------------------------------------------------
    async def search_configs(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        cur = await conn.execute("SELECT ts_config::text FROM search_configs ORDER BY 1")
        return [str(r[0]) for r in await cur.fetchall()]

    def _filters(
        self, s: Search, configs: Sequence[str], *, skills: Sequence[str] = ()
    ) -> tuple[sql.Composed, list[Any]]:
        where: list[sql.Composable] = [sql.SQL("TRUE")]
        args: list[Any] = []
        conditions: list[tuple[Any, LiteralString]] = [
            (s.skill, "c.skills @> ARRAY[%s]::text[]"),
            (list(skills) or None, "c.skills && %s::text[]"),
            (s.page, "c.page_id = %s"),
            (s.agent, "c.agents @> ARRAY[%s]::text[]"),
            (s.from_ms, "c.started_at >= to_timestamp(%s / 1000.0)"),
            (s.to_ms, "c.started_at < to_timestamp(%s / 1000.0)"),
            (s.closed_by, "c.closed_by = %s"),
            (s.close_reason, "c.close_reason = %s"),
            (s.csat_min, "c.csat_score >= %s"),
            (s.csat_max, "c.csat_score <= %s"),
        ]
        for value, clause in conditions:
            if value is not None:
                where.append(sql.SQL(clause))
                args.append(value)
        if s.q:
            # each conversation's messages are indexed in its own language: ask each language in use
            per_config = sql.SQL(" OR ").join(
                sql.SQL("(m.ts_config = {cfg}::regconfig AND m.tsv @@ websearch_to_tsquery({cfg}::regconfig, %s))")
                .format(cfg=sql.Literal(cfg)) for cfg in configs)
            where.append(sql.SQL("c.conversation_id IN (SELECT m.conversation_id FROM messages AS m WHERE {})")
                         .format(per_config))
            args.extend([s.q] * len(configs))
        return sql.SQL(" AND ").join(where), args

    async def search(self, s: Search) -> dict[str, Any]:
        """One page of conversations, newest first, and the cursor of the next page (or null)."""
        async with self.pool.connection() as conn:
            configs = await self.search_configs(conn) if s.q else []
            where, args = self._filters(s, configs)
            if s.after is not None:
                where = sql.SQL(
                    "{} AND (c.started_at, c.conversation_id) < (to_timestamp(%s / 1000.0), %s)").format(where)
                args.extend([s.after[0], s.after[1]])
            match = sql.SQL("NULL::text")
            match_args: list[Any] = []
            if s.q:
                match = sql.SQL(
                    "(SELECT ts_headline(m.ts_config, m.text, websearch_to_tsquery(m.ts_config, %s), "
                    "'MaxFragments=1, MaxWords=20, MinWords=5') FROM messages AS m "
                    "WHERE m.conversation_id = c.conversation_id "
                    "AND m.tsv @@ websearch_to_tsquery(m.ts_config, %s) ORDER BY m.sent_at LIMIT 1)")
                match_args = [s.q, s.q]
            query = sql.SQL(
                "SELECT c.*, {match} AS match FROM conversations AS c WHERE {where} "
                "ORDER BY c.started_at DESC, c.conversation_id DESC LIMIT %s").format(match=match, where=where)
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(query, [*match_args, *args, s.limit + 1])
            rows = await cur.fetchall()
        more = len(rows) > s.limit
        rows = rows[: s.limit]
        items = [conversation_json(r) for r in rows]
        for item, row in zip(items, rows, strict=True):
            if s.q:
                item["match"] = row["match"]
        last = items[-1] if more and items else None
        return {
            "conversations": items,
            "next_cursor": encode_cursor(last["started_at"], last["conversation_id"]) if last else None,
        }

    async def transcript(self, conversation_id: str) -> dict[str, Any] | None:
        """A conversation and everything in it, in order (messages with delivery and read times)."""
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute("SELECT * FROM conversations WHERE conversation_id = %s", [conversation_id])
            conv = await cur.fetchone()
            if conv is None:
                return None
            await cur.execute(MESSAGES_WITH_RECEIPTS + " WHERE m.conversation_id = %s", [conversation_id])
            messages = await cur.fetchall()
            await cur.execute(
                "SELECT * FROM events WHERE conversation_id = %s "
                "AND NOT (type = 'conversation_transferred' AND skill IS DISTINCT FROM to_skill)",
                [conversation_id])
            events = await cur.fetchall()
        rows = [(r, r["sent_at"], message_json(r)) for r in messages] + [(r, r["at"], event_json(r)) for r in events]
        return {"conversation": conversation_json(conv), "transcript": transcript_order(rows)}

    async def count(self, s: Search, skills: Sequence[str] = ()) -> int:
        async with self.pool.connection() as conn:
            configs = await self.search_configs(conn) if s.q else []
            where, args = self._filters(s, configs, skills=skills)
            cur = await conn.execute(sql.SQL("SELECT count(*) FROM conversations AS c WHERE {}").format(where), args)
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def export(
        self, s: Search, what: Literal["conversations", "messages"], skills: Sequence[str] = (), chunk: int = 2000,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every conversation (or every message of them) matching the filters, oldest first, read
        through a server-side cursor: memory stays at one chunk whatever the size."""
        async with self.pool.connection() as conn:
            configs = await self.search_configs(conn) if s.q else []
            where, args = self._filters(s, configs, skills=skills)
            if what == "conversations":
                query = sql.SQL("SELECT c.* FROM conversations AS c WHERE {} "
                                "ORDER BY c.started_at, c.conversation_id").format(where)
            else:
                query = sql.SQL(
                    MESSAGES_WITH_RECEIPTS + " JOIN conversations AS c ON c.conversation_id = m.conversation_id"
                    " WHERE {} ORDER BY c.started_at, c.conversation_id, m.sent_at, m.src_offset").format(where)
            async with conn.transaction():
                cur = conn.cursor(name="history_export", row_factory=dict_row)
                cur.itersize = chunk
                await cur.execute(query, args)
                async for row in cur:
                    yield conversation_json(row) if what == "conversations" else message_json(row)

    # privacy -------------------------------------------------------------------------------------
    async def forget(self, page_id: str, psid: str, now_ms: int | None = None) -> dict[str, Any]:
        """Erase one person: every row about them, in one transaction, and remember the erasure (as a
        digest) so that re-read records about them up to now are not written again."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        digest = subject(page_id, psid)
        erased: dict[str, Any] = {}
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [subject_lock(digest)])
            await conn.execute(
                "INSERT INTO forgotten (subject, forgotten_at) VALUES (%s, to_timestamp(%s / 1000.0)) "
                "ON CONFLICT (subject) DO UPDATE SET forgotten_at = GREATEST(forgotten.forgotten_at, "
                "EXCLUDED.forgotten_at)", [digest, now_ms])
            cur = await conn.execute("DELETE FROM conversations WHERE page_id = %s AND psid = %s "
                                     "RETURNING conversation_id", [page_id, psid])
            erased["conversation_ids"] = sorted(str(r[0]) for r in await cur.fetchall())
            erased["conversations"] = len(erased["conversation_ids"])
            await conn.execute(
                "INSERT INTO forgotten_conversations (digest, forgotten_at) SELECT d, to_timestamp(%s / 1000.0) "
                "FROM unnest(%s::text[]) AS d ON CONFLICT (digest) DO NOTHING",
                [now_ms, [conversation_digest(c) for c in erased["conversation_ids"]]])
            for table in ("messages", "events", "csat_responses"):
                cur = await conn.execute(
                    sql.SQL("DELETE FROM {} WHERE page_id = %s AND psid = %s").format(sql.Identifier(table)),
                    [page_id, psid])
                erased[table] = cur.rowcount
        return erased

    async def retain(self, retain_days: int, now_ms: int | None = None, chunk: int = 1000) -> dict[str, int]:
        """Delete conversations whose last activity is older than `retain_days` (and loose rows by
        their own time), in chunks so no statement holds many locks. One runner at a time."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - retain_days * 86_400_000
        totals = dict.fromkeys(TABLES, 0)
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", [RETENTION_LOCK])).fetchone()
            if not row or not row[0]:
                return totals
            try:
                while True:
                    cur = await conn.execute(RETAIN_CHUNK, [cutoff, chunk])
                    got = await cur.fetchone()
                    if got is None:
                        break
                    for table, n in zip(("conversations", "messages", "events", "csat_responses"), got, strict=True):
                        totals[table] += int(n)
                    if int(got[0]) < chunk:
                        break
                for table, column in (("messages", "sent_at"), ("events", "at")):
                    cur = await conn.execute(
                        sql.SQL("DELETE FROM {} WHERE conversation_id IS NULL AND {} < to_timestamp(%s / 1000.0)")
                        .format(sql.Identifier(table), sql.Identifier(column)), [cutoff])
                    totals[table] += cur.rowcount
                cur = await conn.execute("DELETE FROM csat_responses WHERE at < to_timestamp(%s / 1000.0)", [cutoff])
                totals["csat_responses"] += cur.rowcount
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", [RETENTION_LOCK])
        return totals

    async def table_counts(self) -> dict[str, int]:
        async with self.pool.connection() as conn:
            out: dict[str, int] = {}
            for table in (*TABLES, "forgotten", "forgotten_conversations"):
                cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
                row = await cur.fetchone()
                out[table] = int(row[0]) if row else 0
        return out


MESSAGES_WITH_RECEIPTS = """
SELECT m.*,
    (SELECT min(e.watermark) FROM events AS e WHERE e.type = 'status' AND e.page_id = m.page_id
        AND e.psid = m.psid AND e.status = 'read' AND e.watermark >= m.sent_at
        AND m.author <> 'consumer') AS read_at,
    (SELECT min(e.watermark) FROM events AS e WHERE e.type = 'status' AND e.page_id = m.page_id
        AND e.psid = m.psid AND e.status IN ('delivered', 'read') AND e.watermark >= m.sent_at
        AND m.author <> 'consumer') AS delivered_at
FROM messages AS m"""

RETAIN_CHUNK = """
WITH old AS (
    SELECT conversation_id FROM conversations WHERE last_event_at < to_timestamp(%s / 1000.0)
    ORDER BY last_event_at LIMIT %s FOR UPDATE SKIP LOCKED
), gone_messages AS (
    DELETE FROM messages AS m USING old WHERE m.conversation_id = old.conversation_id RETURNING 1
), gone_events AS (
    DELETE FROM events AS e USING old WHERE e.conversation_id = old.conversation_id RETURNING 1
), gone_csat AS (
    DELETE FROM csat_responses AS r USING old WHERE r.conversation_id = old.conversation_id RETURNING 1
), gone AS (
    DELETE FROM conversations AS c USING old WHERE c.conversation_id = old.conversation_id RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM gone_messages), (SELECT count(*) FROM gone_events),
       (SELECT count(*) FROM gone_csat)
"""


def transcript_order(rows: list[tuple[dict[str, Any], Any, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Items in the order they happened: each topic partition in its log order (the processor's own
    order, which event times can contradict by a few ms), the partitions merged by event time (a
    transferred conversation continues on another skill's topic)."""
    lanes: dict[tuple[str, int], list[tuple[Any, int, str, dict[str, Any]]]] = {}
    for row, at, item in rows:
        lane = lanes.setdefault((row["src_topic"], row["src_partition"]), [])
        lane.append((at, int(row["src_offset"]), str(row["event_id"]), item))
    for lane in lanes.values():
        lane.sort(key=lambda entry: (entry[1], entry[2]))
    merged = heapq.merge(*[[(at, topic, part, off, eid, item) for at, off, eid, item in lane]
                           for (topic, part), lane in sorted(lanes.items())],
                         key=lambda entry: (entry[0], entry[1], entry[2]))
    return [entry[5] for entry in merged]


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _bool_or_none(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


CONVERSATION_FIELDS = (
    "conversation_id", "page_id", "psid", "skill", "skills", "agents", "locale", "opened_by", "started_at",
    "opened_at", "last_event_at", "closed_at", "closed_by", "close_reason", "csat_score",
    "first_agent_response_ms", "queue_ms", "handle_ms", "abandoned", "consumer_messages", "agent_messages",
    "external_messages", "system_messages",
)
MESSAGE_FIELDS = (
    "event_id", "type", "author", "conversation_id", "skill", "agent_id", "mid", "outbox_id", "text",
    "attachments", "sent_at", "delivered_at", "read_at",
)
EVENT_FIELDS = ("event_id", "type", "skill", "at", "agent_id", "from_skill", "to_skill", "closed_by", "reason",
                "score", "status", "watermark")
TIME_FIELDS = {"started_at", "opened_at", "last_event_at", "closed_at", "sent_at", "delivered_at", "read_at",
               "at", "watermark"}


def _plain(row: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in fields:
        value = row.get(name)
        out[name] = datetime_to_ms(value) if name in TIME_FIELDS else value
    return out


def conversation_json(row: dict[str, Any]) -> dict[str, Any]:
    """A conversation row as the API shows it (times in epoch ms)."""
    out = _plain(row, CONVERSATION_FIELDS)
    out["ts_config"] = str(row["ts_config"]) if row.get("ts_config") is not None else None
    return out


def message_json(row: dict[str, Any]) -> dict[str, Any]:
    out = {"kind": "message", **_plain(row, MESSAGE_FIELDS)}
    out["at"] = out["sent_at"]
    return _with_data(out, row)


def _with_data(out: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    extra = row.get("data") or {}
    out.update({k: v for k, v in extra.items() if k not in out})
    return out


def event_json(row: dict[str, Any]) -> dict[str, Any]:
    out = {"kind": "event", **{k: v for k, v in _plain(row, EVENT_FIELDS).items() if v is not None}}
    return _with_data(out, row)

"""Test helpers around the embedded PostgreSQL (pgserver): a fresh database per test, table dumps."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from streams.history.store import TABLES

DUMP_ORDER = {
    "conversations": "conversation_id",
    "messages": "message_key",
    "events": "event_id",
    "csat_responses": "conversation_id",
    "forgotten": "subject",
    "forgotten_conversations": "digest",
}


def new_database(server_uri: str) -> str:
    """Create an empty database on the server; returns its DSN."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_uri, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return make_conninfo(server_uri, dbname=name)


def dump(dsn: str, tables: tuple[str, ...] = (*TABLES, "forgotten", "forgotten_conversations")) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the store's tables, in key order (to compare two stores)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with psycopg.connect(dsn) as conn:
        for table in tables:
            rows = conn.execute(f"SELECT * FROM {table} ORDER BY {DUMP_ORDER[table]}").fetchall()  # noqa: S608
            out[table] = [tuple(str(v) if v is not None else None for v in row) for row in rows]
    return out


def all_text(dsn: str) -> str:
    """The text of every row of every table of the public schema (to look for what must be gone)."""
    parts: list[str] = []
    with psycopg.connect(dsn) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()]
        for table in tables:
            for row in conn.execute(f"SELECT t::text FROM {table} AS t").fetchall():  # noqa: S608
                parts.append(row[0])
    return "\n".join(parts)

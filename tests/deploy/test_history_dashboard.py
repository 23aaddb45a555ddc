"""The PostgreSQL dashboard: every SQL panel (and the skill variable) runs against the history schema
in the embedded PostgreSQL and returns rows for stored conversations; its datasource is provisioned."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from streams.history.store import HistoryStore
from streams.rules.history import Batch, Src
from tests.historysamples import conversation_records
from tests.pgtools import new_database

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "messenger-streams-history.json"
DATASOURCE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "history-postgres.yaml"
FROM, TO = "2025-12-01T00:00:00Z", "2030-01-01T00:00:00Z"


def expand(sql: str, skills: list[str]) -> str:
    """Grafana's macros and variables as Grafana's PostgreSQL datasource expands them."""
    sql = re.sub(r"\$__timeFilter\(([^()]+)\)", rf"\1 BETWEEN '{FROM}'::timestamptz AND '{TO}'::timestamptz", sql)
    sql = sql.replace("$__timeFrom()", f"'{FROM}'::timestamptz").replace("$__timeTo()", f"'{TO}'::timestamptz")
    sql = sql.replace("$skill", ", ".join(f"'{s}'" for s in skills))
    assert "$" not in sql, f"unexpanded macro or variable in {sql}"
    return sql


def sql_targets() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["rawSql"]))
    return out


@pytest.fixture(scope="module")
def filled(pg_server: str) -> str:
    dsn = new_database(pg_server)

    async def fill() -> None:
        async with HistoryStore(dsn) as store:
            batch = Batch()
            for n, rec in enumerate(conversation_records(30, seed=41)):
                kind: Any = "skill" if rec.kind.startswith("skill:") else rec.kind
                batch.add(kind, rec.value, Src(rec.kind, 0, n))
            await store.write(batch)

    asyncio.run(fill())
    return dsn


def test_dashboard_shape_and_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "messenger-streams-history"
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    assert uids == {"history"}
    provisioned = DATASOURCE.read_text()
    assert "uid: history" in provisioned and "type: grafana-postgresql-datasource" in provisioned
    titles = " ".join(t for t, _ in sql_targets())
    for needed in ("CSAT % by agent and day", "First response time by agent and day", "Busiest hours"):
        assert needed in titles
    assert len(sql_targets()) >= 10


@pytest.mark.parametrize("title, sql", sql_targets(), ids=[t for t, _ in sql_targets()])
def test_every_sql_panel_runs_against_the_schema(title: str, sql: str, filled: str) -> None:
    with psycopg.connect(filled) as conn:
        conn.execute("SET TRANSACTION READ ONLY")
        rows = conn.execute(expand(sql, ["billing", "support"])).fetchall()
    assert rows, f"{title}: no rows for 30 stored conversations"
    if "time" in sql.split(" FROM ")[0]:
        with psycopg.connect(filled) as conn:
            cur = conn.execute(expand(sql, ["billing"]))
            assert cur.description is not None and cur.description[0].name in ("time", "agent", "weekday", "hour")


def test_skill_variable_query_runs(filled: str) -> None:
    var = json.loads(DASHBOARD.read_text())["templating"]["list"][0]
    with psycopg.connect(filled) as conn:
        conn.execute("UPDATE conversations SET started_at = now()")
        skills = [r[0] for r in conn.execute(var["query"]).fetchall()]
        conn.rollback()  # the module's other tests keep the stored times
    assert skills == ["billing", "support"]


def test_the_macro_expander_is_strict() -> None:
    with pytest.raises(AssertionError, match="unexpanded"):
        expand("SELECT 1 WHERE $__unixEpochFilter(x)", [])

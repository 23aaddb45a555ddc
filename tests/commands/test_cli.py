"""The command line: inspect prints JSON lines; bad input is one line on stderr and exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson
import pytest

from tests.rules.test_normalize import SAMPLES, WEBHOOK_SAMPLES, body_of

ROOT = Path(__file__).resolve().parents[2]
CLI = str(ROOT / ".venv" / "bin" / "messenger-streams")


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CLI, *args], input=stdin, capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize("path", WEBHOOK_SAMPLES[:6], ids=lambda p: p.name)
def test_inspect_prints_one_event_per_line(path: Path) -> None:
    res = run("inspect", "-", stdin=body_of(path))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode().splitlines()
    assert len(lines) == 1
    ev = orjson.loads(lines[0])
    for field in ("kind", "page_id", "psid", "mid", "timestamp", "standby", "conversation_key"):
        assert field in ev


def test_inspect_file_argument() -> None:
    res = run("inspect", str(SAMPLES / "01_text_message.json"))
    assert res.returncode == 0
    assert orjson.loads(res.stdout)["psid"] == "1396353687096793"


@pytest.mark.parametrize(
    ("stdin", "needle"),
    [
        (b"{not json", "invalid_json"),
        (b'{"object":"user","entry":[]}', "not_page_object"),
        (b"[]", "invalid_envelope"),
        (b"", "invalid_json"),
    ],
)
def test_inspect_bad_input_is_one_line_exit_2(stdin: bytes, needle: str) -> None:
    res = run("inspect", "-", stdin=stdin)
    assert res.returncode == 2
    err = res.stderr.decode()
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert res.stdout == b""


def test_inspect_reports_bad_items_and_keeps_good_ones() -> None:
    raw = orjson.dumps({"object": "page", "entry": [{"id": "p", "messaging": [
        {"sender": {"id": "u"}, "recipient": {"id": "p"}, "timestamp": 1, "message": {"mid": "ok"}},
        {"sender": {"id": [1]}, "recipient": {"id": "p"}, "timestamp": 1, "message": {"mid": "bad"}}]}]})
    res = run("inspect", "-", stdin=raw)
    assert res.returncode == 2
    assert len(res.stdout.splitlines()) == 1
    assert "entry[0].messaging[1]" in res.stderr.decode()


def test_missing_file_and_unknown_command() -> None:
    res = run("inspect", "/no/such/file.json")
    assert res.returncode == 2 and b"cannot read" in res.stderr and b"Traceback" not in res.stderr
    res = run("frobnicate")
    assert res.returncode == 2 and b"invalid choice" in res.stderr


def test_help_lists_every_command() -> None:
    res = run("--help")
    assert res.returncode == 0
    for cmd in (b"worker", b"inspect", b"topics", b"simulate", b"summary"):
        assert cmd in res.stdout

"""The README's promise for every command: bad config, a bad MESSENGER_STREAMS_* value or an
unreachable broker is one line on stderr and exit status 2, never a traceback; an unknown
MESSENGER_STREAMS_* variable is a warning naming the closest known one.

The commands come from the parser and the variables from the Settings catalogue, so a new
subcommand or setting is covered here without editing this file (a new subcommand needs one line
in HOW_TO_RUN, and the test says so)."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import SecretStr

from streams.commands import cli
from streams.core.config import ConfigError
from streams.core.settings import known_variables, load_settings, unknown_variables
from tests.kafkatools import ROOT, free_port

CLI = str(ROOT / ".venv" / "bin" / "messenger-streams")
SAMPLE = str(ROOT / "tests" / "samples" / "01_text_message.json")

# How to run each leaf command against an unreachable broker (and an unreachable history database):
# extra arguments, and the one line it then prints (None: it needs neither and exits 0).
NO_DB = "host=/nonexistent dbname=x connect_timeout=2"
PAGE = "1691462197845448"
PAGES_KEY = "ZmFrZS1rZXktZm9yLXRoZS1lcnJvci1wcm9taXNlLTA="  # a valid Fernet key (32 bytes)
HOW_TO_RUN: dict[tuple[str, ...], tuple[list[str], str | None]] = {
    ("worker",): ([], "cannot reach Kafka at "),
    ("inspect",): ([SAMPLE], None),  # offline
    ("topics", "create"): ([], "cannot reach Kafka at "),
    ("topics", "delete"): (["--yes"], "cannot reach Kafka at "),
    ("simulate",): (["--count", "1"], "cannot reach Kafka at "),
    ("summary",): (["--once"], "cannot read the worker's metrics at "),  # reads the worker, not Kafka
    ("webhook",): ([], "cannot reach Kafka at "),
    ("dispatch",): ([], "cannot reach Kafka at "),
    ("dlq", "show"): ([], "cannot reach Kafka at "),
    ("dlq", "replay"): ([], "cannot reach Kafka at "),
    ("history", "sink"): ([], "cannot reach the history database: "),
    ("history", "export"): (["--from", "2026-01-01", "--to", "2026-02-01"], "cannot reach the history database: "),
    ("history", "forget"): (["--page", "1", "--psid", "2"], "cannot reach the history database: "),
    ("history", "migrate"): ([], "cannot reach the history database: "),
    ("history", "retain"): ([], "cannot reach the history database: "),
    ("media",): (["--store", "/tmp/messenger-streams-error-promise-media"], "cannot reach Kafka at "),  # #17
    ("pages", "keygen"): ([], None),  # offline: prints a key
    ("pages", "list"): ([], "cannot reach Kafka at "),
    ("pages", "connect"): ([], "no user access token on standard input"),  # the token comes first, from stdin
    ("pages", "set"): ([PAGE, "--skill", "billing"], "cannot reach Kafka at "),
    ("pages", "enable"): ([PAGE], "cannot reach Kafka at "),
    ("pages", "disable"): ([PAGE], "cannot reach Kafka at "),
    ("pages", "disconnect"): ([PAGE], "cannot reach Kafka at "),
    ("pages", "account"): (["--source", "on"], "cannot reach Kafka at "),
    ("admin",): ([], "cannot reach Kafka at "),
}


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every runnable command path of the parser (`topics create`, `dlq show`, …)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    if not subs:
        return [path]
    return [leaf for name, sub in subs[0].choices.items() for leaf in leaf_commands(sub, (*path, name))]


def base_env(command: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # nothing listens there
        "MESSENGER_STREAMS_CONFIG": str(ROOT / "deploy" / "connector.example.toml"),
        "MESSENGER_STREAMS_APP_SECRET": "an-app-secret",
        "MESSENGER_STREAMS_VERIFY_TOKEN": "a-verify-token",
        "MESSENGER_STREAMS_PAGE_TOKENS": '{"1691462197845448": "a-page-token"}',
        "MESSENGER_STREAMS_WEB_PORT": str(free_port()),
        "MESSENGER_STREAMS_WEBHOOK_PORT": str(free_port()),
        "MESSENGER_STREAMS_DISPATCH_WEB_PORT": str(free_port()),
    })
    if command[:1] == ("history",):
        env["MESSENGER_STREAMS_HISTORY_DSN"] = NO_DB
    if command[:1] in (("pages",), ("admin",)):  # what they need before they reach for Kafka
        env.update({"MESSENGER_STREAMS_PAGES_KEY": PAGES_KEY, "MESSENGER_STREAMS_ADMIN_PASSWORD": "a-long-password",
                    "MESSENGER_STREAMS_ADMIN_PORT": str(free_port())})
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # stdin: nothing (a command that reads a token from it must say so, never wait for a terminal)
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)


def assert_one_line(res: subprocess.CompletedProcess[str], needle: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("messenger-streams: error: "), res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_every_command_has_a_way_to_run_here() -> None:
    leaves = set(leaf_commands(cli.build_parser()))
    assert leaves == set(HOW_TO_RUN), f"add the new commands to HOW_TO_RUN: {sorted(leaves - set(HOW_TO_RUN))}"


def test_every_command_with_the_broker_unreachable() -> None:
    def one(command: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        return run([*command, *HOW_TO_RUN[command][0]], base_env(command))

    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(HOW_TO_RUN, pool.map(one, HOW_TO_RUN), strict=True))
    for command, res in results.items():
        line = HOW_TO_RUN[command][1]
        if line is None:
            assert res.returncode == 0 and res.stderr == "", (command, res.stderr)
        else:
            assert_one_line(res, line)


def test_a_bad_variable_stops_every_command_with_one_line() -> None:
    """The issue's example: MESSENGER_STREAMS_WEBHOOK_PORT=x used to break every command with a traceback."""
    def one(command: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        return run([*command, *HOW_TO_RUN[command][0]], base_env(command, MESSENGER_STREAMS_WEBHOOK_PORT="x"))

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, HOW_TO_RUN))
    for res in [*results, run(["--help"], base_env(MESSENGER_STREAMS_WEBHOOK_PORT="x"))]:
        assert_one_line(res, "MESSENGER_STREAMS_WEBHOOK_PORT='x': Input should be a valid integer")


CANDIDATES = ("x", "-1", "0", "maybe", "a b", "not a url", "v", "{", "x" * 300)


def _bad_value(variable: str, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The first candidate the settings refuse for `variable`, if any (free text accepts them all)."""
    for value in CANDIDATES:
        monkeypatch.setenv(variable, value)
        try:
            load_settings()
        except ConfigError:
            return value
        finally:
            monkeypatch.delenv(variable)
    return None


def _is_free_text(info: Any) -> bool:
    kinds = set(get_args(info.annotation)) - {type(None)} or {info.annotation}
    return kinds <= {str, SecretStr} and not any(getattr(m, "pattern", None) for m in info.metadata)


def test_every_variable_with_a_bad_value_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("MESSENGER_STREAMS_") or name == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(name)
    checked = []
    for variable, info in sorted(known_variables().items()):
        bad = _bad_value(variable, monkeypatch)
        if bad is None:
            assert _is_free_text(info), f"{variable} ({info.annotation}) accepts every candidate value"
            continue
        monkeypatch.setenv(variable, bad)
        assert cli.main(["inspect", SAMPLE]) == 2, variable
        err = capsys.readouterr().err
        monkeypatch.delenv(variable)
        assert err.count("\n") == 1 and err.startswith(f"messenger-streams: error: environment: {variable}"), err
        if "SecretStr" in str(info.annotation):
            assert bad not in err  # a secret is never echoed
        checked.append(variable)
    for typed in ("MESSENGER_STREAMS_WEBHOOK_PORT", "MESSENGER_STREAMS_RATE_PER_PAGE", "MESSENGER_STREAMS_PARTITIONS",
                  "MESSENGER_STREAMS_PUBLISH_EVENTS", "MESSENGER_STREAMS_TOPIC_RAW", "KAFKA_BOOTSTRAP_SERVERS",
                  "MESSENGER_STREAMS_PAGE_TOKENS", "MESSENGER_STREAMS_LOG_LEVEL",
                  # issue 14: the onboarding variables
                  "MESSENGER_STREAMS_PAGES_KEY", "MESSENGER_STREAMS_ADMIN_PORT", "MESSENGER_STREAMS_ADMIN_PUBLIC_URL",
                  "MESSENGER_STREAMS_FACEBOOK_DIALOG_URL", "MESSENGER_STREAMS_TOPIC_PAGES",
                  "MESSENGER_STREAMS_TOPIC_PAGES_ACTIVITY",
                  # #15: the relay and order topics
                  "MESSENGER_STREAMS_TOPIC_RELAY", "MESSENGER_STREAMS_TOPIC_ORDERS",
                  "MESSENGER_STREAMS_TOPIC_ORDERS_UNMATCHED"):
        assert typed in checked


def test_unknown_variable_is_a_warning_naming_the_closest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESSENGER_STREAMS_WEB_PROT", "7000")
    monkeypatch.setenv("MESSENGER_STREAMS_TOPIC_RAWW", "x")
    assert cli.main(["inspect", SAMPLE]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "messenger-streams: warning: unknown environment variable MESSENGER_STREAMS_TOPIC_RAWW "
        "(did you mean MESSENGER_STREAMS_TOPIC_RAW?)",
        "messenger-streams: warning: unknown environment variable MESSENGER_STREAMS_WEB_PROT "
        "(did you mean MESSENGER_STREAMS_WEB_PORT?)",
    ]
    assert unknown_variables({"MESSENGER_STREAMS_WEB_PORT": "1", "PATH": "/bin"}) == []


def test_every_variable_the_code_reads_is_in_the_catalogue() -> None:
    """A MESSENGER_STREAMS_* name anywhere in the code or the deploy scripts is a known setting, so
    `load_settings` validates it and nobody gets an "unknown variable" warning for it."""
    known = set(known_variables())
    files = [*ROOT.glob("streams/**/*.py"), *ROOT.glob("deploy/*.sh"), ROOT / "Makefile"]
    found = {
        (name, path.relative_to(ROOT).as_posix())
        for path in files
        for name in re.findall(r"\bMESSENGER_STREAMS_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())
    }
    assert found, "the scan found nothing: the pattern is wrong"
    unknown = sorted((name, where) for name, where in found if name not in known)
    assert not unknown, f"declare these in streams/core/settings.py: {unknown}"


def test_env_defaults_of_the_commands_are_validated(tmp_path: Path) -> None:
    res = run(["dispatch"], base_env(MESSENGER_STREAMS_RATE_PER_PAGE="abc"))  # used to be silently ignored
    assert_one_line(res, "MESSENGER_STREAMS_RATE_PER_PAGE='abc'")
    res = run(["inspect", SAMPLE], base_env(MESSENGER_STREAMS_PAGE_TOKENS="not json"))
    assert_one_line(res, "MESSENGER_STREAMS_PAGE_TOKENS: must be a JSON object")
    assert "not json" not in res.stderr


def test_worker_with_its_web_port_taken_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run(["worker"], base_env(MESSENGER_STREAMS_WEB_HOST="127.0.0.1", MESSENGER_STREAMS_WEB_PORT=str(port)))
    assert_one_line(res, f"cannot listen on 127.0.0.1:{port} (MESSENGER_STREAMS_WEB_PORT)")

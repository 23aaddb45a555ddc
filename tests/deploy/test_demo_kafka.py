"""The newcomer's path: `make run`'s script (deploy/run-demo.sh) on a fresh topic prefix and app id
starts the same processes as `make run`; the summary shows consumer messages and a CSAT %; the
admin page's URL and demo password are printed and sign in to the demo's pages; Ctrl-C (SIGINT to
the script's process group, as a terminal sends it) stops everything within 10 s."""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.kafkatools import ROOT, free_port

pytestmark = pytest.mark.kafka

STARTUP = 120.0  # for the worker to answer at all, on a loaded machine
TRAFFIC = 60.0  # from the worker's first answer to a CSAT % on the screen
STOP_PROMISE = 10.0


def descendants(root: int) -> set[int]:
    """Every live process below `root` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rpartition(")")[2].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def started_in(directory: Path) -> set[int]:
    """Live processes whose command line names `directory` (the embedded PostgreSQL the worker and
    the history sink start there is a daemon, not a child)."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(directory).encode() in cmdline.read_bytes():
                found.add(int(cmdline.parent.name))
        except OSError:
            continue
    return {p for p in found if running(p)}


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def screens(text: str) -> list[str]:
    """The summary's plain-text screens so far (a pipe gets one block per interval)."""
    return [b for b in re.split(r"(?=^messenger-streams summary )", text, flags=re.M) if b.startswith("messenger")]


def shows_traffic(screen: str) -> bool:
    message = re.search(r"^  message +(\d+) ", screen, re.M)
    csat = re.search(r"^(billing|support|general) +\d+ +(\d+\.\d) +\d+$", screen, re.M)
    return bool(message and int(message.group(1)) > 0 and csat)


def signs_in(base: str, password: str) -> bool:
    """Sign in to the admin page with `password`: the pages list with the demo's pages comes back."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    deadline = time.monotonic() + 60
    while True:  # the admin page starts once it has read the page directory
        try:
            form = opener.open(base + "login", timeout=10).read().decode()  # noqa: S310 - a local test server
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    data = urllib.parse.urlencode({"password": password, **({"csrf": csrf.group(1)} if csrf else {})}).encode()
    page = opener.open(base + "login", data=data, timeout=10).read().decode()  # noqa: S310
    demo_pages = ("1691462197845448", "298733926841562", "111899832631525")  # deploy/connector.example.toml
    return "Activate Facebook source" in page and all(p in page for p in demo_pages)


def terminal_signals() -> None:
    """Start the demo as a terminal would: with SIGINT at its default. Run from a background job
    (`nohup make test &`), pytest inherits SIGINT ignored, and a shell cannot trap a signal ignored
    on entry: the script would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_newcomer_demo_shows_traffic_and_stops_on_ctrl_c(kafka_bootstrap: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_STREAMS_")}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "MESSENGER_STREAMS_APP_ID": f"demo-test-{tag}",
        "MESSENGER_STREAMS_TOPIC_PREFIX": f"demo{tag}.",
        "MESSENGER_STREAMS_WEB_PORT": str(free_port()),
        "MESSENGER_STREAMS_ADMIN_PORT": str(free_port()),
        "DEMO_DIR": str(tmp_path / "demo"),
        "RATE": "40",
        "SUMMARY_INTERVAL": "1",
    })
    out = tmp_path / "demo.out"
    proc = subprocess.Popen([str(ROOT / "deploy" / "run-demo.sh")], cwd=ROOT, env=env, stdout=open(out, "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=terminal_signals)
    seen: set[int] = set()
    try:
        start = time.monotonic()
        first_answer: float | None = None
        while True:
            seen |= descendants(proc.pid)
            assert proc.poll() is None, out.read_text()[-3000:]
            text = out.read_text(errors="replace")
            shown = screens(text)
            if shown and first_answer is None:
                first_answer = time.monotonic()
            if shown and shows_traffic(shown[-1]):
                break
            now = time.monotonic()
            assert first_answer is not None or now - start < STARTUP, f"no worker answer in {STARTUP}s:\n{text[-3000:]}"
            assert first_answer is None or now - first_answer < TRAFFIC, f"no traffic in {TRAFFIC}s:\n{text[-3000:]}"
            time.sleep(0.5)
        print(f"worker answered after {first_answer - start:.1f}s, CSAT % shown after {time.monotonic() - start:.1f}s")
        seen |= descendants(proc.pid) | started_in(tmp_path / "demo")
        names = {Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode() for p in seen if running(p)}
        for command in ("messenger-streams worker", "messenger-streams history sink", "messenger-streams simulate",
                        "messenger-streams summary", "messenger-streams admin", "postgres"):
            assert any(command in n for n in names), (command, names)
        # issue 14: the admin page's URL and a demo password are printed, and the page answers with them
        admin = re.search(r"^admin page: (http://127\.0\.0\.1:(\d+)/) +password: (\S+)$", text, re.M)
        assert admin and admin.group(2) == env["MESSENGER_STREAMS_ADMIN_PORT"], text[-3000:]
        assert signs_in(admin.group(1), admin.group(3)), f"the admin page refused its demo password:\n{text[-3000:]}"

        stop = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
        deadline = stop + STOP_PROMISE
        while (proc.poll() is None or any(running(p) for p in seen)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = sorted(p for p in seen if running(p))
        assert proc.poll() is not None and not left, f"still running {STOP_PROMISE}s after SIGINT: {left}"
        print(f"everything exited {time.monotonic() - stop:.1f}s after SIGINT")
        assert proc.returncode == 0
        assert out.read_text().rstrip().splitlines()[-1].startswith("stopped")
    finally:
        for pid in [*seen, proc.pid]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)

"""The live summary: what it shows, how it draws, and that SIGINT/SIGTERM end it at once."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streams.commands.summary import Screen, render, run_summary, sibling_url
from tests.kafkatools import ROOT

CLI = str(ROOT / ".venv" / "bin" / "messenger-streams")


def samples(messages: float, letters: float) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    return {
        "messenger_raw_bodies_total": {(): messages + 10},
        "messenger_events_in_total": {(("kind", "message"),): messages, (("kind", "read"),): 4.0},
        "messenger_dead_letters_total": {(("reason", "invalid_json"),): letters},
        "messenger_open_conversations": {(("skill", "billing"),): 3.0, (("skill", "support"),): 1.0},
        "messenger_csat_percent": {(("skill", "billing"),): 75.0},
        "messenger_csat_answers_total": {(("score", "5"), ("skill", "billing")): 3.0,
                                         (("score", "1"), ("skill", "billing")): 1.0},
    }


def test_render_shows_totals_rates_skills_and_urls() -> None:
    lines = render(samples(120, 6), samples(100, 2), 4.0, "http://127.0.0.1:6066/metrics")
    text = "\n".join(lines)
    assert ("metrics http://127.0.0.1:6066/metrics   CSAT http://127.0.0.1:6066/csat   "
            "history http://127.0.0.1:6066/conversations") in text
    row = {line.split()[0]: line.split()[1:] for line in lines if line.strip()}
    assert row["message"] == ["120", "5.0"]  # (120 - 100) / 4 s
    assert row["invalid_json"] == ["6", "1.0"]
    assert row["read"] == ["4", "0.0"]
    assert row["billing"] == ["3", "75.0", "4"]  # open, CSAT %, answers
    assert row["support"] == ["1", "-", "0"]
    first = render(samples(120, 6), None, 0.0, "")
    assert [ln.split()[1:] for ln in first if ln.split()[:1] == ["message"]] == [["120", "-"]]


def test_sibling_url() -> None:
    assert sibling_url("http://h:1/metrics", "/csat") == "http://h:1/csat"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_is_redrawn_in_place_and_a_pipe_gets_plain_blocks() -> None:
    tty = FakeTTY()
    screen = Screen(tty, tty=True)
    screen.show(["a", "b"])
    screen.show(["c"])
    screen.close()
    out = tty.getvalue()
    assert out.startswith("\x1b[?25l\x1b[2J\x1b[H")  # first frame: clear once
    assert out.count("\x1b[2J") == 1 and out.count("\x1b[H") == 2  # later frames: home, overwrite
    assert "c\x1b[K\n\x1b[J" in out and out.endswith("\x1b[?25h")
    pipe = io.StringIO()
    plain = Screen(pipe, tty=False)
    plain.show(["a", "b"])
    plain.show(["c"])
    assert pipe.getvalue() == "a\nb\n\nc\n\n"


@pytest.fixture
def metrics_server() -> Iterator[str]:
    body = (
        b"# TYPE messenger_events_in counter\n"
        b'messenger_events_in_total{kind="message"} 7.0\n'
        b"# TYPE messenger_csat_percent gauge\n"
        b'messenger_csat_percent{skill="billing"} 80.0\n'
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()


def test_once_prints_one_plain_screen(metrics_server: str) -> None:
    out = io.StringIO()
    assert run_summary(metrics_server, once=True, out=out) == 0
    text = out.getvalue()
    assert "message" in text and "80.0" in text and text.count("messenger-streams summary") == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_summary_even_inside_a_request(sig: signal.Signals) -> None:
    """A worker that accepts the connection and never answers: the summary sits in its HTTP request
    (2 s timeout) almost all the time; the signal must end it there, not be swallowed and retried."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/metrics"
        proc = subprocess.Popen([CLI, "summary", "--url", url, "--interval", "0.05"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            conn = None
            silent.settimeout(1.0)
            while conn is None and time.monotonic() < deadline:  # until the summary is inside a request
                try:
                    conn, _ = silent.accept()
                except TimeoutError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert conn is not None
            sent = time.monotonic()
            proc.send_signal(sig)
            assert proc.wait(10) == 0
            assert time.monotonic() - sent < 2.0  # not after the request's timeout, nor a retry
            assert b"Traceback" not in (proc.stderr.read() if proc.stderr else b"")
            conn.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

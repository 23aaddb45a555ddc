"""A live summary of a running worker, read from its /metrics: `messenger-streams summary`.

On a terminal it redraws one screen in place, like `top`; otherwise (a pipe, a file) it prints one
plain block per interval. Totals come from the worker's counters, rates per second from the
difference between two scrapes. SIGINT and SIGTERM end it at once, even inside an HTTP request.
"""

from __future__ import annotations

import signal
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

from streams.core.process import CliError

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]

# (label, counter sample name, label to break it down by, or None)
COUNTERS: tuple[tuple[str, str, str | None], ...] = (
    ("raw bodies", "messenger_raw_bodies_total", None),
    ("events in", "messenger_events_in_total", "kind"),
    ("duplicates dropped", "messenger_duplicates_dropped_total", None),
    ("dead letters", "messenger_dead_letters_total", "reason"),
    ("console events", "messenger_console_events_total", None),
    ("outbound requests", "messenger_outbound_requests_total", None),
    ("actions rejected", "messenger_actions_rejected_total", None),
)


def scrape(url: str, timeout: float = 2.0) -> Samples:
    """Samples of one scrape: name → {sorted label pairs → value}."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-given URL
        text = resp.read().decode("utf-8")
    out: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def _by(samples: dict[tuple[tuple[str, str], ...], float], label: str) -> dict[str, float]:
    acc: dict[str, float] = defaultdict(float)
    for labels, value in samples.items():
        acc[dict(labels).get(label, "")] += value
    return dict(acc)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def sibling_url(metrics_url: str, path: str) -> str:
    """The worker's URL of another page (`/csat`) next to its /metrics URL."""
    parts = urlsplit(metrics_url)
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def render(m: Samples, prev: Samples | None = None, elapsed: float = 0.0, url: str = "") -> list[str]:
    """The summary screen for one scrape (`prev`, `elapsed`: the scrape before and the seconds since)."""

    def rate(name: str, key: str | None, label: str | None) -> str:
        if prev is None or elapsed <= 0:
            return "-"
        now = m.get(name, {})
        before = prev.get(name, {})
        if label is None:
            delta = sum(now.values()) - sum(before.values())
        else:
            delta = _by(now, label).get(key or "", 0.0) - _by(before, label).get(key or "", 0.0)
        return f"{max(delta, 0.0) / elapsed:.1f}"

    lines = [f"messenger-streams summary  {time.strftime('%H:%M:%S')}   Ctrl-C to stop"]
    if url:
        lines.append(f"metrics {url}   CSAT {sibling_url(url, '/csat')}   history {sibling_url(url, '/conversations')}")
    lines += ["", f"{'':28}{'total':>10}{'per s':>10}"]
    for title, name, label in COUNTERS:
        samples = m.get(name, {})
        lines.append(f"{title:28}{_num(sum(samples.values())):>10}{rate(name, None, None):>10}")
        if label is not None:
            for key, value in sorted(_by(samples, label).items()):
                lines.append(f"  {key:26}{_num(value):>10}{rate(name, key, label):>10}")
    opened = _by(m.get("messenger_open_conversations", {}), "skill")
    percent = _by(m.get("messenger_csat_percent", {}), "skill")
    answers = _by(m.get("messenger_csat_answers_total", {}), "skill")
    skills = sorted(set(opened) | set(percent) | set(answers))
    lines += ["", f"{'skill':28}{'open':>10}{'CSAT %':>10}{'answers':>10}"]
    for skill in skills:
        pct = f"{percent[skill]:.1f}" if skill in percent else "-"
        lines.append(f"{skill:28}{_num(opened.get(skill, 0)):>10}{pct:>10}{_num(answers.get(skill, 0)):>10}")
    if not skills:
        lines.append("(no conversations yet)")
    return lines


class Interrupted(BaseException):
    """SIGINT or SIGTERM: raised from the signal handler so no `except` around a request swallows it."""


@contextmanager
def _interruptible() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Interrupted:
        pass
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


@dataclass
class Screen:
    """Where the summary goes: redrawn in place on a terminal, appended blocks otherwise."""

    out: TextIO
    tty: bool
    drawn: bool = False

    def show(self, lines: list[str]) -> None:
        if self.tty:
            # home, each line cleared to its end, then everything below cleared: no flicker
            head = "\x1b[?25l\x1b[H" if self.drawn else "\x1b[?25l\x1b[2J\x1b[H"
            self.out.write(head + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        else:
            self.out.write("\n".join(lines) + "\n\n")
        self.out.flush()
        self.drawn = True

    def close(self) -> None:
        if self.tty:
            self.out.write("\x1b[?25h")
            self.out.flush()


def run_summary(url: str, *, interval: float = 2.0, once: bool = False, out: TextIO | None = None) -> int:
    """Show the summary every `interval` seconds until SIGINT/SIGTERM (or once: exit 2 when the
    worker does not answer)."""
    stream = out or sys.stdout
    screen = Screen(stream, tty=stream.isatty())
    prev: tuple[Samples, float] | None = None
    last: list[str] | None = None
    with _interruptible():
        try:
            while True:
                try:
                    samples = scrape(url)
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    reason = getattr(exc, "reason", None) or exc
                    if once:
                        raise CliError(f"cannot read the worker's metrics at {url}: {reason}") from None
                    note = f"waiting for the worker at {url} ({reason})"
                    screen.show([*last, "", note] if last and screen.tty else [note])
                else:
                    now = time.monotonic()
                    last = render(samples, prev[0] if prev else None, now - prev[1] if prev else 0.0, url)
                    prev = (samples, now)
                    screen.show(last)
                if once:
                    return 0
                time.sleep(interval)
        finally:
            screen.close()
    return 0

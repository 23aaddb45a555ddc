"""Pieces for driving `messenger-streams dispatch` against the fake Graph API (tests/fakegraph.py),
shared by tests/edges/test_dispatch_kafka.py and the chaos suite (scenario e):

- `outbound(...)`: an OutboundRequest as the conversation stage writes it (metadata = outbox id);
- `DispatcherProcess`: the real command as a subprocess you can SIGKILL and restart;
- `audit_sends(graph, results, expected)`: what reached the fake Graph and what was reported, per
  outbox id: sent twice (goal: none), lost (neither delivered nor reported in doubt; goal: none),
  in doubt, and whether every `sent` result carries the mid the fake gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakegraph import FakeGraph
from tests.kafkatools import ROOT

PAGE = "1691462197845448"
PAGE2 = "298733926841562"


def outbound(psid: str, outbox_id: str, text: str = "hello", page: str = PAGE,
             request: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """One messenger.outbound value; a text request carries the outbox id as metadata, as the stage's do."""
    req = request or {"recipient": {"id": psid}, "messaging_type": "RESPONSE",
                      "message": {"text": text, "metadata": outbox_id}}
    return {"page_id": page, "psid": psid, "outbox_id": outbox_id, "conversation_id": f"c-{psid}",
            "origin": "agent", "request": req, "agent_id": "a1", "skill": "billing",
            "created_at": int(time.time() * 1000), **extra}


@dataclass
class DispatcherProcess:
    """`messenger-streams dispatch` as a subprocess (env: worker_env(...) plus the tokens and the
    fake's URL). `start()` returns once it is consuming; `kill()` is a SIGKILL."""

    env: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, timeout: float = 90.0) -> None:
        self.starts += 1
        marker = f"===== start {self.starts} ====="
        with open(self.log_path, "ab") as log:
            log.write(f"\n{marker}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(ROOT / ".venv/bin/messenger-streams"), "dispatch", *self.args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tail = self.log_tail(marker)
            if "dispatching " in tail:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"dispatch exited with {self.proc.returncode}:\n{tail[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"dispatch not ready within {timeout}s:\n{self.log_tail(marker)[-3000:]}")

    def log_tail(self, marker: str | None = None) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[text.rfind(marker):] if marker else text

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode


@dataclass
class SendAudit:
    """Per outbox id, what the fake Graph got and what the dispatcher reported."""

    expected: set[str]
    delivered: dict[str, int]  # outbox id → deliveries of its most repeated part (0: none)
    results: dict[str, list[dict[str, Any]]]
    sent_twice: dict[str, int]  # goal: empty
    in_doubt: set[str]  # reported `failed` / `in_doubt` (delivered or not: the echo tells)
    lost: set[str]  # reported `sent` but never delivered
    unreported: set[str]  # no SendResult at all
    inconsistent: set[str]  # results of one id disagree, a `sent` mid the fake never gave, or a delivered
    # message reported as a plain failure

    @property
    def ok(self) -> bool:
        return not (self.sent_twice or self.lost or self.unreported or self.inconsistent)

    def summary(self) -> dict[str, int]:
        return {
            "outbox_ids": len(self.expected),
            "delivered": sum(1 for oid in self.expected if self.delivered.get(oid)),
            "sent_twice": len(self.sent_twice),
            "lost": len(self.lost),
            "unreported": len(self.unreported),
            "in_doubt": len(self.in_doubt),
            "inconsistent": len(self.inconsistent),
        }


def audit_sends(graph: FakeGraph, results: Iterable[dict[str, Any]], expected: Iterable[str]) -> SendAudit:
    """Compare the fake Graph's deliveries with the SendResults of the `expected` outbox ids (their
    requests must carry the outbox id as `message.metadata`, as the conversation stage's do)."""
    want = set(expected)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_id.setdefault(str(r.get("outbox_id")), []).append(r)
    delivered: dict[str, int] = {oid: 1 for oid in graph.deliveries()}
    delivered.update(graph.duplicates())
    mids: dict[str, set[str]] = {}
    for req in graph.requests:
        if req.delivered and req.outbox_id is not None and req.mid is not None:
            mids.setdefault(req.outbox_id, set()).add(req.mid)
    in_doubt, lost, inconsistent = set(), set(), set()
    for oid in want & set(by_id):
        rs = by_id[oid]
        if len({(r.get("status"), r.get("reason"), r.get("mid")) for r in rs}) > 1:
            inconsistent.add(oid)
        last = rs[-1]
        if last.get("reason") == "in_doubt":
            in_doubt.add(oid)
        elif last.get("status") == "sent":
            if not delivered.get(oid):
                lost.add(oid)
            elif last.get("mid") not in mids.get(oid, set()):
                inconsistent.add(oid)
        elif delivered.get(oid) and last.get("reason") != "cancelled":
            inconsistent.add(oid)  # it reached the person but the console was told it failed
    return SendAudit(
        expected=want,
        delivered=delivered,
        results=by_id,
        sent_twice={oid: n for oid, n in delivered.items() if n > 1},
        in_doubt=in_doubt,
        lost=lost,
        unreported=want - set(by_id),
        inconsistent=inconsistent,
    )


@dataclass
class Directory:
    """The page directory a dispatcher test writes to (see `directory_pages`)."""

    settings: Any
    cipher: Any
    writer: Any
    prefix: str


@contextlib.asynccontextmanager
async def directory_pages(harness: Any, monkeypatch: Any, token: str) -> AsyncIterator[Directory]:
    """`connector.pages` for a dispatcher test (#14): PAGE active with `token` (encrypted, token id
    `t1`), PAGE2 switched off; the fake Graph demands an `appsecret_proof` on every call."""
    from schemas.pages import PageRecord
    from streams.core.pages import PagesWriter
    from streams.core.settings import Settings
    from streams.core.tokens import Secret, TokenCipher, generate_key

    harness.graph.require_proof = True
    prefix = harness.opts.outbound_topic.removesuffix("messenger.outbound")
    monkeypatch.setenv("MESSENGER_STREAMS_TOPIC_PREFIX", prefix)
    settings = Settings(bootstrap_servers=harness.opts.bootstrap_servers, partitions=2)
    cipher = TokenCipher([generate_key()])
    writer = PagesWriter(settings)
    await writer.start()
    try:
        await writer.put_page(PageRecord(page_id=PAGE, skill="billing", token=cipher.encrypt(Secret(token)),
                                         token_id="t1"))
        await writer.put_page(PageRecord(page_id=PAGE2, skill="support", enabled=False))
        yield Directory(settings, cipher, writer, prefix)
    finally:
        await writer.stop()


@contextlib.asynccontextmanager
async def serving(opts: Any, dispatcher: Any) -> AsyncIterator[asyncio.Task[Any]]:
    """The dispatcher served in process until the block ends (then stopped and awaited)."""
    from streams.edges.dispatch import serve

    stop, ready = asyncio.Event(), asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    task = asyncio.create_task(serve(opts, stop, on_ready=on_ready, dispatcher=dispatcher))
    await asyncio.wait([task, asyncio.create_task(ready.wait())], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    assert not task.done(), task.exception()
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)

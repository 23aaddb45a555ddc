"""Helpers of the onboarding tests (#14): webhook bodies, a topic watcher, running `messenger-streams`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from tests.kafkatools import ROOT

CLI = str(ROOT / ".venv" / "bin" / "messenger-streams")


def message_body(page_id: str, psid: str, text: str, mid: str | None = None) -> bytes:
    """A webhook body with one consumer text message to `page_id`."""
    now = int(time.time() * 1000)
    item = {"sender": {"id": psid}, "recipient": {"id": page_id}, "timestamp": now,
            "message": {"mid": mid or f"m_{uuid.uuid4().hex}", "text": text}}
    return orjson.dumps({"object": "page", "entry": [{"id": page_id, "time": now, "messaging": [item]}]})


class TopicWatch:
    """Follows a topic from its beginning (every partition) and waits for a record matching a predicate."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list[tuple[float, Any]] = []  # (monotonic arrival, decoded JSON value)
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []

    async def __aenter__(self) -> TopicWatch:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer.stop()

    async def _poll(self, timeout_ms: int = 200) -> None:
        c = self._consumer
        assert c is not None
        if not self._tps:
            await c._client.force_metadata_update()  # noqa: SLF001
            parts = c.partitions_for_topic(self.topic)
            if not parts:
                await asyncio.sleep(timeout_ms / 1000)
                return
            self._tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            c.assign(self._tps)
            await c.seek_to_beginning(*self._tps)
        batch = await c.getmany(*self._tps, timeout_ms=timeout_ms)
        now = time.monotonic()
        for recs in batch.values():
            for r in recs:
                self.records.append((now, orjson.loads(r.value) if r.value else None))

    async def wait(self, pred: Callable[[Any], bool], timeout: float = 30.0) -> tuple[float, Any]:
        """(arrival time, value) of the first record matching `pred`; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for at, value in self.records:
                if value is not None and pred(value):
                    return at, value
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching record on {self.topic} within {timeout}s "
                                     f"({len(self.records)} records seen)")
            await self._poll()


def run_cli(env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """`messenger-streams ARGS` with `env`, stdin text; returns the completed process (text output)."""
    return subprocess.run([CLI, *args], env=env, input=stdin if stdin is not None else "", capture_output=True,
                          text=True, timeout=timeout, check=False)


async def arun_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, env, *args, stdin=stdin)


def clean_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    out = dict(env)
    out.update(extra)
    out.setdefault("PATH", os.environ.get("PATH", ""))
    return out

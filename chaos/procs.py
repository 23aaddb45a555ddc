"""The processes a chaos scenario runs and breaks: its own Kafka broker, workers and dispatchers.

- `Broker`: a single-node KRaft broker from `deploy/kafka/localkafka.py` on free ports with its data
  under the run's temp dir; it can be stopped (SIGTERM or SIGKILL, reaping the JVM, which is our
  child) and started again on the same ports and data.
- `Managed`: one subprocess (`messenger-streams worker` or `dispatch`) with its log, readiness
  (a marker in the log since the last start) and a supervisor: an exit the harness did not cause
  is recorded and the process is started again, as systemd or Kubernetes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "kafka"))

import localkafka  # type: ignore[import-not-found]  # noqa: E402 - deploy/kafka is not a package

MAX_RESTARTS = 50  # unexpected exits of one process in one scenario before the supervisor gives up


free_port = localkafka.free_port


def bin_path(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here if here.exists() else ROOT / ".venv" / "bin" / name)


async def _reap(pid: int, timeout: float) -> bool:
    """Wait until `pid` is gone (reaping it when it is our child); False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return True
        except ChildProcessError:  # not our child: poll for its existence instead
            try:
                os.kill(pid, 0)
            except OSError:
                return True
        await asyncio.sleep(0.1)
    return False


class Broker:
    """Our own broker: `await up()`, `await stop(sig)`, `await up()` again (same ports, same data)."""

    def __init__(self, home: Path) -> None:
        self.kafka = localkafka.LocalKafka(home, port=free_port(), controller_port=free_port())

    @property
    def bootstrap(self) -> str:
        return str(self.kafka.bootstrap)

    async def up(self, timeout: float = 180.0) -> float:
        """Start (or start again) and wait until it serves metadata; returns the seconds it took."""
        t = time.monotonic()
        await asyncio.to_thread(self.kafka.up, timeout)
        return time.monotonic() - t

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        """Stop the broker keeping its data (SIGKILL after `timeout` when SIGTERM does not do it)."""
        pid = self.kafka.pid()
        if pid is None:
            return
        os.kill(pid, sig)
        if not await _reap(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            await _reap(pid, 30.0)
        with contextlib.suppress(OSError):
            self.kafka.pidfile.unlink()

    async def destroy(self) -> None:
        """Kill it and delete its data."""
        await self.stop(signal.SIGKILL)
        await asyncio.to_thread(shutil.rmtree, self.kafka.home, True)


@dataclass
class Exit:
    """An exit of a managed process: when (epoch s), its status, expected (we killed it) or not."""

    at: float
    returncode: int | None
    expected: bool
    tail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"at": round(self.at, 3), "returncode": self.returncode, "expected": self.expected,
                "tail": self.tail[-1500:] if not self.expected else ""}


@dataclass
class Managed:
    """A supervised subprocess. `restart_on_exit`: start it again after an exit we did not cause
    (and, when `restart_after_kill`, after our own kills too)."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    ready_marker: str
    restart_on_exit: bool = True
    restart_after_kill: bool = True
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    exits: list[Exit] = field(default_factory=list)
    ready_times: list[float] = field(default_factory=list)  # seconds from spawn to ready, per start
    started_at: float = 0.0
    ready_at: float | None = None
    _log_offset: int = 0
    _expect_exit: bool = False
    _supervisor: asyncio.Task[None] | None = None
    _stopping: bool = False
    gave_up: bool = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 240.0) -> float:
        """Spawn and wait until the ready marker appears in the log after this start."""
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== chaos: start {self.starts} of {self.name} =====\n".encode())
            self._log_offset = log.tell()
            self.proc = await asyncio.create_subprocess_exec(
                *self.cmd, env=self.env, stdout=log, stderr=asyncio.subprocess.STDOUT,
                cwd=self.env.get("MESSENGER_STREAMS_DATADIR", str(ROOT)),
            )
        self._expect_exit = False
        self.started_at = time.time()
        self.ready_at = None
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise {self.name}")
        await self.wait_ready(timeout)
        return self.ready_times[-1]

    async def wait_ready(self, timeout: float = 240.0) -> None:
        """Wait until the process of the latest start logged its ready marker."""
        deadline = time.monotonic() + timeout
        proc = self.proc
        while time.monotonic() < deadline:
            if self._log_since_start().find(self.ready_marker) >= 0:
                self.ready_at = time.time()
                self.ready_times.append(round(self.ready_at - self.started_at, 2))
                return
            if proc is None or proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {proc.returncode if proc else None}:\n{self.tail()}")
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready within {timeout:.0f}s:\n{self.tail()}")

    async def wait_start(self, count: int, timeout: float = 240.0) -> float:
        """Wait until the process has been started at least `count` times and that start is ready
        (the supervisor restarts it); returns the epoch time it became ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.starts >= count and self.ready_at is not None and self.alive:
                return self.ready_at
            if self.gave_up:
                raise RuntimeError(f"{self.name}: the supervisor gave up after {MAX_RESTARTS} exits")
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} not started again within {timeout:.0f}s:\n{self.tail()}")

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _errors_since_start(self, keep: int = 6) -> str:
        """The error lines this start logged (the first few and the last few), for an unexpected exit."""
        lines = [ln for ln in self._log_since_start().splitlines()
                 if any(m in ln for m in ("ERROR", "CRITICAL", "Crashed", "Error:", "error:"))]
        picked = lines if len(lines) <= 2 * keep else [*lines[:keep], "...", *lines[-keep:]]
        return "\n".join(ln[:400] for ln in picked) or self.tail(1500)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def _supervise(self) -> None:
        while not self._stopping:
            proc = self.proc
            if proc is None:
                return
            rc = await proc.wait()
            if self.proc is not proc:
                continue
            expected = self._expect_exit
            self.exits.append(Exit(time.time(), rc, expected, "" if expected else self._errors_since_start()))
            if self._stopping:
                return
            if expected and not self.restart_after_kill:
                return
            if not expected and not self.restart_on_exit:
                return
            if sum(1 for e in self.exits if not e.expected) > MAX_RESTARTS:
                self.gave_up = True
                return
            if not expected:  # a supervisor's restart delay, longer while it keeps failing
                failures = sum(1 for e in self.exits[-5:] if not e.expected)
                await asyncio.sleep(min(5.0, 0.5 * 2 ** (failures - 1)))
            try:
                await self.start()
            except RuntimeError:
                if self.proc is not None and self.proc.returncode is None:
                    continue  # alive but slow: keep supervising it
                if self.gave_up:
                    return
                continue

    def kill(self, sig: int = signal.SIGKILL) -> float:
        """Send `sig` (an expected exit); returns the time (epoch s) it was sent."""
        self._expect_exit = True
        at = time.time()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
        return at

    async def wait_exit(self, timeout: float = 60.0) -> None:
        if self.proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop for good: SIGTERM, SIGKILL after `timeout`; no restart."""
        self._stopping = True
        self._expect_exit = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 10)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor

    def summary(self) -> dict[str, Any]:
        return {
            "starts": self.starts,
            "ready_seconds": self.ready_times,
            "kills": sum(1 for e in self.exits if e.expected),
            "unexpected_exits": [e.as_dict() for e in self.exits if not e.expected],
            "gave_up": self.gave_up,
        }

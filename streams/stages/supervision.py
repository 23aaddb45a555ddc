"""How the worker process fails and stops: loudly, and in bounded time.

- An exception escaping any agent's loop stops the worker: one CRITICAL line names the agent and
  the cause, the worker stops like on SIGTERM and exits with status 1, so a supervisor (systemd,
  Kubernetes) restarts it. Faust's default restarts the agent in place, up to 100 times a second,
  which on a deterministic failure leaves a worker that consumes nothing and still looks alive.
  An actor cancelled by a rebalance is still restarted in place: that is not a failure.
- A crash of the app itself (a timer, a task, a rebalance callback) also exits with status 1,
  with one CRITICAL line.
- From the moment the worker starts stopping (SIGINT, SIGTERM, a crash) it has
  STOP_DEADLINE_SECONDS to finish, else the process exits at once (status 1) with one line on
  stderr: a stop must not hang on a broker that went away, a recovery in progress, or a stuck task.

`supervise(app)` installs both on a Faust app (create_app calls it).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Iterable
from typing import Any, NoReturn

import faust
from mode.supervisors import OneForOneSupervisor
from mode.utils.futures import maybe_cancel

from streams.core.process import STOP_DEADLINE_SECONDS, arm_on_stop_signals, start_deadline

log = logging.getLogger("messenger_streams")

EXIT_FAILURE = 1


def describe(exc: BaseException) -> str:
    """`Type: first line of the message` for one log line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StreamsWorker(faust.Worker):
    """Faust's worker with a stop deadline and a failure exit status (see the module doc)."""

    stop_deadline: float = STOP_DEADLINE_SECONDS

    @property
    def shortlabel(self) -> str:
        return "Worker"  # the log says "[^Worker]: Ready" as with Faust's own worker (tests and bench wait for it)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failure: str | None = None
        self._deadline: threading.Timer | None = None

    async def on_startup_finished(self) -> None:
        # before faust logs "Ready": the full collection takes 50-100 ms, which would otherwise
        # hold up the first records of whoever starts sending on that line (the bench does)
        settle_heap()
        await super().on_startup_finished()

    # --- failing ---------------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """Log `message` (once) and stop the worker; it will exit with status 1."""
        if self.failure is None:
            self.failure = message
            log.critical("%s; stopping the worker (exit status %d)", message, EXIT_FAILURE)
        self._stop_soon()

    def _stop_soon(self) -> None:
        # The same path as mode's signal handler (Worker._schedule_shutdown), without a signal.
        self._arm_deadline("a crash")
        if not self._signal_stop_time:
            self._signal_stop_time = self.loop.time()
            self._signal_stop_future = asyncio.ensure_future(self._stop_after_failure(), loop=self.loop)

    async def _stop_after_failure(self) -> None:
        await self.stop()
        maybe_cancel(self._starting_fut)

    # --- stopping --------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        super().install_signal_handlers()
        arm_on_stop_signals(self._arm_deadline)  # also when the loop is blocked and mode never hears it

    def _schedule_shutdown(self, signal: Any) -> None:  # mode calls it on SIGINT and SIGTERM
        self._arm_deadline(f"{getattr(signal, 'name', signal)}")
        super()._schedule_shutdown(signal)

    def on_worker_shutdown(self) -> None:
        """Every way out of the worker passes here: a signal, a failure, or a crash of the app."""
        if self.crash_reason is not None and self.failure is None:
            self.failure = f"worker crashed: {describe(self.crash_reason)}"
            log.critical("%s; stopping the worker (exit status %d)", self.failure, EXIT_FAILURE)
        self._arm_deadline("a crash" if self.failure else "shutdown")
        super().on_worker_shutdown()

    def _arm_deadline(self, why: str) -> None:
        if self._deadline is None:
            self._deadline = start_deadline(self.stop_deadline, f"{why} (worker)", EXIT_FAILURE)

    def execute_from_commandline(self) -> NoReturn:
        code: Any = 0
        try:
            super().execute_from_commandline()
        except SystemExit as exc:
            code = exc.code
        if self._deadline is not None:
            self._deadline.cancel()
        raise SystemExit(EXIT_FAILURE if self.failure is not None else code)


# young collections every 20,000 net allocations instead of 700: the stages allocate and free many
# small objects per event; measured +5% drain rate (docs/benchmarks.md), garbage cycles still collected
GC_THRESHOLDS = (20_000, 20, 20)


def settle_heap() -> None:
    """Move what start-up built (modules, faust's services, the recovered tables) out of the
    collector's sight: `gc.freeze()` after one full collection. Without it every full collection
    walks that whole heap again: ~50 ms every ~5 s under live load, the slowest arrivals of the
    bench's latency runs (docs/benchmarks.md). Objects made later are collected as usual; objects
    frozen here are still freed by reference counting, only a cycle among them would stay."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info("heap settled: %d objects frozen out of the collector's walk", gc.get_freeze_count())


def _worker_of(app: faust.App) -> StreamsWorker | None:
    root = app.beacon.root
    data = getattr(root, "data", None)
    return data if isinstance(data, StreamsWorker) else None


class StopWorkerSupervisor(OneForOneSupervisor):
    """Supervises every agent's actors: a crash stops the worker; a rebalance restarts the actor."""

    async def restart_services(self, services: Iterable[Any]) -> None:
        services = list(services)
        for service in services:
            reason = service.crash_reason
            if reason is not None and not isinstance(reason, asyncio.CancelledError):
                agent = getattr(service, "agent", None)
                name = getattr(agent, "name", None) or repr(service)
                await fail_worker(agent.app if agent is not None else None, f"agent {name} crashed: {describe(reason)}",
                                  reason)
                return
        await super().restart_services(services)


async def fail_worker(app: faust.App | None, message: str, reason: BaseException) -> None:
    """Stop the worker running `app` because of `reason` (exit status 1)."""
    worker = _worker_of(app) if app is not None else None
    if worker is not None:
        worker.fail(message)
    elif app is not None:  # not run by our worker (e.g. a test harness): let mode crash the process
        log.critical("%s; crashing the app", message)
        await app.crash(reason)


def supervise(app: faust.App) -> None:
    """Install the crash and stop policy of the module doc on `app`."""
    # faust types these settings as SymbolArg (a class or its dotted name); mypy sees a special form
    app.conf.agent_supervisor = StopWorkerSupervisor  # type: ignore[assignment]
    app.conf.Worker = StreamsWorker  # type: ignore[assignment]

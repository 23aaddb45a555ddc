"""What every command and edge process shares: the user-facing error, logging, and the signal runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType
from typing import Any


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def configure_logging(level: str) -> None:
    """Plain stderr logging for the non-Faust commands (webhook, dispatch) at the settings' level."""
    name = {"WARN": "WARNING", "CRIT": "CRITICAL"}.get(level.upper(), level.upper())
    logging.basicConfig(
        level=getattr(logging, name, logging.WARNING), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiokafka").setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_kafka_startup() -> Iterator[None]:
    """aiokafka logs every failed connection at ERROR; during start-up our one-line error says it all."""
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


STOP_DEADLINE_SECONDS = 8.0  # from a stop signal to the process' end, whatever it is doing
CANCEL_AFTER_SECONDS = 5.0  # a serve() still running this long after the signal is cancelled


def start_deadline(seconds: float, why: str, status: int = 1) -> threading.Timer:
    """After `seconds`, unless cancelled: one line on stderr and the process exits at once.

    A thread, so it fires even when the event loop is blocked; the line goes to file descriptor 2
    because sys.stderr may be redirected (Faust sends it to the log)."""

    def give_up() -> None:
        line = f"messenger-streams: did not stop within {seconds:.0f}s after {why}; exiting now\n"
        with contextlib.suppress(OSError):
            os.write(2, line.encode())
        os._exit(status)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    return timer


def arm_on_stop_signals(arm: Callable[[str], None]) -> None:
    """Call `arm(signal name)` from the Python-level handler of SIGINT and SIGTERM, after the event
    loop registered its own: the loop still learns of the signal through its wakeup fd, and `arm`
    runs even while the loop is blocked (a stuck call), so a stop deadline starts in every state."""

    def handler(signum: int, frame: FrameType | None) -> None:
        arm(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def run_until_signalled(
    serve: Callable[[asyncio.Event], Awaitable[None]],
    *,
    cancel_after: float = CANCEL_AFTER_SECONDS,
    deadline: float = STOP_DEADLINE_SECONDS,
) -> None:
    """Run `serve(stop)` on a new loop until it returns; SIGTERM and SIGINT set `stop` (webhook, dispatch).

    Stopping is bounded in every state: a `serve` still running `cancel_after` seconds after the
    signal (still connecting, the broker gone, a flush that cannot finish) is cancelled, and a
    process still alive `deadline` seconds after it exits at once with status 1 (`start_deadline`)."""
    timers: list[threading.Timer] = []

    def arm(why: str) -> None:
        if not timers:
            timers.append(start_deadline(deadline, why))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(serve(stop))

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                return
            stop.set()
            arm(sig.name)
            loop.call_later(cancel_after, task.cancel)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        arm_on_stop_signals(arm)
        try:
            await task
        except asyncio.CancelledError:
            if not stop.is_set():
                raise

    try:
        asyncio.run(main())
    finally:
        for timer in timers:
            timer.cancel()


async def start_client(client: Any) -> None:
    """`await client.start()` for an aiokafka producer, consumer or admin client, stopping the client
    when starting fails (an unreachable broker), so no "Unclosed ..." warning follows our one line."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.stop()
        raise

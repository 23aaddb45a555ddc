"""What every command and edge process shares: the user-facing error, logging, and the signal runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator


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


def run_until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `serve(stop)` on a new loop; SIGTERM and SIGINT set `stop` (webhook, dispatch)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    asyncio.run(main())

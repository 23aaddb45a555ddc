"""messenger-streams: the Facebook Messenger connector core, on Faust and Apache Kafka."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.app import Pipeline

__version__ = "0.1.0"


def _ingest(pipe: Pipeline) -> None:
    from streams import ingest

    ingest.register(pipe)


def _web(pipe: Pipeline) -> None:
    from streams import web

    web.register(pipe)


# Stage name → registration, in start-up order. Later issues add their stages here.
STAGES: dict[str, Callable[[Pipeline], None]] = {
    "ingest": _ingest,
    "web": _web,
}

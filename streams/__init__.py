"""messenger-streams: the Facebook Messenger connector core, on Faust and Apache Kafka."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.app import Pipeline

__version__ = "0.1.0"

# Stage name → module with `register(pipeline)`, in start-up order.
STAGE_MODULES: dict[str, str] = {
    "ingest": "streams.ingest",
    "conversations": "streams.conversations",
    "csat": "streams.csat_stage",
    "web": "streams.web",
}


def _registrar(module: str) -> Callable[[Pipeline], None]:
    def register(pipe: Pipeline) -> None:
        importlib.import_module(module).register(pipe)

    return register


STAGES: dict[str, Callable[[Pipeline], None]] = {
    name: _registrar(module)
    for name, module in STAGE_MODULES.items()
    if importlib.util.find_spec(module) is not None
}

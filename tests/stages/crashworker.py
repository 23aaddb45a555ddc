"""A real worker (every stage, the same start-up, supervision and uvloop) plus one test agent on
`<prefix>crash.me`: run as `python -m tests.stages.crashworker KIND` with a worker's environment.

KIND `agent`: the agent raises on any record; `timer`: a timer raises once a record arrived;
`block`: the agent blocks the event loop on a record (a stuck synchronous call)."""

from __future__ import annotations

import mode.loop

mode.loop.use("uvloop")  # as `messenger-streams worker` does, before faust is imported

import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from streams.core.config import load_config  # noqa: E402
from streams.core.settings import load_settings  # noqa: E402
from streams.stages.app import create_pipeline  # noqa: E402
from streams.stages.startup import run_worker  # noqa: E402


class Boom(RuntimeError):
    """What the test agent raises."""


def main(kind: str) -> int:
    settings = load_settings()
    pipe = create_pipeline(settings, load_config())
    topic = pipe.raw_topic(settings.topics.prefix + "crash.me")
    seen: list[bytes] = []

    @pipe.app.agent(topic, name="explode")
    async def explode(stream: Any) -> None:
        async for value in stream:
            if kind == "agent":
                raise Boom(f"cannot handle {value!r}")
            if kind == "block":
                logging.getLogger("messenger_streams").warning("blocking the event loop")
                time.sleep(3600)
            seen.append(value)

    @pipe.app.timer(0.2)
    async def tick() -> None:
        if kind == "timer" and seen:
            raise Boom("timer gave up")

    return run_worker(pipe, loop="uvloop", extra_args=[])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

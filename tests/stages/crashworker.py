"""A real worker (every stage, the same start-up and supervision) plus one agent that raises on
any record of `<prefix>crash.me`, or one timer that raises once `<prefix>crash.timer` has a record:
run as `python -m tests.stages.crashworker agent|timer` with a worker's environment."""

from __future__ import annotations

import sys
from typing import Any

from streams.core.config import load_config
from streams.core.settings import load_settings
from streams.stages.app import create_pipeline
from streams.stages.startup import run_worker


class Boom(RuntimeError):
    """What the test agent raises."""


def main(kind: str) -> int:
    settings = load_settings()
    pipe = create_pipeline(settings, load_config())
    topic = pipe.raw_topic(settings.topics.prefix + "crash.me")

    if kind == "agent":

        @pipe.app.agent(topic, name="explode")
        async def explode(stream: Any) -> None:
            async for value in stream:
                raise Boom(f"cannot handle {value!r}")

    else:
        seen: list[bytes] = []

        @pipe.app.agent(topic, name="note")
        async def note(stream: Any) -> None:
            async for value in stream:
                seen.append(value)

        @pipe.app.timer(0.2)
        async def tick() -> None:
            if seen:
                raise Boom("timer gave up")

    return run_worker(pipe, loop="aio", extra_args=[])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

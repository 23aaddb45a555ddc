"""Arm B: a faust null agent, the framework floor. Each input record is forwarded unchanged to one
output topic by one agent, on an app built by `streams.app.create_app` (the worker's own settings:
uvloop, Cython paths, acks, linger, batch size, commit interval, partitioner).

Run as `python -m bench.nullagent --out TOPIC IN_TOPIC...` with the worker's MESSENGER_STREAMS_*
environment; it logs faust's "[^Worker]: Ready" once consuming. The faust-streaming
`tests/bench/forward.py` pattern, with the producer call the worker uses for its outputs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.nullagent", description=__doc__)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import mode.loop

    mode.loop.use("uvloop")  # before faust is imported, as the worker does
    from streams.core.settings import load_settings
    from streams.stages.app import create_app

    settings = load_settings()
    app = create_app(settings)
    channel = app.topic(*args.inputs, key_type=bytes, value_type=bytes, key_serializer="raw",
                        value_serializer="raw", partitions=settings.partitions)
    out = args.out

    @app.agent(channel, name="forward")
    async def forward(stream: Any) -> None:
        send = app.producer.send
        async for event in stream.events():
            msg = event.message
            await send(out, msg.key, event.value, msg.partition if msg.key is None else None, None, None)

    sys.argv = ["bench.nullagent", "-L", "uvloop", "worker", "-l", settings.log_level]
    app.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())

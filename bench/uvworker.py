"""`messenger-streams worker` with uvloop installed *before* faust is imported (experiment).

faust reads `-L uvloop` from sys.argv when `faust` is first imported; `streams.cli.cmd_worker`
sets sys.argv only after `streams.app` imported faust, so the worker runs on the pure-Python
asyncio loop. `python -m bench.run --force-uvloop` starts the workers through this module to
measure what the fix is worth.
"""

from __future__ import annotations

import sys

import mode.loop

mode.loop.use("uvloop")

from streams.cli import main  # noqa: E402 - after the loop policy on purpose

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))

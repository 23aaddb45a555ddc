"""The signal runner of `webhook` and `dispatch`: a stop is bounded whatever `serve` is doing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.kafkatools import ROOT

PROGRAM = """
import asyncio, sys, time
from streams.core.process import run_until_signalled

async def serve(stop):
    print("serving", flush=True)
    if sys.argv[1] == "polite":
        await stop.wait()
    elif sys.argv[1] == "deaf":      # still connecting, or a flush to a broker that went away
        await asyncio.sleep(3600)
    else:                            # a stuck synchronous call: the loop never runs again
        time.sleep(3600)

run_until_signalled(serve, cancel_after=2.0, deadline=4.0)
print("returned", flush=True)
"""


@pytest.mark.parametrize(("kind", "sig", "status", "within"), [
    ("polite", signal.SIGTERM, 0, (0.0, 1.9)),  # before cancel_after: `stop` did it
    ("deaf", signal.SIGINT, 0, (1.9, 8.0)),   # cancelled after cancel_after (status 0: not the deadline)
    ("stuck", signal.SIGTERM, 1, (3.9, 8.0)),  # ended by the deadline
])
def test_stop_is_bounded(kind: str, sig: signal.Signals, status: int, within: tuple[float, float]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, kind], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "serving\n"
        start = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(30) == status
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert within[0] <= took <= within[1], took
    out, err = proc.communicate()
    if status == 0:
        assert out == "returned\n" and err == ""
    else:
        assert err == f"messenger-streams: did not stop within 4s after {sig.name}; exiting now\n"

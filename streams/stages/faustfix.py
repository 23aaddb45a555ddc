"""Two fixes to faust-streaming 0.15.3 (and mode-streaming 0.7.1) that lost records around a rebalance (issue 12).

Both were found by instrumenting failing runs of `tests/stages/test_conversations_kafka.py::
test_failover_within_15_seconds` and `tests/stages/test_csat_stage_kafka.py::
test_sigkill_mid_stream_neither_loses_nor_double_counts`; `install()` applies them once per process,
before the app is built (`streams/stages/app.py`).

1. **Records of paused partitions were consumed and dropped** (`FetchablePartitions`). faust asks
   aiokafka for the records of its active partitions by passing its *live* set of them to
   `Fetcher.fetched_records`, which waits up to a second for data and tests `if partitions and tp
   not in partitions` on every pass. A rebalance pauses every partition while that call waits, the
   set becomes empty, an empty set means "no filter", and aiokafka hands out the records of every
   partition, paused ones included, advancing their positions. faust then discards them. When the
   partition was a table changelog that the recovery had just seeked to its start, the recovery
   never saw those records and waited forever: after a failover the survivor never processed the
   dead worker's partitions again (3 of 33 runs). The view handed to aiokafka is never
   empty-means-all and holds a partition only while faust's flow runs and the partition is active;
   records of other partitions stay in aiokafka's buffer (a seek discards them).

2. **A resume that was no resume cleared the streams' queues** (`resume_flow_control`). mode's
   `FlowControlEvent.resume()` clears every stream's input queue, so that records queued before a
   rebalance are not processed after it. faust calls it again at the end of a table recovery, after
   it has already resumed the stream partitions and while records are being fetched into those
   queues: every record queued in that window was dropped, and its offset stayed unacknowledged,
   so faust's commit stopped below it. After a SIGKILL and restart the CSAT stage skipped a run of
   facts in 7 of 10 instrumented runs (1 to 175 per partition, always at "Worker ready"), and the
   test failed whenever the run lay above what the killed worker had counted (9 of 13 runs). The
   queues are now cleared only when flow control really resumes from a suspension; a suspension
   (a revocation) clears them itself.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.utils.queues import FlowControlEvent

_PATCHED = "_messenger_streams_faustfix"
UNGUARDED_FETCH = faust_aiokafka.AIOKafkaConsumerThread._fetch_records  # faust's own, kept for the tests
CLEARING_RESUME = FlowControlEvent.resume  # mode's own, kept for the tests


class FetchablePartitions(Container[Any]):
    """The partitions aiokafka may hand out right now: active in faust, while faust's flow runs."""

    __slots__ = ("consumer", "live")

    def __init__(self, consumer: Any, live: Container[Any]) -> None:
        self.consumer = consumer
        self.live = live

    def __bool__(self) -> bool:
        return True  # aiokafka treats an empty (falsy) filter as "every partition"

    def __contains__(self, tp: object) -> bool:
        return bool(self.consumer.flow_active) and tp in self.live


async def _fetch_records(
    self: Any, consumer: Any, active_partitions: Any, timeout: float | None = None, max_records: int | None = None,
) -> Any:
    if active_partitions is not None:  # None: a client-only app, every partition is its own
        active_partitions = FetchablePartitions(self.consumer, active_partitions)
    return await UNGUARDED_FETCH(self, consumer, active_partitions, timeout=timeout, max_records=max_records)


def resume_flow_control(self: FlowControlEvent) -> None:
    """`FlowControlEvent.resume` that clears the managed queues only when it ends a suspension."""
    was_suspended = not self.is_active()
    self._suspend.clear()
    self._resume.set()
    if was_suspended:
        self.clear()


def install() -> None:
    """Apply both fixes (idempotent)."""
    thread_cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(thread_cls, _PATCHED, False):
        return
    thread_cls._fetch_records = _fetch_records  # type: ignore[method-assign]
    FlowControlEvent.resume = resume_flow_control  # type: ignore[method-assign]
    setattr(thread_cls, _PATCHED, True)

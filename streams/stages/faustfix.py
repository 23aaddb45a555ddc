"""Four fixes to faust-streaming 0.15.3 (and mode-streaming 0.7.1): two lost records around a
rebalance (issue 12), one held the commits (and so the timers) back for half an hour after a restart,
one made every fetched record wait for the main loop's turns.

The first two were found by instrumenting failing runs of `tests/stages/test_conversations_kafka.py::
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

3. **A commit crawled two offsets per second after a restart** (`dedupe_acked`). faust commits up
   to the first run of consecutive offsets in its list of acked offsets, one run per commit. When
   the consumer reads an offset more than one past the last one read, it records the offsets
   between as a gap and later adds them to that list. At start-up faust resumes the fetcher before
   it seeks the stream partitions to their committed offsets; the seek moves the read offset back,
   the next record of a fetch already under way looks like a jump, and the records delivered
   before the seek, acked only after it, are in the list twice: `[2, 2, 3, 3, 4, 4, …]`. Every run
   is then two long and the commit moved two offsets per commit, one commit a second: the 4,300
   records of the test would have taken over half an hour. Nothing was lost, but the conversation
   stage's ticks wait for the raw topic's commits (`TickSource`), so every timer (auto-close, CSAT
   timeouts) of the worker stood still, and a crash meanwhile would have redelivered the whole
   backlog. Found by
   `test_timers_wait_for_input_still_queued`, which failed intermittently under load (1 of 10 runs,
   3 more just passing), with the `HeldWarning` log of `streams/stages/runtime.py` naming the raw
   partition whose commit stood still. The list is deduplicated before faust reads it: the same
   offsets, each once, so the commit covers the whole run at once.

4. **Every record cost the main loop two turns and four tasks** (`drain_messages`). faust's
   drainer hands each fetched record to the conductor through `Service.wait_first(callback(message),
   suspend_flow.wait())`, which wraps the delivery, the flow's suspension and the consumer's stopped
   and crashed events in four tasks and waits on them: at least two turns of the loop per record,
   and in each turn every other ready task runs first (the agents' units, their sends). Found while
   timing where a record waits under live load (between aiokafka's buffer and faust's conductor:
   9 ms at the median, 178 ms at p99 at 2,144 records/s; docs/benchmarks.md, "Stop 30"). The
   delivery almost never waits (it puts the event in a queue with room), so it is now run at once,
   up to its first suspension; only a delivery that does wait (a full queue, a suspended flow) is
   handed to `wait_first` as before, so a rebalance still interrupts it. faust's own fairness stays:
   the drainer yields to the loop every 100 records (`yield_every`). Measured: drains +25% (C) and
   +26% (faust's floor, arm B) at the same CPU; under live load −4% CPU and the same latency, so
   that wait is not this: it is the hop from faust's consumer thread to a busy main loop (taken out
   in stop 31: the consumer now runs on the worker's loop, streams/stages/loopconsumer.py).

Not a fix but a missing setting: faust builds its consumer with `fetch_max_wait_ms=1500` and
aiokafka's `fetch_min_bytes=1` and has no setting for either (`tuned_worker_consumer` applies the
worker's `MESSENGER_STREAMS_FETCH_MIN_BYTES` / `_FETCH_MAX_WAIT_MS`, faust's values by default).
"""

from __future__ import annotations

import asyncio
from collections.abc import Container, Coroutine
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING, Consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.utils.functional import consecutive_numbers
from mode.utils.queues import FlowControlEvent

_PATCHED = "_messenger_streams_faustfix"
UNGUARDED_FETCH = faust_aiokafka.AIOKafkaConsumerThread._fetch_records  # faust's own, kept for the tests
CLEARING_RESUME = FlowControlEvent.resume  # mode's own, kept for the tests
CRAWLING_NEW_OFFSET = Consumer._new_offset  # faust's own, kept for the tests
FIXED_FETCH_CONSUMER = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer  # faust's own
FETCH_SETTINGS = "_messenger_streams_fetch"  # app attribute: (fetch_min_bytes, fetch_max_wait_ms)


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


def dedupe_acked(self: Any, tp: Any) -> int | None:
    """faust's `Consumer._new_offset` (0.15.3, same steps and checks), with the acked offsets
    deduplicated after the gaps are added, before the first run is taken.

    `self._acked[tp]` is faust's list of offsets acked since the last commit (kept in place, at
    most those offsets once each after this); `_acked_index` already holds each offset once."""
    acked = self._acked[tp]
    if not acked:
        return None
    max_offset = max(acked)
    gap_for_tp = self._gap[tp]
    if gap_for_tp:  # offsets the consumer jumped over count as acked once the acks pass them
        candidates = sorted(gap_for_tp.overlap(0, max_offset), key=lambda x: x.begin)
        if candidates:
            added = [o for entry in candidates for o in range(entry.begin, entry.end)]
            acked.extend(added)
            gap_for_tp.chop(0, max(added[-1], max_offset + 1))
    acked[:] = sorted(set(acked))
    committed = self._committed_offset[tp]
    if committed and acked[0] - committed > 1:
        return None  # the head of the list is not acked yet
    batch = next(consecutive_numbers(acked))
    acked[: len(batch)] = []
    self._acked_index[tp].difference_update(batch)
    return int(batch[-1]) + 1


async def _resumed(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Drive `coro` on from the suspension where it yielded `yielded`, as an asyncio Task would:
    wait for the future it awaits (or one turn for a bare yield), then resume it. Cancelled (by
    `wait_first`, when the flow is suspended first), the coroutine is closed where it waits."""
    try:
        while True:
            if yielded is None:
                await asyncio.sleep(0)
            elif asyncio.isfuture(yielded):
                yielded._asyncio_future_blocking = False
                await asyncio.wait([yielded])  # the coroutine reads its result when resumed
            else:
                raise RuntimeError(f"a delivery yielded {yielded!r}, not a future")
            yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value
    except BaseException:
        coro.close()
        raise


async def deliver(consumer: Any, message: Any) -> None:
    """faust's delivery of one record (`consumer.callback`, the conductor), run at once up to its
    first suspension; one that waits is handed to `wait_first` with the flow's suspension, as
    faust's drainer does for every record."""
    coro = consumer.callback(message)
    try:
        yielded = coro.send(None)
    except StopIteration:
        return
    await consumer.wait_first(_resumed(coro, yielded), consumer.suspend_flow.wait())


async def drain_messages(self: Any, fetcher: Any) -> None:  # pragma: no cover - the worker's loop
    """faust's `Consumer._drain_messages` (0.15.3: same steps, checks, logs and errors), with each
    record handed on by `deliver` instead of `wait_first`."""
    getmany = self.getmany
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    flag_consumer_fetching = CONSUMER_FETCHING
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for
    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep
    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(flag_consumer_fetching)
            ait = getmany(timeout=1.0)
            await self.sleep(0)  # faust: getmany may be called in a loop that never yields
            if not self.should_stop:
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is None or offset >= r_offset:
                        gap = offset - (r_offset or 0)
                        if gap > 1 and r_offset and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        await deliver(self, message)
                        set_read_offset(tp, offset)
                    else:
                        self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key, message.value)
                unset_flag(flag_consumer_fetching)
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(flag_consumer_fetching)


def tuned_worker_consumer(self: Any, transport: Any) -> Any:
    """faust's worker consumer with the app's fetch settings (`FETCH_SETTINGS`, set by `create_app`).

    faust builds it with `fetch_max_wait_ms=1500` and aiokafka's `fetch_min_bytes=1` and has no
    setting for either: the broker answers a fetch as soon as one record is ready, so under live
    load the consumer fetches as fast as round trips allow, a few records at a time, whatever the
    rate. The defaults stay faust's; a deployment can trade a few ms for CPU (docs/benchmarks.md,
    "fetch settings")."""
    consumer = FIXED_FETCH_CONSUMER(self, transport)
    tuned = getattr(self.app, FETCH_SETTINGS, None)
    if tuned is not None:
        consumer._fetch_min_bytes, consumer._fetch_max_wait_ms = tuned  # read by its Fetcher at start
    return consumer


def install() -> None:
    """Apply the four fixes and the fetch settings hook (idempotent)."""
    thread_cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(thread_cls, _PATCHED, False):
        return
    thread_cls._fetch_records = _fetch_records  # type: ignore[method-assign]
    FlowControlEvent.resume = resume_flow_control  # type: ignore[method-assign]
    Consumer._new_offset = dedupe_acked  # type: ignore[method-assign]
    thread_cls._create_worker_consumer = tuned_worker_consumer  # type: ignore[method-assign]
    Consumer._drain_messages = drain_messages  # type: ignore[method-assign]
    setattr(thread_cls, _PATCHED, True)


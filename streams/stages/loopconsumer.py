"""faust's Kafka consumer on the worker's own event loop, not in a thread of its own.

faust (0.15.3) runs aiokafka's consumer in a `ServiceThread`: a second thread with its own event
loop. Every fetch the worker takes (`getmany`), every commit and every seek is a call into that
thread and an answer back, each a wake-up of the other loop through its self-pipe; and the two
loops share one GIL. Under live load a fetched record waited there for the busy main loop
(`docs/benchmarks.md`, stop 30: "fetched → taken by faust's drainer" p50 9.1 ms, p99 178 ms at
2,144/s).

Here the same faust classes run on the main loop: `LoopWorker` starts the consumer service as a
task of the worker's loop where faust would start a thread, and `call_thread` awaits the call
itself where faust would queue it for the thread. aiokafka is an asyncio library, so nothing in it
needs the thread; what changes is that its heartbeat now shares the worker's loop, so a loop held
longer than the session timeout (`MESSENGER_STREAMS_SESSION_TIMEOUT_SECONDS`, 8 s) loses the
worker's partitions to the others (with faust's thread they stayed with a worker that processed
nothing; this follows from the design and no test shows it). `MESSENGER_STREAMS_CONSUMER_THREAD=true`
brings faust's thread back.

**Paused partitions are not fetched.** faust pauses a partition in its own bookkeeping only: its
drainer stops asking for the partition's records, but aiokafka's fetcher goes on fetching every
assigned partition. A table's changelog partitions are paused once the table is recovered (the
worker writes them and never reads them back), so each one's first record after an assignment
was fetched, sat in aiokafka's buffer unread, and for aiokafka's `prefetch_backoff` (100 ms) held
back the next fetch of *every* partition from that broker: a stall of ~100 ms of the whole worker
per changelog partition, as the traffic first reached it (`make bench` at 300/s: three such stalls
in every run, p99.9 100-111 ms; with this, 29-41 ms). Here faust's `pause_partitions` /
`resume_partitions` also pause and resume the partitions in aiokafka (those it has assigned), so
aiokafka fetches exactly what faust reads. With faust's thread (`CONSUMER_THREAD=true`) this is not
done: aiokafka's pause is not safe to call from another thread.

Pinned to faust-streaming 0.15.3 and mode-streaming: the overridden methods are `WorkerThread.start`
/ `stop` / `is_alive`, `QueueServiceThread.call_thread` and `ServiceThread._gather_remaining_tasks`;
`Consumer.pause_partitions` / `resume_partitions` are extended (faust's own bookkeeping runs first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import faust
from aiokafka.structs import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.threads import WorkerThread
from mode.utils.futures import maybe_async


class LoopWorker(WorkerThread):
    """Where faust starts a thread for the consumer service, a task of the worker's loop."""

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        service = self.service

        async def serve() -> None:  # what faust's thread runs (`ServiceThread._start_thread`)
            try:
                await service._serve()  # start, wait until stopped, shut down
            except Exception:
                service.set_shutdown()  # as faust's thread does: whoever waits for the shutdown is let go
                raise
            finally:
                self._set_stopped()

        self._task = service.parent_loop.create_task(serve(), name="faust-consumer-on-loop")

    def stop(self) -> None:
        """faust calls this to join the thread after the service stopped; a task has nothing to join."""

    def is_alive(self) -> bool:
        return self._task is not None and not self._task.done()


class LoopConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's aiokafka consumer service, with its calls made in place (it shares the caller's loop)."""

    async def call_thread(self, fun: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        return await maybe_async(fun(*args, **kwargs))

    async def _gather_remaining_tasks(self) -> None:
        """faust cancels every task left on the thread's loop when the thread ends; this loop is the
        worker's, whose tasks are not the consumer's to cancel (the worker's own stop gathers them)."""


class LoopConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer whose service runs on the worker's loop, and whose paused
    partitions aiokafka no longer fetches."""

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return LoopConsumerThread(self, loop=self.loop, thread_loop=self.loop, beacon=self.beacon, Worker=LoopWorker)

    def pause_partitions(self, tps: Iterable[TP]) -> None:
        super().pause_partitions(tpset := set(tps))
        self._also_in_aiokafka(tpset, pause=True)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        super().resume_partitions(tpset := set(tps))
        self._also_in_aiokafka(tpset, pause=False)

    def _also_in_aiokafka(self, tps: set[TP], *, pause: bool) -> None:
        """The same in aiokafka's consumer, for those of `tps` it has assigned (none before it
        starts). It runs on this loop, so pausing and resuming it here is safe."""
        consumer = getattr(self._thread, "_consumer", None)
        if consumer is None:
            return
        assigned = consumer.assignment()
        mine = [tp for tp in (TopicPartition(t.topic, t.partition) for t in tps) if tp in assigned]
        if mine:
            (consumer.pause if pause else consumer.resume)(*mine)


def install(app: faust.App) -> None:
    """Make `app` build its consumer on its own loop (call before the consumer is first used)."""
    app.transport.Consumer = LoopConsumer  # type: ignore[misc]  # faust reads it as self.Consumer (an instance may shadow it)

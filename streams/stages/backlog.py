"""Bigger batches while a backlog waits: consecutive batches of faust's `take` joined into one.

faust's `noack_take(max, within)` hands the agent what its drainer moved into the buffer within
`within` of the last batch. The drainer shares the loop with everything else, and with the unit
pipeline the previous units' writes and sends run in that same window (`runtime._ship`): in a
drain of 60k records the agent got batches of 37 records on average instead of 78, made twice the
units, and paid each unit's fixed cost (its metas, one changelog record per key instead of one per
several events of it, a produce request, two ack waits) twice as often (docs/benchmarks.md, stop 29).

`joined(batches, waiting, max_, longest)` takes faust's batches one by one and, while the records
already fetched and waiting for the stream (`waiting()`: the stream channel's queue) would fill the
batch to `max_` by themselves, adds the next batch to it. It asks for a next batch only within
`longest` seconds of the first, so a joined batch spans at most `longest` plus one window. That is a
backlog, not one fetch's worth of live traffic: joining whenever anything waited
cost 4 ms at the median under live load (1,400/s), where a fetch often lands during a window. Below
capacity batches are cut as before, and the window bounds the wait of a record that arrives alone.
Under a backlog a batch grows to about `max_` or `longest`. A joined batch holds fewer than
2 × `max_` records. Its records wait in it, unacked, as they would in faust's buffer: a stop or a
crash during a join redelivers them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any


async def joined(
    batches: AsyncIterable[Sequence[Any]],
    waiting: Callable[[], int],
    max_: int,
    longest: float,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[list[Any]]:
    """faust's batches, joined while `waiting()` records are fetched behind them (see the module)."""
    it = aiter(batches)
    while True:
        try:
            batch = list(await anext(it))
        except StopAsyncIteration:
            return
        started = clock()
        while len(batch) < max_ and waiting() >= max_ - len(batch) and clock() - started < longest:
            try:
                batch.extend(await anext(it))
            except StopAsyncIteration:
                break
        yield batch


def queued(stream: Any) -> Callable[[], int]:
    """How many records wait in `stream`'s channel for faust's drainer (0 when it cannot tell)."""
    try:
        queue = stream.channel.queue
    except AttributeError:
        return lambda: 0
    return queue.qsize  # type: ignore[no-any-return]

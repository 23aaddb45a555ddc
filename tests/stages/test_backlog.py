"""Joining faust's batches under a backlog (streams/stages/backlog.py), without Kafka: what is joined,
when it stops, and that below a backlog the batches pass as faust cut them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace

import faust

from streams.stages.backlog import joined, queued


class Source:
    """faust's batches, and how many records wait behind each when the agent asks for the next."""

    def __init__(self, batches: Sequence[Sequence[int]], waiting: Sequence[int]) -> None:
        self.batches, self.waiting_after = [list(b) for b in batches], list(waiting)
        self.taken = 0

    async def take(self) -> AsyncIterator[list[int]]:
        for b in self.batches:
            self.taken += 1
            yield b

    def waiting(self) -> int:
        return self.waiting_after[self.taken - 1]


async def collect(it: AsyncIterator[list[int]]) -> list[list[int]]:
    return [b async for b in it]


def runs(*sizes: int) -> list[list[int]]:
    out, n = [], 0
    for s in sizes:
        out.append(list(range(n, n + s)))
        n += s
    return out


async def test_batches_pass_unchanged_when_no_backlog_waits() -> None:
    batches = runs(7, 3, 12, 1)
    # something waits after each (a fetch landed during the window), but never enough to fill a batch
    src = Source(batches, [5, 9, 480, 0])
    assert await collect(joined(src.take(), src.waiting, 500, 0.02)) == batches


async def test_a_backlog_joins_batches_until_max() -> None:
    batches = runs(40, 40, 40, 300, 90, 10)
    src = Source(batches, [5_000] * 6)
    out = await collect(joined(src.take(), src.waiting, 200, 10.0))
    # 40+40+40 = 120 < 200, joined with 300 → 420 (≥ 200: cut); 90 + 10 = 100, the stream ends
    assert [len(b) for b in out] == [420, 100]
    assert [x for b in out for x in b] == list(range(520))  # every record once, in order


async def test_joining_needs_enough_waiting_to_fill_the_batch() -> None:
    batches = runs(100, 100, 100, 100)
    # after the first batch 399 wait (it would need 400 to fill 500): cut; after the second 400 (joined),
    # after the third 300 (the joined 200 need 300: joined), after the fourth none
    src = Source(batches, [399, 400, 300, 0])
    assert [len(b) for b in await collect(joined(src.take(), src.waiting, 500, 10.0))] == [100, 300]


async def test_joining_stops_after_longest() -> None:
    batches = runs(10, 10, 10, 10, 10)
    now = [0.0]

    def clock() -> float:
        return now[0]

    src = Source(batches, [10_000] * 5)

    async def take() -> AsyncIterator[list[int]]:
        async for b in src.take():
            yield b
            now[0] += 0.008  # each window takes 8 ms

    out = await collect(joined(take(), src.waiting, 500, 0.02, clock=clock))
    # the next batch is asked for at 0, 8 and 16 ms after the first (< 20 ms), so four are joined (the
    # last came at 24 ms: a joined batch spans at most `longest` plus one window); at 24 ms it is cut
    assert [len(b) for b in out] == [40, 10]


async def test_off_when_longest_is_zero() -> None:
    batches = runs(10, 10)
    src = Source(batches, [10_000, 10_000])
    assert await collect(joined(src.take(), src.waiting, 500, 0.0)) == batches


async def test_queued_counts_the_stream_channels_records() -> None:
    assert queued(SimpleNamespace())() == 0  # no channel: nothing known, nothing joined
    app = faust.App("backlog-test", broker="memory://", store="memory://")
    channel = app.channel()
    stream = channel.stream()
    waiting = queued(stream)
    assert waiting() == 0
    for i in range(3):
        stream.channel.queue.put_nowait(i)  # what faust's conductor does with fetched records
    assert waiting() == 3
    await asyncio.wait_for(stream.channel.queue.get(), 1)
    assert waiting() == 2

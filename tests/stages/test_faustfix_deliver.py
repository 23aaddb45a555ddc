"""faustfix's delivery of one fetched record (`deliver`, used by the worker's drainer).

faust's drainer hands each record to the conductor through `wait_first(callback(message),
suspend_flow.wait())`: four tasks and at least two turns of the loop per record, in which every other
ready task runs first. `deliver` runs the delivery at once up to its first suspension, and hands only
a delivery that waits to `wait_first`, where a suspended flow still interrupts it. No broker needed:
the consumer is a mode Service (what `wait_first` belongs to) with faust's two attributes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mode import Service

from streams.stages import faustfix


class Drainer(Service):
    """What `deliver` reads of faust's consumer: `callback` (the conductor) and `suspend_flow`."""

    def __init__(self, callback: Any) -> None:
        super().__init__()
        self.callback = callback
        self.suspend_flow = asyncio.Event()


async def faust_way(consumer: Drainer, message: Any) -> None:
    """faust 0.15.3's `_drain_messages`, for one record."""
    await consumer.wait_first(consumer.callback(message), consumer.suspend_flow.wait())


@pytest.mark.parametrize("how", ["deliver", "faust"])
async def test_a_delivery_with_room_takes_no_turn_of_the_loop(how: str) -> None:
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=10)

    async def conductor(message: str) -> None:  # a queue with room: nothing to wait for
        queue.put_nowait(message)

    consumer = Drainer(conductor)
    others: list[str] = []
    bystander = asyncio.get_running_loop().call_soon(others.append, "another task ran")
    await (faustfix.deliver if how == "deliver" else faust_way)(consumer, "m1")
    assert queue.get_nowait() == "m1"
    # the point of the fix: with faust's way, every ready task runs before the record is handed on
    assert others == ([] if how == "deliver" else ["another task ran"])
    bystander.cancel()


async def test_a_delivery_that_waits_completes_once_there_is_room() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
    queue.put_nowait("before")

    async def conductor(message: str) -> None:
        await queue.put(message)  # waits: the queue is full

    handed = asyncio.ensure_future(faustfix.deliver(Drainer(conductor), "m1"))
    await asyncio.sleep(0.01)
    assert not handed.done()
    assert queue.get_nowait() == "before"  # the agent takes one: room for the waiting record
    await asyncio.wait_for(handed, 5)
    assert queue.get_nowait() == "m1"


async def test_a_waiting_delivery_gives_way_to_a_suspended_flow() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
    queue.put_nowait("before")
    closed: list[str] = []

    async def conductor(message: str) -> None:
        try:
            await queue.put(message)
        finally:
            closed.append(message)

    consumer = Drainer(conductor)
    handed = asyncio.ensure_future(faustfix.deliver(consumer, "m1"))
    await asyncio.sleep(0.01)
    consumer.suspend_flow.set()  # a rebalance: the drainer must not stay stuck in a full queue
    await asyncio.wait_for(handed, 5)
    assert closed == ["m1"]  # the waiting delivery was closed where it waited
    assert queue.get_nowait() == "before"
    await asyncio.sleep(0.01)
    assert queue.empty()  # and the record was not put in after all


async def test_a_failing_delivery_raises_at_once_or_after_waiting() -> None:
    async def fails_at_once(message: str) -> None:
        raise ValueError(f"cannot decode {message}")

    with pytest.raises(ValueError, match="cannot decode m1"):
        await faustfix.deliver(Drainer(fails_at_once), "m1")

    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def fails_after_waiting(message: str) -> None:
        await gate
        raise ValueError(f"cannot put {message}")

    handed = asyncio.ensure_future(faustfix.deliver(Drainer(fails_after_waiting), "m2"))
    await asyncio.sleep(0.01)
    gate.set_result(None)
    with pytest.raises(ValueError, match="cannot put m2"):
        await asyncio.wait_for(handed, 5)


def test_the_workers_consumer_drains_with_deliver() -> None:
    from streams.core.settings import Settings
    from streams.stages.app import create_app

    app = create_app(Settings(bootstrap_servers="127.0.0.1:1", app_id="drain-test"))  # no broker needed
    assert app.consumer._drain_messages.__func__ is faustfix.drain_messages

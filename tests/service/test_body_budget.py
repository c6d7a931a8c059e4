"""The body budget (max_buffered_body_bytes): room reserved for gRPC messages still arriving, first come first served
and refused as HTTP chunks are."""
from __future__ import annotations

import asyncio

import pytest

from service.body_budget import BodyBudget
from service.errors import ApiError

MIB = 1024 * 1024
LONG_S = 30  # a deadline no waiter in these tests should reach


async def reserved_in_turn(budget: BodyBudget, size: int, order: list[str], name: str, deadline: float) -> None:
    await budget.reserve(size, deadline)
    order.append(name)


def test_reservations_wait_in_turn_while_messages_still_arriving_hold_the_room():
    async def scenario():
        budget, order = BodyBudget(2 * MIB), []
        deadline = asyncio.get_running_loop().time() + LONG_S
        await budget.reserve(MIB, deadline)
        await budget.reserve(MIB, deadline)
        waiting = [asyncio.create_task(reserved_in_turn(budget, MIB, order, name, deadline)) for name in "ab"]
        await asyncio.sleep(0)
        assert (order, budget.held_bytes, budget.reserved_bytes) == ([], 2 * MIB, 2 * MIB)
        budget.received(MIB, 0)  # a call ended without its message: its room goes to the first in line
        await asyncio.sleep(0)
        assert order == ["a"]
        budget.received(MIB, 300 * 1024)  # a message arrived: its own size stays counted, no room for b yet
        await asyncio.sleep(0)
        assert (order, budget.held_bytes, budget.reserved_bytes) == (["a"], MIB + 300 * 1024, MIB)
        budget.give_back(300 * 1024)  # that message's call is answered
        await asyncio.gather(*waiting)
        assert order == ["a", "b"] and (budget.held_bytes, budget.reserved_bytes) == (2 * MIB, 2 * MIB)
        budget.received(MIB, 0)
        budget.received(MIB, 0)
        assert (budget.held_bytes, budget.reserved_bytes) == (0, 0)

    asyncio.run(scenario())


def test_a_reservation_is_refused_at_once_when_bodies_received_leave_no_room_as_an_http_chunk_is():
    async def scenario():
        budget = BodyBudget(2 * MIB)
        budget.take(1800 * 1024)  # HTTP bodies received
        with pytest.raises(ApiError) as refused:
            await budget.reserve(MIB, asyncio.get_running_loop().time() + LONG_S)
        assert (refused.value.status, refused.value.code) == (503, "body_buffer_full")
        assert refused.value.headers["Retry-After"] == "1"
        assert budget.held_bytes == 1800 * 1024

    asyncio.run(scenario())


def test_a_wait_that_ends_gives_its_place_up_and_holds_nothing():
    async def scenario():
        loop = asyncio.get_running_loop()
        budget, order = BodyBudget(2 * MIB), []
        await budget.reserve(2 * MIB, loop.time() + LONG_S)
        with pytest.raises(ApiError) as late:  # the deadline passes while it waits
            await budget.reserve(MIB, loop.time() + 0.05)
        assert late.value.code == "body_buffer_full" and "body_deadline_s" in late.value.message
        cancelled = asyncio.create_task(budget.reserve(MIB, loop.time() + LONG_S))  # its client leaves
        queued = asyncio.create_task(reserved_in_turn(budget, MIB, order, "queued", loop.time() + LONG_S))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        budget.received(2 * MIB, 0)
        await queued
        assert order == ["queued"] and (budget.held_bytes, budget.reserved_bytes) == (MIB, MIB)

    asyncio.run(scenario())


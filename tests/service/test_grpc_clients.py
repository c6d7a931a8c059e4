"""service/grpc_clients.py: one client address's calls beyond grpc_messages_per_client wait for one of its places;
other addresses never wait behind it; a client's entry goes with its last call (tests/service/test_grpc_limits.py
runs it in the real server)."""
from __future__ import annotations

import asyncio

import pytest

from service.errors import ApiError
from service.grpc_clients import ArrivingMessages, client_address


@pytest.mark.parametrize("peer, address", [("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"), ("ipv6:[::1]:5000", "ipv6:[::1]"),
                                           ("ipv6:[2001:db8::1]:443", "ipv6:[2001:db8::1]"),
                                           ("unix:/run/convnext.sock", "unix:/run/convnext.sock")])
def test_a_client_is_its_address_whatever_its_port(peer, address):
    assert client_address(peer) == address


def test_a_clients_calls_beyond_its_places_wait_for_one_and_other_clients_do_not():
    async def scenario():
        arriving = ArrivingMessages(limit=1)
        far = asyncio.get_running_loop().time() + 60
        first_holds, first_done = asyncio.Event(), asyncio.Event()
        order = []

        async def call(peer: str, name: str, hold: asyncio.Event | None = None):
            async with arriving.place(peer, far):
                order.append(name)
                if hold is not None:
                    first_holds.set()
                    await hold.wait()

        first = asyncio.create_task(call("ipv4:10.0.0.7:1000", "first", first_done))
        await first_holds.wait()
        same_client = asyncio.create_task(call("ipv4:10.0.0.7:2000", "same client"))
        await call("ipv4:10.0.0.8:1000", "other client")  # not behind 10.0.0.7
        await asyncio.sleep(0)
        assert order == ["first", "other client"] and not same_client.done()
        assert arriving.clients() == 1  # 10.0.0.7, with one call in its place and one waiting
        first_done.set()
        await asyncio.gather(first, same_client)
        assert order == ["first", "other client", "same client"]
        assert arriving.clients() == 0

    asyncio.run(scenario())


def test_a_wait_past_the_deadline_is_the_body_timeout_and_leaves_nothing_behind():
    async def scenario():
        arriving = ArrivingMessages(limit=1)
        loop = asyncio.get_running_loop()
        async with arriving.place("ipv4:10.0.0.7:1000", loop.time() + 60):
            with pytest.raises(ApiError) as refused:
                async with arriving.place("ipv4:10.0.0.7:2000", loop.time()):
                    pass
        assert (refused.value.status, refused.value.code) == (408, "body_timeout")
        assert "grpc_messages_per_client" in refused.value.message
        assert arriving.clients() == 0

    asyncio.run(scenario())


def test_limit_0_is_no_per_client_limit():
    async def scenario():
        arriving = ArrivingMessages(limit=0)
        far = asyncio.get_running_loop().time() + 60
        async with arriving.place("ipv4:10.0.0.7:1", far), arriving.place("ipv4:10.0.0.7:2", far):
            assert arriving.clients() == 0

    asyncio.run(scenario())

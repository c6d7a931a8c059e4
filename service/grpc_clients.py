"""A client's share of the gRPC messages arriving at once.

A ModelInfer call holds max_body_bytes of the body budget from the moment grpc is asked for its message until the
message has arrived (service/body_budget.py: grpc core takes in up to the declared size once asked), so a client that
opens calls and sends nothing holds that room until body_deadline_s, for the cost of a few HTTP/2 frames. Here each
client address (the peer's IP, whatever its port or connection) has at most `limit` calls waiting for room or
receiving their message; its further calls wait, holding nothing of the budget (grpc core takes in at most a small
window of a stream nobody reads), until one of its own messages has arrived or its call has ended (the calls ahead
of it began earlier, so one of them ends by its body deadline before this call's comes). A client sending calls one
after another, or many small messages at once on a fast link, hardly waits: a message that arrives frees its place.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.errors import ApiError


def client_address(peer: str) -> str:
    """grpc's peer string without its port: 'ipv4:10.0.0.7:51234' -> 'ipv4:10.0.0.7', 'ipv6:[::1]:5000' ->
    'ipv6:[::1]'; any other kind (a Unix socket) as it is."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


class ArrivingMessages:
    """Calls per client address waiting for room or receiving their message, within `limit` (0: no limit). Owned by
    the event loop (single-threaded: no lock); a client's entry goes when its last call lets go."""

    def __init__(self, limit: int):
        self.limit = limit
        self._clients: dict[str, tuple[asyncio.Semaphore, int]] = {}  # address -> (its places, calls using them)

    @asynccontextmanager
    async def place(self, peer: str, deadline: float) -> AsyncIterator[None]:
        """A place among the client's messages arriving, waited for until `deadline` (the event loop's clock)."""
        if not self.limit:
            yield
            return
        address = client_address(peer)
        places, calls = self._clients.get(address) or (asyncio.Semaphore(self.limit), 0)
        self._clients[address] = (places, calls + 1)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await places.acquire()
            except TimeoutError:  # (rare: the calls ahead of it began earlier, so their deadlines come first)
                raise ApiError(408, "body_timeout", f"the request message was not taken within the body deadline: "
                               f"this client's other calls held its {self.limit} places for messages arriving "
                               "(grpc_messages_per_client); send their messages, or fewer calls at once") from None
            try:
                yield
            finally:
                places.release()
        finally:
            places, calls = self._clients[address]
            if calls == 1:
                del self._clients[address]
            else:
                self._clients[address] = (places, calls - 1)

    def clients(self) -> int:
        """Client addresses with a call waiting or a message arriving now."""
        return len(self._clients)

"""Free TCP ports for the tests' servers, process groups and dead URLs, safe with tests running side by side.

A port the kernel picks (a bind to port 0) is free when picked and free for anyone after: between the pick and the
server's own bind, a test running beside it (`make test` runs two pytest-xdist workers) can be given the same number
for a client's source port or its own bind to 0 (under two workers a DDP test failed in gloo's connectFullMesh,
"Connection closed by peer", with its MASTER_PORT picked that way). So the ports here come from below the kernel's
ephemeral range, where it numbers no socket on its own, and each xdist worker draws from its own slice of them, in
turn from a random start, keeping only a port nothing holds now.
"""
from __future__ import annotations

import os
import random
import socket
from pathlib import Path

LOWEST_PORT = 10000  # above the ports system services are usually configured on
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _own_slice() -> range:
    """This worker's ports: its share of LOWEST_PORT up to the ephemeral range (all of it outside xdist)."""
    pool = range(LOWEST_PORT, _ephemeral_start())
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER", "gw0"), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    index, count = int(worker.removeprefix("gw")), int(workers)
    share = len(pool) // count
    return pool[index * share:(index + 1) * share]


_next: int | None = None  # this process's place in its slice


def _is_free(port: int) -> bool:
    with socket.socket() as probe:  # no SO_REUSEADDR: a port in TIME_WAIT counts as held
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing is bound to on 127.0.0.1: the next in turn of this worker's slice that is free now."""
    global _next
    ports = _own_slice()
    if len(ports) < 100:  # a host whose ephemeral range starts low: the kernel's pick, as before
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]
    if _next is None:
        _next = random.SystemRandom().randrange(len(ports))  # another checkout's tests may run beside these
    for _ in range(len(ports)):
        port, _next = ports[_next % len(ports)], _next + 1
        if _is_free(port):
            return port
    raise OSError(f"no free port in {ports}")

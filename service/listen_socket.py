"""The listening socket for a host and port: on IPv6's wildcard ("::") one socket for IPv4 and IPv6 both.

asyncio's create_server, which uvicorn binds with, turns IPV6_V6ONLY on for every IPv6 socket, so host "::" listened on
IPv6 only: the image's healthcheck (127.0.0.1), Docker's published ports (forwarded to the container's IPv4 address)
and Prometheus on an IPv4 network were refused. "::" here means both families, as in nginx (ipv6only=off), grpc core
(the gRPC port) and Go's net package.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket


def is_ipv6_wildcard(host: str) -> bool:
    """Whether `host` is IPv6's unspecified address ("::", or "0::0" written out), bound for both families."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name ("localhost"): bound as it resolves
        return False
    return address.version == 6 and address.is_unspecified


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (the first address `host` resolves to) as the service listens: SO_REUSEADDR,
    as uvicorn binds (a connection in TIME_WAIT is no owner), and on IPv6's wildcard IPV6_V6ONLY off. OSError when
    it cannot be bound (bind_refusal says why)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and is_ipv6_wildcard(host):
            # A system without IPv4-mapped addresses (OpenBSD) refuses: its "::" stays IPv6 only, as before.
            with contextlib.suppress(OSError):
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(address)
    except BaseException:
        listener.close()
        raise
    return listener


def bind_refusal(error: OSError, protocol: str, host: str, port: int, port_flag: str) -> str:
    """What to do when `protocol`'s port cannot be bound on host:port, by the error's cause: only EADDRINUSE means
    another server holds it; a kernel without IPv6 (ipv6.disable=1) refuses the family, and an address this host does
    not have cannot be listened on, whatever the port."""
    where, reason = f"the {protocol} port {host}:{port}", error.strerror or str(error)
    if error.errno == errno.EADDRINUSE:
        return f"{where} is taken ({reason}): stop the server using it, or pass {port_flag} with a free port"
    if error.errno == errno.EACCES:
        return (f"{where} may not be bound by this user ({reason}): ports below 1024 need root or "
                f"CAP_NET_BIND_SERVICE; pass {port_flag} with a port above 1023")
    if error.errno == errno.EAFNOSUPPORT:
        family = "IPv6" if ":" in host else "support for this address family"
        return (f"{where} cannot be listened on: this host has no {family} ({reason}): pass --host 0.0.0.0 (every "
                "IPv4 address)")
    if error.errno == errno.EADDRNOTAVAIL:
        return (f"{where} cannot be listened on: this host has no address {host} ({reason}): pass --host 0.0.0.0 "
                "(every IPv4 address) or one of this host's addresses")
    return f"{where} cannot be bound ({reason}): pass --host or {port_flag} with another"

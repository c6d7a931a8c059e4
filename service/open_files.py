"""The process's limit on open files, raised to what its connection limits may hold before the service starts.

Every HTTP or gRPC connection is a file descriptor. Containers start with a soft limit of 1024 (containerd 2 and
Docker 25 no longer raise it), under what max_connections HTTP connections, max_connections + PROBE_CONNECTIONS gRPC
ones and the engine's own files need at their defaults: once it is reached, accept() fails and HTTP stops answering
(a probe too). As Go's runtime does at start, the soft limit is raised to the hard one, which only root can raise.
"""
from __future__ import annotations

import resource

from service.settings import Settings

# What the process holds besides connections: the model and engine libraries, the repository's files, sockets of the
# decode and engine threads, the log; generous.
OTHER_OPEN_FILES = 256
# The most a soft limit is raised to when the hard one is unlimited (Linux's default nr_open).
MAX_OPEN_FILES = 1 << 20


def open_files_needed(settings: Settings, probe_connections: int) -> int:
    """The file descriptors the connection limits may hold at once: HTTP's max_connections, gRPC's max_connections +
    the probes' room, and the rest of the process."""
    return 2 * settings.max_connections + probe_connections + OTHER_OPEN_FILES


def raise_open_files_limit(settings: Settings, probe_connections: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; a warning line when even that is under open_files_needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (ValueError, OSError):  # macOS refuses a soft limit over its kern.maxfilesperproc: keep the soft one
            pass
    needed = open_files_needed(settings, probe_connections)
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (f"the open-files limit is {soft} (hard limit {hard}), under the {needed} that max_connections "
                f"({settings.max_connections}) may need: connections past it are refused; raise the hard limit "
                "(docker run --ulimit nofile=65536, a systemd LimitNOFILE) or lower max_connections")
    return None

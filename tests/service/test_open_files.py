"""The service raises its soft open-files limit to the hard one before it starts: a container's soft 1024 is under
what max_connections HTTP and gRPC connections may hold, and past it accept() fails and HTTP stops answering."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from service.grpc_server import PROBE_CONNECTIONS
from service.open_files import open_files_needed
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json, resource
from service.open_files import raise_open_files_limit
from service.settings import Settings
short = raise_open_files_limit(Settings(max_connections={max_connections}), {probes})
print(json.dumps([resource.getrlimit(resource.RLIMIT_NOFILE)[0], short]))
"""


def limited_run(soft: int, hard: int, max_connections: int = 512) -> tuple[int, str | None]:
    """raise_open_files_limit in a process started with these limits: its soft limit after, and the warning."""
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    result = subprocess.run([sys.executable, "-c", PROBE.format(max_connections=max_connections,
                                                                 probes=PROBE_CONNECTIONS)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, preexec_fn=lower, check=True)
    after, short = json.loads(result.stdout)
    return after, short


def test_the_soft_limit_is_raised_to_the_hard_one():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    ceiling = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    assert ceiling >= 2048, "this machine's hard limit is too low for the test"
    after, short = limited_run(256, min(hard, ceiling) if hard != resource.RLIM_INFINITY else hard)
    assert after == ceiling
    assert short is None or ceiling < open_files_needed(Settings(), PROBE_CONNECTIONS)


def test_a_hard_limit_under_what_the_connections_need_is_said_in_a_warning():
    after, short = limited_run(256, 600, max_connections=512)
    assert after == 600
    needed = open_files_needed(Settings(max_connections=512), PROBE_CONNECTIONS)
    assert short is not None and f"open-files limit is 600 (hard limit 600), under the {needed}" in short
    assert "max_connections (512)" in short and "--ulimit nofile" in short
    assert limited_run(256, 600, max_connections=100) == (600, None)  # 2 x 100 + 64 + 256 fit


def test_a_refused_raise_keeps_the_soft_limit_and_the_service_starts(monkeypatch):
    """macOS refuses a soft limit over kern.maxfilesperproc (ValueError) even under the hard one: the start goes on
    with the soft limit it has, and says so when that is short."""
    def refuse(*_):
        raise ValueError("current limit exceeds maximum limit")

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    from service.open_files import raise_open_files_limit

    short = raise_open_files_limit(Settings(max_connections=512), PROBE_CONNECTIONS)
    assert short is not None and "open-files limit is 256" in short

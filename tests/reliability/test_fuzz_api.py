"""The HTTP contract, fuzzed from the app's own OpenAPI schema with every schemathesis check, against a real server.

`schemathesis run --checks all` (the CLI, as anyone would run it, with the project's schemathesis.toml) over every
operation: examples, coverage (boundaries, missing and wrong-typed parameters, undeclared methods), fuzzing (valid
and invalid requests) and stateful sequences. Every answer must be declared in the schema with its body, content
type and headers; valid requests accepted, invalid ones refused; 405s carry Allow; nothing answers 5xx. Valid
/classify bodies are real image files (tests/reliability/schemathesis_hooks.py). Bounded: a few examples per
operation, a fixed seed, one worker.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import serve

pytest_plugins = ["tests.service.conftest"]

ROOT = Path(__file__).resolve().parents[2]  # schemathesis.toml (the hooks) is read from the working directory
API_KEY = "fuzz-key-7d2e"
EXAMPLES_PER_OPERATION = 12
SEED = 20261129


def schemathesis_run(url: str, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "all",
               "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED), "--workers", "1",
               "--generation-database", "none", "--request-timeout", "30", "--no-color", *options]
    return subprocess.run(command, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300)


def assert_no_failures(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, f"schemathesis found failures:\n{run.stdout[-20_000:]}\n{run.stderr[-2_000:]}"
    assert "No issues found" in run.stdout, run.stdout[-5_000:]


@pytest.fixture(scope="module")
def open_url(model_repository):
    with serve(model_repository, max_batch_size=8, max_queue_delay_ms=5) as url:
        yield url


@pytest.fixture(scope="module")
def secured_url(model_repository):
    with serve(model_repository, max_batch_size=8, max_queue_delay_ms=5, api_key=API_KEY) as url:
        yield url


def test_every_operation_keeps_its_contract(open_url):
    assert_no_failures(schemathesis_run(open_url))
    assert httpx.get(f"{open_url}/readyz").json() == {"status": "ready"}


def test_with_an_api_key_every_protected_operation_refuses_requests_without_it(secured_url):
    """ignored_auth: each request is replayed without the key and must get the declared 401."""
    assert_no_failures(schemathesis_run(secured_url, "--header", f"X-API-Key: {API_KEY}"))
    assert httpx.get(f"{secured_url}/readyz").json() == {"status": "ready"}

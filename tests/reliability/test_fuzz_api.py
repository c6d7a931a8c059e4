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
MODEL = "atto"  # the test repository's model (tests/service/conftest.py)


def config_file(tmp_path_factory, model: str) -> Path:
    """The project's schemathesis.toml plus the served model's name and version, so /v2/models/{name}/... paths reach
    the model instead of answering 404 to random names (still tested: schemathesis mutates them too)."""
    path = tmp_path_factory.mktemp("schemathesis") / "schemathesis.toml"
    path.write_text((ROOT / "schemathesis.toml").read_text() + f'\n[parameters]\n"path.name" = "{model}"\n'
                    '"path.version" = "1"\n')
    return path


def schemathesis_run(url: str, config: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}/openapi.json",
               "--checks", "all",
               "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED), "--workers", "1",
               "--generation-database", "none", "--request-timeout", "30", "--no-color", *options]
    return subprocess.run(command, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300)


def assert_no_failures(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, f"schemathesis found failures:\n{run.stdout[-20_000:]}\n{run.stderr[-2_000:]}"
    if "No issues found" in run.stdout:
        return
    # The one warning allowed: v2 infer's generated bodies are mostly refused, because JSON Schema cannot tie `data`
    # to `shape` or `shape` to the model (schemathesis.toml says so); any other warning fails the test.
    summary = run.stdout.split("=== SUMMARY ===")[-1]
    warnings = [line.strip() for line in summary.splitlines() if line.strip().startswith("⚠️")]
    assert warnings and all("Schema validation mismatch" in line for line in warnings), run.stdout[-5_000:]
    mismatched = run.stdout.split("Schema validation mismatch")[1].split("\n\n")[1]
    assert all(line.strip().endswith("/infer") for line in mismatched.splitlines() if line.strip()), mismatched


@pytest.fixture(scope="module")
def open_url(model_repository):
    with serve(model_repository, max_batch_size=8, max_queue_delay_ms=5) as url:
        yield url


@pytest.fixture(scope="module")
def secured_url(model_repository):
    with serve(model_repository, max_batch_size=8, max_queue_delay_ms=5, api_key=API_KEY) as url:
        yield url


def test_every_operation_keeps_its_contract(open_url, tmp_path_factory):
    assert_no_failures(schemathesis_run(open_url, config_file(tmp_path_factory, MODEL)))
    assert httpx.get(f"{open_url}/readyz").json() == {"status": "ready"}


def test_with_an_api_key_every_protected_operation_refuses_requests_without_it(secured_url, tmp_path_factory):
    """ignored_auth: each request is replayed without the key and must get the declared 401."""
    # Both ways of sending the key: given only X-API-Key, schemathesis fills the declared bearer scheme with a made-up
    # token, and a wrong credential beside the right one is refused (service/security.py).
    assert_no_failures(schemathesis_run(secured_url, config_file(tmp_path_factory, MODEL), "--header",
                                        f"X-API-Key: {API_KEY}", "--header", f"Authorization: Bearer {API_KEY}"))
    assert httpx.get(f"{secured_url}/readyz").json() == {"status": "ready"}

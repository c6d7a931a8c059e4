"""Service fixtures: a tiny random ConvNeXt exported to a model repository once (and a version 2 of it, for
hot-swaps), and a real uvicorn server."""
from __future__ import annotations

import logging
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from runtime.preprocess import preprocess
from runtime.repository import ModelRepository
from tests.ports import free_port  # noqa: F401 (the service tests take it from here)


@contextmanager
def access_handler(emit):
    """`emit(record)` takes every record of the access log (`uvicorn.access`, at INFO meanwhile) while the block
    runs; the logger's level is put back after."""
    from service.access_log import LOGGER

    handler = logging.Handler()
    handler.emit = emit  # type: ignore[method-assign]
    LOGGER.addHandler(handler)
    level = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)


@contextmanager
def access_lines(formatter: logging.Formatter | None = None):
    """The access log's lines written while the block runs, formatted by `formatter` (else the bare message)."""
    lines: list[str] = []
    with access_handler(lambda record: lines.append(formatter.format(record) if formatter else record.getMessage())):
        yield lines


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples, or one sample's value when `name` has its labels (0 when absent)."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory) -> Path:
    """convnext_atto, random weights, 10 classes at 64 px: fast, and the mechanics are those of any model."""
    from export.onnx import export_onnx_version

    root = tmp_path_factory.mktemp("models")
    export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=64)
    return root


@pytest.fixture(scope="module")
def swap_repository(tmp_path_factory, model_repository) -> Path:
    """Version 1 from the session repository, and a version 2 of the same model exported with other weights.

    Shared by the module's tests, so never published to: a test that publishes, or reloads "the latest", takes
    its own copy (own_repository)."""
    from export.onnx import export_onnx_version

    root = tmp_path_factory.mktemp("swap-models")
    shutil.copytree(model_repository / "atto" / "1", root / "atto" / "1")
    export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=64, init_seed=2)
    return root


@pytest.fixture()
def own_repository(swap_repository, tmp_path) -> Path:
    """A copy of versions 1 and 2 for one test: what it publishes, and what "latest" means, no other test sees."""
    for version in ("1", "2"):
        shutil.copytree(swap_repository / "atto" / version, tmp_path / "atto" / version)
    return tmp_path


@pytest.fixture(scope="module")
def version(model_repository):
    """The repository's one version: convnext_atto (random weights, 10 classes, 64 px)."""
    return ModelRepository(model_repository).load("atto")


@pytest.fixture(scope="module")
def photo_batch(version, real_photos) -> np.ndarray:
    """The real photos as the service preprocesses them for `version`: float32 (N, 3, 64, 64)."""
    return np.stack([preprocess(p.read_bytes(), version.manifest.preprocess, 10**8) for p in real_photos])


def classify_top1(url: str, photo: Path) -> int:
    """POST one photo file to `url`/classify?top_k=1 (asserting a 200) and return its top class's index."""
    kind = "image/png" if photo.suffix == ".png" else "image/jpeg"
    response = httpx.post(f"{url}/classify?top_k=1", content=photo.read_bytes(), headers={"content-type": kind},
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["top_k"][0]["index"]


class LiveServer(str):
    """The base URL of a running server (a str), with the app it serves as `.app` for in-process checks."""

    app = None


def wait_ready(url: str, timeout_s: float = 60, alive=lambda: True) -> None:
    """Poll `url`/readyz until it answers 200; raise if `alive()` turns false (the server died) or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if not alive():
            raise RuntimeError(f"the service at {url} stopped before it became ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service at {url} did not become ready within {timeout_s:g} s")
        time.sleep(0.05)


@contextmanager
def serve(repository: Path, engine_factory=None, **overrides):
    """Run the real app under uvicorn on 127.0.0.1 (or the `host` given) in a thread; yields the base URL once /readyz
    says ready (for a wildcard host, 127.0.0.1's)."""
    from service.app import create_app, default_engine
    from service.server import Server, uvicorn_config
    from service.settings import Settings

    port = free_port()
    options = dict(repository=str(repository), host="127.0.0.1", port=port, intra_op_threads=1,
                   preprocess_workers=2, warmup_runs=1) | overrides
    settings = Settings(**options)
    app = create_app(settings, engine_factory or default_engine)
    server = Server(uvicorn_config(app, settings, log_level="warning"))  # the server `python -m service` runs
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    loopback = f"[{settings.host}]" if ":" in settings.host and settings.host != "::" else "127.0.0.1"
    url = f"http://{loopback}:{port}"
    try:
        wait_ready(url, alive=thread.is_alive)
    except RuntimeError:
        server.should_exit = True
        raise
    live = LiveServer(url)
    live.app = app
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def service_url(model_repository):
    with serve(model_repository, max_batch_size=8, max_queue_delay_ms=20) as url:
        yield url


@pytest.fixture(scope="session")
def launch():
    """The `serve` context manager, for tests that need a server with their own settings or engine."""
    return serve

"""Fixtures for the deployment tests: a tiny real model repository and a real /metrics scrape of the service app."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    """A real model repository: a random convnext_atto exported to ONNX (fp32) at 32 px, 4 classes."""
    from export.onnx import export_onnx_version

    root = tmp_path_factory.mktemp("deploy-models")
    export_onnx_version(root, "tiny", "convnext_atto", num_classes=4, input_size=32, verify_images=[])
    return root


@pytest.fixture(scope="session")
def metrics_scrape(tiny_repository, real_photos) -> str:
    """The text of a real /metrics scrape of the service app after it classified real photos (labelled series exist)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(repository=str(tiny_repository), max_batch_size=2, intra_op_threads=1, preprocess_workers=1,
                        warmup_runs=0)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        files = [("files", (photo.name, photo.read_bytes())) for photo in real_photos[:2]]
        assert client.post("/classify", params={"top_k": 2}, files=files).status_code == 200
        # a rejected request: the rejected counter gets a series
        client.post("/classify", content=b"not an image", headers={"content-type": "image/jpeg"})
        response = client.get("/metrics")
        assert response.status_code == 200
        return response.text

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
    """The text of a real /metrics scrape of the real server (uvicorn + its gRPC port, as `python -m service` runs it)
    after it classified real photos over HTTP and answered gRPC calls: every labelled series the dashboard reads
    exists, HTTP and gRPC, answered and refused."""
    import httpx
    import numpy as np
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    from tests.service.conftest import free_port, serve

    grpc_port = free_port()
    with serve(tiny_repository, grpc_port=grpc_port, max_batch_size=2, preprocess_workers=1, warmup_runs=0) as url:
        files = [("files", (photo.name, photo.read_bytes())) for photo in real_photos[:2]]
        assert httpx.post(f"{url}/classify", params={"top_k": 2}, files=files, timeout=30).status_code == 200
        # a rejected request: the rejected counter gets a series
        httpx.post(f"{url}/classify", content=b"not an image", headers={"content-type": "image/jpeg"}, timeout=30)
        with triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = triton_grpc.InferInput("input", [1, 3, 32, 32], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
            assert client.infer("tiny", [tensor]).as_numpy("logits").shape == (1, 4)  # code OK
            with pytest.raises(InferenceServerException):
                client.infer("no_such_model", [tensor])  # code NOT_FOUND
        response = httpx.get(f"{url}/metrics", timeout=30)
        assert response.status_code == 200
        return response.text

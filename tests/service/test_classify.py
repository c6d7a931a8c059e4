"""POST /classify over real HTTP with real photos, against ONNX Runtime run directly on the same tensors."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import generate_latest

from runtime.preprocess import preprocess
from runtime.repository import ModelRepository
from service.metrics import LATENCY_BUCKETS, ServiceMetrics


def direct_top1(repository, data: bytes) -> tuple[int, np.ndarray]:
    version = ModelRepository(repository).load("atto")
    session = ort.InferenceSession(str(version.path / version.manifest.artifacts[0].file))
    tensor = preprocess(data, version.manifest.preprocess, 10**9)[None]
    logits = session.run(None, {session.get_inputs()[0].name: tensor})[0][0]
    return int(np.argmax(logits)), logits


def test_classify_matches_onnxruntime_on_real_photos(service_url, model_repository, real_photos):
    for photo in real_photos:
        data = photo.read_bytes()
        kind = "image/png" if photo.suffix == ".png" else "image/jpeg"
        response = httpx.post(f"{service_url}/classify?top_k=3", content=data, headers={"content-type": kind})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": "atto", "version": 1}
        (result,) = body["results"]
        top1, logits = direct_top1(model_repository, data)
        assert len(result["top_k"]) == 3
        assert result["top_k"][0]["index"] == top1
        assert result["top_k"][0]["label"] == f"class_{top1}"
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert result["top_k"][0]["probability"] == pytest.approx(float(probabilities[top1]), abs=1e-5)
        assert set(result["timings"]) == {"preprocess_ms", "queue_ms", "inference_ms", "total_ms"}


def test_multipart_files_come_back_in_order(service_url, real_photos):
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in real_photos]
    response = httpx.post(f"{service_url}/classify", files=files, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [p.name for p in real_photos]
    for photo, result in zip(real_photos, results, strict=True):
        single = httpx.post(f"{service_url}/classify", content=photo.read_bytes(),
                            headers={"content-type": "image/jpeg"}).json()["results"][0]
        assert single["top_k"][0]["index"] == result["top_k"][0]["index"]
        assert single["top_k"][0]["probability"] == pytest.approx(result["top_k"][0]["probability"], abs=1e-5)


def test_concurrent_requests_are_batched_and_match_single_results(service_url, real_photos):
    payloads = [p.read_bytes() for p in real_photos] * 6
    singles = {}
    for photo in real_photos:
        r = httpx.post(f"{service_url}/classify", content=photo.read_bytes(), headers={"content-type": "image/jpeg"})
        singles[photo.read_bytes()] = r.json()["results"][0]["top_k"]

    def post(data):
        return data, httpx.post(f"{service_url}/classify", content=data, headers={"content-type": "image/jpeg"},
                                timeout=60)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, payloads))
    batch_sizes = []
    for data, response in responses:
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        batch_sizes.append(result["batch_size"])
        assert [t["index"] for t in result["top_k"]] == [t["index"] for t in singles[data]]
        for got, want in zip(result["top_k"], singles[data], strict=True):
            assert got["probability"] == pytest.approx(want["probability"], abs=1e-4)
    assert max(batch_sizes) > 1
    metrics = httpx.get(f"{service_url}/metrics").text
    buckets = {line.split('le="')[1].split('"')[0]: float(line.split()[-1])
               for line in metrics.splitlines() if line.startswith("convnext_batch_size_bucket")}
    assert buckets["+Inf"] > buckets["1.0"]  # some batches held more than one image


def test_health_models_metrics_and_docs(service_url):
    assert httpx.get(f"{service_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{service_url}/readyz").json() == {"status": "ready"}
    models = httpx.get(f"{service_url}/models").json()
    assert models["models"][0]["name"] == "atto" and models["models"][0]["serving"] is True
    assert models["engine"]["name"] == "onnxruntime" and models["engine"]["provider"] == "cpu"
    assert httpx.get(f"{service_url}/docs").status_code == 200
    assert "/classify" in httpx.get(f"{service_url}/openapi.json").json()["paths"]
    text = httpx.get(f"{service_url}/metrics").text
    for name in ("convnext_requests_total", "convnext_request_duration_seconds", "convnext_queue_wait_seconds",
                 "convnext_preprocess_seconds", "convnext_inference_seconds", "convnext_batch_size",
                 "convnext_images_total", "convnext_queue_depth", "convnext_inflight_requests",
                 "convnext_model_info", "convnext_rejected_total"):
        assert name in text, name
    assert 'convnext_model_info{engine="onnxruntime",name="atto",precision="fp32",version="1"} 1.0' in text


def test_request_metrics_keep_their_labels_bounded_and_their_buckets_fine():
    """A method outside the standard ones is counted as "other" (h11 passes any token: one series per invented
    method otherwise); latency buckets resolve a 2 ms GPU request as well as a 2 s CPU batch."""
    metrics = ServiceMetrics()
    metrics.count_request("/classify", "XYZZY123", 405, 0.002)
    metrics.count_request("/classify", "POST", 200, 0.002)
    text = generate_latest(metrics.registry).decode()
    assert 'convnext_requests_total{method="other",route="/classify",status="405"} 1.0' in text
    assert 'status_class="4xx"' in text and 'status_class="2xx"' in text and "XYZZY" not in text
    bounds = np.array(LATENCY_BUCKETS)
    for seconds in (0.002, 0.02, 0.2, 2.0, 20.0):  # the bucket holding it spans at most 2x: quantiles within ~2x
        index = int(np.searchsorted(bounds, seconds))
        assert 0 < index < len(bounds) and bounds[index] / bounds[index - 1] <= 2.0, seconds



@pytest.fixture(scope="module")
def grey_repository(tmp_path_factory) -> Path:
    """convnext_atto taking 1-channel input (a project checkpoint with in_chans 1), exported as `grey`."""
    from dataclasses import asdict

    import torch

    import model
    from export.onnx import export_onnx_version

    root = tmp_path_factory.mktemp("grey")
    module = model.create_model("convnext_atto", in_chans=1, num_classes=10)
    data_config = asdict(model.get_config("convnext_atto").data) | {"mean": [0.5], "std": [0.5], "in_chans": 1}
    torch.save({"model_name": "convnext_atto", "model_kwargs": {"in_chans": 1, "num_classes": 10},
                "data_config": data_config, "model": module.state_dict()}, root / "grey.pth")
    export_onnx_version(root / "models", "grey", "convnext_atto", root / "grey.pth", input_size=64)
    return root / "models"


def test_a_model_that_does_not_take_rgb_serves_its_tensors_and_refuses_images(grey_repository, real_photos,
                                                                                launch):
    """A 1-channel model (export writes in_chans models) serves tensors over v2, but every image decodes to RGB: an
    image request is refused at once with where its tensors go, not failed with a 500 (an IndexError)."""
    with launch(grey_repository, warmup_runs=0) as url:
        refused = httpx.post(f"{url}/classify", content=real_photos[0].read_bytes(),
                             headers={"content-type": "image/jpeg"}, timeout=60)
        tensor = {"inputs": [{"name": "input", "shape": [1, 1, 64, 64], "datatype": "FP32",
                              "data": [0.0] * (64 * 64)}]}
        served = httpx.post(f"{url}/v2/models/grey/infer", json=tensor, timeout=60)
        no_image_model = httpx.get(f"{url}/v2/models/grey_image", timeout=60)  # its metadata said "RGB, resize ..."
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "not_an_image_model"
    assert "takes 1-channel input" in refused.json()["error"]["message"]
    assert "/v2/models/grey/infer" in refused.json()["error"]["message"]
    assert served.status_code == 200, served.text
    assert served.json()["outputs"][0]["shape"] == [1, 10]
    assert no_image_model.status_code == 404, no_image_model.text
    assert "1-channel tensors, so no image model" in no_image_model.json()["error"]

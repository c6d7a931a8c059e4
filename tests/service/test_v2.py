"""Open Inference Protocol (KServe v2), proven with the official tritonclient.http client, JSON and binary tensors."""
from __future__ import annotations

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from runtime.preprocess import preprocess
from runtime.repository import ModelRepository


@pytest.fixture(scope="module")
def batch_and_reference(model_repository, real_photos):
    version = ModelRepository(model_repository).load("atto")
    batch = np.stack([preprocess(p.read_bytes(), version.manifest.preprocess, 10**8) for p in real_photos[:3]])
    session = ort.InferenceSession(str(version.path / version.manifest.artifacts[0].file))
    return batch, session.run(None, {session.get_inputs()[0].name: batch})[0]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infer_matches_onnxruntime(service_url, batch_and_reference, binary):
    batch, reference = batch_and_reference
    client = triton.InferenceServerClient(service_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("atto")
    metadata = client.get_model_metadata("atto")
    assert metadata["inputs"][0]["shape"] == [-1, 3, 64, 64]
    tensor = triton.InferInput(metadata["inputs"][0]["name"], list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    output = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("atto", [tensor], outputs=[output])
    np.testing.assert_allclose(result.as_numpy("logits"), reference, atol=1e-4)


def test_v2_errors_are_the_protocols_json_body_and_tritonclient_shows_their_message(service_url):
    client = triton.InferenceServerClient(service_url.removeprefix("http://"))
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no-such-model")
    assert "is not served here" in str(raised.value)  # tritonclient raises the body's "error" as its message
    bad_shape = {"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]}
    response = httpx.post(f"{service_url}/v2/models/atto/infer", json=bad_shape)
    assert response.status_code == 400 and response.json()["code"] == "invalid_shape"
    assert isinstance(response.json()["error"], str)  # KServe required_api.md: {"error": <error message string>}
    assert httpx.get(f"{service_url}/v2").json()["extensions"] == ["binary_tensor_data", "classification"]

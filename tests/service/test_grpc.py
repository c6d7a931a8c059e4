"""The Open Inference Protocol over gRPC, proven with the official tritonclient.grpc against the real server."""
from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from runtime.preprocess import preprocess
from runtime.repository import ModelRepository
from service.grpc_proto import open_inference_pb2 as pb
from tests.service.conftest import free_port, metric
from tests.service.test_limits import BUDGET_LIMITS, finish_upload, slow_upload
from tests.service.test_security import recorded_compare_digest

API_KEY = "grpc-test-key"


def grpc_address(url) -> str:
    return f"127.0.0.1:{url.app.state.service.settings.grpc_port}"


@pytest.fixture(scope="module")
def served(model_repository, launch):
    with launch(model_repository, grpc_port=free_port(), max_batch_size=8, max_queue_delay_ms=20) as url:
        yield url, triton_grpc.InferenceServerClient(grpc_address(url))


def preprocessed_photos(repository: Path, photos: list[Path]) -> np.ndarray:
    """Three real photos as the served model's input batch."""
    version = ModelRepository(repository).load("atto")
    return np.stack([preprocess(p.read_bytes(), version.manifest.preprocess, 10**8) for p in photos[:3]])


@pytest.fixture(scope="module")
def batch(model_repository, real_photos) -> np.ndarray:
    return preprocessed_photos(model_repository, real_photos)


def fp32_input(batch: np.ndarray, name: str = "input", datatype: str = "FP32") -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return tensor


def raw_call(address: str, method: str, request: bytes, metadata=()) -> bytes:
    """One unary call with hand-made bytes, past any client library's checks."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        return call(request, metadata=metadata, timeout=30)


def status_of(error: InferenceServerException) -> str:
    return error.status().removeprefix("StatusCode.")


def test_health_and_metadata_over_grpc(served):
    url, client = served
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("atto")
    # An unknown model (or version) is not ready, as Triton answers it, rather than an error the client raises.
    assert client.is_model_ready("no-such-model") is False and client.is_model_ready("atto", "7") is False
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "convnext" and "binary_tensor_data" in server["extensions"]
    metadata = client.get_model_metadata("atto", as_json=True)
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "64", "64"]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert client.get_model_metadata("atto", as_json=True) == client.get_model_metadata("atto", "1", as_json=True)


def test_infer_matches_the_http_v2_answer_for_the_same_input(served, batch):
    url, client = served
    result = client.infer("atto", [fp32_input(batch)], outputs=[triton_grpc.InferRequestedOutput("logits")],
                          request_id="req-7")
    logits = result.as_numpy("logits")
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    response = result.get_response(as_json=True)
    assert (response["model_name"], response["model_version"], response["id"]) == ("atto", "1", "req-7")
    http = triton_http.InferenceServerClient(url.removeprefix("http://"))
    tensor = triton_http.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    np.testing.assert_allclose(logits, http.infer("atto", [tensor]).as_numpy("logits"), atol=1e-5)


def test_typed_fp32_contents_are_accepted_like_raw_contents(served, batch):
    url, client = served
    request = pb.ModelInferRequest(model_name="atto")
    request.inputs.add(name="input", datatype="FP32", shape=list(batch[:1].shape)).contents.fp32_contents.extend(
        batch[:1].reshape(-1).tolist())
    response = pb.ModelInferResponse.FromString(raw_call(grpc_address(url), "ModelInfer", request.SerializeToString()))
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(1, 10)
    expected = client.infer("atto", [fp32_input(batch[:1])]).as_numpy("logits")
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def image_input(photos) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("IMAGE", [len(photos)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in photos], dtype=object))
    return tensor


def test_the_encoded_image_model_preprocesses_like_classify(served, real_photos, batch):
    url, client = served
    metadata = client.get_model_metadata("atto_image", as_json=True)
    assert metadata["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": ["-1"]}]
    assert metadata["platform"] == "ensemble"
    photos = real_photos[:3]  # two JPEGs and a PNG
    result = client.infer("atto_image", [image_input(photos)])
    assert result.get_response().model_name == "atto_image"
    tensors = client.infer("atto", [fp32_input(batch)]).as_numpy("logits")
    np.testing.assert_allclose(result.as_numpy("logits"), tensors, atol=1e-5)  # the server's exact preprocessing


def parse_classes(entries: np.ndarray) -> list[list[tuple[float, int, str]]]:
    return [[(float(s), int(i), label) for s, i, label in (e.decode().split(":", 2) for e in row)] for row in entries]


@pytest.mark.parametrize("model", ["atto", "atto_image"])
def test_classification_over_grpc_equals_http_and_ranks_the_logits(served, real_photos, batch, model):
    url, client = served
    inputs = [image_input(real_photos[:3])] if model == "atto_image" else [fp32_input(batch)]
    asked = [triton_grpc.InferRequestedOutput("logits", class_count=3)]
    top = client.infer(model, inputs, outputs=asked).as_numpy("logits")
    assert top.shape == (3, 3) and top.dtype == object
    classes = parse_classes(top)
    logits = client.infer("atto", [fp32_input(batch)]).as_numpy("logits")
    labels = ModelRepository(url.app.state.service.settings.repository).load("atto").manifest.labels
    for row, ranked in zip(logits, classes, strict=True):
        assert [i for _, i, _ in ranked] == list(np.argsort(-row, kind="stable")[:3])
        assert [label for _, i, label in ranked] == [labels[i] for _, i, _ in ranked]
        np.testing.assert_allclose([s for s, _, _ in ranked], np.sort(row)[::-1][:3], atol=1e-5)
    http = triton_http.InferenceServerClient(url.removeprefix("http://"))
    if model == "atto_image":
        tensor = triton_http.InferInput("IMAGE", [3], "BYTES")
        tensor.set_data_from_numpy(np.array([p.read_bytes() for p in real_photos[:3]], dtype=object))
    else:
        tensor = triton_http.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
    over_http = http.infer(model, [tensor], outputs=[triton_http.InferRequestedOutput("logits", class_count=3)])
    for grpc_row, http_row in zip(classes, parse_classes(over_http.as_numpy("logits")), strict=True):
        assert [i for _, i, _ in grpc_row] == [i for _, i, _ in http_row]
        np.testing.assert_allclose([s for s, _, _ in grpc_row], [s for s, _, _ in http_row], atol=1e-5)


def test_classification_over_the_class_count_gives_every_class_over_grpc_too(served, real_photos, batch):
    url, client = served
    asked = [triton_grpc.InferRequestedOutput("logits", class_count=11)]  # of 10 classes: Triton gives all 10
    top = client.infer("atto_image", [image_input(real_photos[:3])], outputs=asked).as_numpy("logits")
    assert top.shape == (3, 10)
    logits = client.infer("atto", [fp32_input(batch)]).as_numpy("logits")
    for row, ranked in zip(logits, parse_classes(top), strict=True):
        assert [i for _, i, _ in ranked] == list(np.argsort(-row, kind="stable"))
    request = pb.ModelInferRequest(model_name="atto")  # k below 1 stays a client error
    request.inputs.add(name="input", datatype="FP32", shape=list(batch[:1].shape))
    request.raw_input_contents.append(batch[:1].tobytes())
    request.outputs.add(name="logits").parameters["classification"].CopyFrom(pb.InferParameter(int64_param=0))
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(grpc_address(url), "ModelInfer", request.SerializeToString())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "classification" in raised.value.details()


def test_typed_bytes_contents_and_bad_images_on_the_image_model(served, real_photos):
    url, client = served
    request = pb.ModelInferRequest(model_name="atto_image")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        real_photos[0].read_bytes())
    response = pb.ModelInferResponse.FromString(raw_call(grpc_address(url), "ModelInfer", request.SerializeToString()))
    expected = client.infer("atto_image", [image_input(real_photos[:1])]).as_numpy("logits")
    np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 10), expected,
                               atol=1e-5)
    broken = triton_grpc.InferInput("IMAGE", [1], "BYTES")
    broken.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("atto_image", [broken])
    assert status_of(raised.value) == "INVALID_ARGUMENT" and "IMAGE[0]" in raised.value.message()
    assert client.is_server_ready()


@pytest.mark.parametrize("bad,status,words", [
    (lambda b: ("atto", [fp32_input(np.zeros((1, 3, 8, 8), np.float32))]), "INVALID_ARGUMENT", "shape"),
    (lambda b: ("atto", [fp32_input(b.astype(np.float64), datatype="FP64")]), "INVALID_ARGUMENT", "datatype"),
    (lambda b: ("atto", [fp32_input(b, name="pixels")]), "INVALID_ARGUMENT", "'input'"),
    (lambda b: ("no-such-model", [fp32_input(b)]), "NOT_FOUND", "no-such-model"),
], ids=["wrong-shape", "wrong-datatype", "wrong-input-name", "unknown-model"])
def test_bad_calls_get_their_grpc_code_and_a_message(served, batch, bad, status, words):
    url, client = served
    with pytest.raises(InferenceServerException) as raised:
        client.infer(*bad(batch))
    assert status_of(raised.value) == status and words in raised.value.message()
    assert client.is_server_ready()


def test_malformed_messages_are_invalid_argument_and_the_server_keeps_serving(served, batch):
    url, client = served
    address = grpc_address(url)
    request = pb.ModelInferRequest(model_name="atto")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 64, 64])
    short = request.SerializeToString() + pb.ModelInferRequest(raw_input_contents=[b"\0" * 12]).SerializeToString()
    two_raw = pb.ModelInferRequest(raw_input_contents=[b"", b""]).SerializeToString()
    negative = pb.ModelInferRequest(model_name="atto")
    negative.inputs.add(name="input", datatype="FP32", shape=[-1, 3, 64, 64]).contents.fp32_contents.append(0.0)
    nan = pb.ModelInferRequest(model_name="atto", raw_input_contents=[np.full((1, 3, 64, 64), np.nan, "<f4").tobytes()])
    nan.inputs.add(name="input", datatype="FP32", shape=[1, 3, 64, 64])
    fp64_for_fp32 = pb.ModelInferRequest(model_name="atto")  # typed contents in another datatype's field
    fp64_for_fp32.inputs.add(name="input", datatype="FP32", shape=[1, 3, 64, 64]).contents.fp64_contents.extend(
        [0.0] * (3 * 64 * 64))
    for body in [b"\xff\xff\xff", short, request.SerializeToString() + two_raw, negative.SerializeToString(),
                 nan.SerializeToString(), fp64_for_fp32.SerializeToString()]:
        with pytest.raises(grpc.RpcError) as raised:
            raw_call(address, "ModelInfer", body)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        assert dict(raised.value.trailing_metadata())["convnext-error-code"].startswith("invalid_")
    assert client.is_server_ready()
    assert client.infer("atto", [fp32_input(batch[:1])]).as_numpy("logits").shape == (1, 10)
    text = httpx.get(f"{url}/metrics").text
    assert 'convnext_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}' in text
    assert 'convnext_grpc_requests_total{code="OK",method="ModelInfer"}' in text


def test_a_message_of_a_million_outputs_or_parameters_is_refused_before_it_is_converted(served, batch):
    """Converting them would hold the event loop (HTTP's too) for seconds; counting them costs nothing."""
    url, client = served
    outputs = pb.ModelInferRequest(model_name="atto", raw_input_contents=[batch[:1].astype("<f4").tobytes()])
    outputs.inputs.add(name="input", datatype="FP32", shape=[1, 3, 64, 64])
    for _ in range(10**6):
        outputs.outputs.add(name="logits")
    parameters = pb.ModelInferRequest()
    parameters.CopyFrom(outputs)
    del parameters.outputs[:]
    for i in range(10**5):
        parameters.parameters[f"p{i}"].int64_param = i
    for request, words in [(outputs, "1000000 outputs"), (parameters, "over the limit of 64 entries")]:
        with pytest.raises(grpc.RpcError) as raised:
            raw_call(grpc_address(url), "ModelInfer", request.SerializeToString())
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in raised.value.details()
    assert client.infer("atto", [fp32_input(batch[:1])]).as_numpy("logits").shape == (1, 10)


def test_a_batch_over_the_request_limit_is_invalid_argument_not_a_retryable_code(served):
    url, client = served
    images = triton_grpc.InferInput("IMAGE", [33], "BYTES")  # max_files_per_request is 32
    images.set_data_from_numpy(np.array([b"x"] * 33, dtype=object))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("atto_image", [images])
    # RESOURCE_EXHAUSTED is retried by gRPC clients; this request can never succeed (Triton: INVALID_ARGUMENT)
    assert status_of(raised.value) == "INVALID_ARGUMENT" and "over the limit of 32" in raised.value.message()


ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}


def mutated_requests(batch: np.ndarray, seed: int = 16):
    """Valid ModelInfer requests with one part made wrong at random, then flipped or truncated bytes of valid ones."""
    rng = np.random.default_rng(seed)
    parameter_values = [{"bool_param": True}, {"int64_param": -3}, {"int64_param": 0}, {"int64_param": 2**62},
                        {"string_param": "3"}, {"double_param": float("nan")}, {"uint64_param": 2**64 - 1}, {}]
    for case in range(150):
        request = pb.ModelInferRequest(model_name=str(rng.choice(["atto", "atto_image", "atto", ""])))
        shape = [1, 3, 64, 64]
        if case % 5 == 1:
            shape[int(rng.integers(4))] = int(rng.choice([-1, 0, 2, 65, 2**40, -(2**63)]))
        tensor = request.inputs.add(name=str(rng.choice(["input", "IMAGE", ""])), shape=shape,
                                    datatype=str(rng.choice(["FP32", "BYTES", "FP16", "INT64", "nonsense"])))
        raw = batch[:1].tobytes()
        if case % 7 == 2:
            raw = raw[: int(rng.integers(len(raw)))]
        request.raw_input_contents.append(raw)
        if case % 3 == 0:
            output = request.outputs.add(name=str(rng.choice(["logits", "other"])))
            output.parameters["classification"].CopyFrom(pb.InferParameter(**parameter_values[case % 8]))
        if case % 11 == 3:
            tensor.contents.fp32_contents.append(1.0)  # both raw and typed contents
        if case % 13 == 4:
            request.raw_input_contents.append(b"extra")
        body = request.SerializeToString()
        if case % 4 == 3:  # damage the encoding itself
            body = bytearray(body[: max(1, int(rng.integers(len(body))))])
            body[int(rng.integers(len(body)))] ^= 0xFF
            body = bytes(body)
        yield body


def test_mutated_calls_get_only_client_error_codes_and_the_server_stays_ready(served, batch):
    url, client = served
    answered = []
    with grpc.insecure_channel(grpc_address(url)) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for body in mutated_requests(batch):
            try:
                call(body, timeout=30)
                answered.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                assert err.code() in ANSWERS, (err.code(), err.details())
                answered.append(err.code())
    assert grpc.StatusCode.INVALID_ARGUMENT in answered and grpc.StatusCode.OK in answered
    assert client.is_server_ready()
    assert client.infer("atto", [fp32_input(batch[:1])]).as_numpy("logits").shape == (1, 10)


def test_api_key_and_message_size_limit_apply_to_grpc(model_repository, launch, batch, monkeypatch):
    compared = recorded_compare_digest(monkeypatch)  # the key is compared in constant time, as over HTTP
    with launch(model_repository, grpc_port=free_port(), api_key=API_KEY, max_body_bytes=100_000) as url:
        client = triton_grpc.InferenceServerClient(grpc_address(url))
        assert client.is_server_live() and client.is_server_ready()  # public, like /v2/health/*
        for headers in [None, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}]:
            with pytest.raises(InferenceServerException) as raised:
                client.get_model_metadata("atto", headers=headers)
            assert status_of(raised.value) == "UNAUTHENTICATED" and "API key" in raised.value.message()
            with pytest.raises(InferenceServerException) as raised:
                client.infer("atto", [fp32_input(batch[:1])], headers=headers)
            assert status_of(raised.value) == "UNAUTHENTICATED"
        for headers in [{"authorization": f"Bearer {API_KEY}"}, {"x-api-key": API_KEY}]:
            assert client.get_model_metadata("atto", headers=headers).name == "atto"
            assert client.infer("atto", [fp32_input(batch[:1])], headers=headers).as_numpy("logits").shape == (1, 10)
        assert {(b"wrong", API_KEY.encode()), (API_KEY.encode(), API_KEY.encode())} <= set(compared)
        with pytest.raises(InferenceServerException) as raised:  # 3 images of 48 KiB: over 100 kB
            client.infer("atto", [fp32_input(batch)], headers={"x-api-key": API_KEY})
        assert status_of(raised.value) == "RESOURCE_EXHAUSTED"
        assert client.is_server_ready()


def test_grpc_messages_count_against_the_memory_bound_that_http_bodies_share(model_repository, launch):
    tensors = np.zeros((15, 3, 64, 64), np.float32)  # 720 KiB
    with launch(model_repository, grpc_port=free_port(), **BUDGET_LIMITS) as url:
        client = triton_grpc.InferenceServerClient(grpc_address(url))
        slow = [slow_upload(url), slow_upload(url)]  # 1800 KiB of HTTP bodies held
        with pytest.raises(InferenceServerException) as raised:
            client.infer("atto", [fp32_input(tensors)])
        assert status_of(raised.value) == "UNAVAILABLE" and "max_buffered_body_bytes" in raised.value.message()
        assert metric(url, 'convnext_rejected_total{reason="body_buffer_full"}') == 1
        for upload in slow:
            finish_upload(upload)
        assert client.infer("atto", [fp32_input(tensors)]).as_numpy("logits").shape == (15, 10)
        assert metric(url, "convnext_buffered_body_bytes") == 0

"""The Open Inference Protocol over real HTTP: malformed requests, classification, the encoded-image model."""
from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from runtime.preprocess import preprocess
from service.v2 import INLINE_MAX_JSON_BYTES

INFER = "/v2/models/atto/infer"
IMAGE_INFER = "/v2/models/atto_image/infer"
ZEROS = [0.0] * (3 * 64 * 64)


@pytest.fixture(scope="module")
def reference(version):
    """ONNX Runtime on the serving preprocessing of a file's bytes: what /classify's engine sees."""
    session = ort.InferenceSession(str(version.path / version.manifest.artifacts[0].file))

    def logits_of(images: list[bytes]) -> np.ndarray:
        batch = np.stack([preprocess(data, version.manifest.preprocess, 10**8) for data in images])
        return session.run(None, {session.get_inputs()[0].name: batch})[0]

    return logits_of


def fp32_input(shape=(1, 3, 64, 64), data=ZEROS, **fields) -> dict:
    return {"name": "input", "shape": list(shape), "datatype": "FP32", "data": data} | fields


def binary_request(header: dict, binary: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + binary, {"Inference-Header-Content-Length": str(len(head))}


def bytes_elements(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def image_input(*images: bytes) -> dict:
    raw = bytes_elements(*images)
    return {"name": "IMAGE", "shape": [len(images)], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}


ZERO_BYTES = np.zeros((1, 3, 64, 64), "<f4").tobytes()
NAN_BYTES = np.full((1, 3, 64, 64), np.nan, "<f4").tobytes()
VALID = json.dumps({"inputs": [fp32_input()]}).encode()
BINARY_HEADER = {"inputs": [fp32_input(data=None, parameters={"binary_data_size": len(ZERO_BYTES)})]}
BINARY_BODY, _ = binary_request(BINARY_HEADER, ZERO_BYTES)


def raw_json(text: str) -> bytes:
    return text.replace("ZEROS", json.dumps(ZEROS)).encode()


# (path, body, headers, status, code): each a malformed request from issue 16 or a neighbour of one.
MALFORMED = {
    "not_json": (INFER, b"{'inputs': ", {}, 400, "invalid_json"),
    "not_an_object": (INFER, b"[1, 2]", {}, 400, "invalid_request"),
    "float_shape_entry": (INFER, raw_json('{"inputs": [{"name": "input", "shape": [1, 3, 64, 64.5], '
                                          '"datatype": "FP32", "data": ZEROS}]}'), {}, 400, "invalid_request"),
    "null_shape_entry": (INFER, raw_json('{"inputs": [{"name": "input", "shape": [null, 3, 64, 64], '
                                         '"datatype": "FP32", "data": ZEROS}]}'), {}, 400, "invalid_request"),
    "bool_shape_entry": (INFER, raw_json('{"inputs": [{"name": "input", "shape": [true, 3, 64, 64], '
                                         '"datatype": "FP32", "data": ZEROS}]}'), {}, 400, "invalid_request"),
    "nan_data": (INFER, raw_json('{"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", '
                                 '"data": [NaN' + ', 0.0' * (3 * 64 * 64 - 1) + ']}]}'), {}, 400, "invalid_data"),
    "infinite_data": (INFER, raw_json('{"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", '
                                      '"data": [1e39' + ', 0.0' * (3 * 64 * 64 - 1) + ']}]}'), {}, 400,
                      "invalid_data"),
    "string_data": (INFER, json.dumps({"inputs": [fp32_input(data=["0.5"] * len(ZEROS))]}).encode(), {}, 400,
                    "invalid_data"),
    "bool_data": (INFER, json.dumps({"inputs": [fp32_input(data=[True] * len(ZEROS))]}).encode(), {}, 400,
                  "invalid_data"),
    "too_little_data": (INFER, json.dumps({"inputs": [fp32_input(data=[0.0] * 5)]}).encode(), {}, 400,
                        "invalid_data"),
    "no_data": (INFER, json.dumps({"inputs": [fp32_input(data=None)]}).encode(), {}, 400, "invalid_data"),
    "input_not_an_object": (INFER, b'{"inputs": [5]}', {}, 400, "invalid_request"),
    "inputs_not_a_list": (INFER, b'{"inputs": {"name": "input"}}', {}, 400, "invalid_request"),
    "outputs_not_a_list": (INFER, json.dumps({"inputs": [fp32_input()], "outputs": {"name": "logits"}}).encode(),
                           {}, 400, "invalid_request"),
    "two_inputs": (INFER, json.dumps({"inputs": [fp32_input(), fp32_input()]}).encode(), {}, 400, "invalid_input"),
    "unknown_input": (INFER, json.dumps({"inputs": [fp32_input(name="pixels")]}).encode(), {}, 400,
                      "invalid_input"),
    "unknown_output": (INFER, json.dumps({"inputs": [fp32_input()], "outputs": [{"name": "probs"}]}).encode(), {},
                       400, "invalid_output"),
    "wrong_datatype": (INFER, json.dumps({"inputs": [fp32_input(datatype="INT64")]}).encode(), {}, 400,
                       "invalid_datatype"),
    "wrong_image_size": (INFER, json.dumps({"inputs": [fp32_input(shape=(1, 3, 8, 8))]}).encode(), {}, 400,
                         "invalid_shape"),
    "huge_batch": (INFER, json.dumps({"inputs": [fp32_input(shape=(10**12, 3, 64, 64))]}).encode(), {}, 413,
                   "too_many_images"),
    "huge_image": (INFER, json.dumps({"inputs": [fp32_input(shape=(1, 3, 64, 10**15))]}).encode(), {}, 400,
                   "invalid_shape"),
    "beyond_int64": (INFER, json.dumps({"inputs": [fp32_input(shape=(10**30, 3, 64, 64))]}).encode(), {}, 400,
                     "invalid_request"),
    "empty_batch": (INFER, json.dumps({"inputs": [fp32_input(shape=(0, 3, 64, 64), data=[])]}).encode(), {}, 400,
                    "invalid_shape"),
    "negative_shape": (INFER, json.dumps({"inputs": [fp32_input(shape=(-1, 3, 64, 64))]}).encode(), {}, 400,
                       "invalid_request"),
    "header_length_not_integer": (INFER, BINARY_BODY, {"Inference-Header-Content-Length": "12.5"}, 400,
                                  "invalid_header_length"),
    "header_length_negative": (INFER, BINARY_BODY, {"Inference-Header-Content-Length": "-3"}, 400,
                               "invalid_header_length"),
    "header_length_beyond_body": (INFER, BINARY_BODY,
                                  {"Inference-Header-Content-Length": str(10**30)}, 400, "invalid_header_length"),
    "header_length_cuts_the_json": (INFER, BINARY_BODY, {"Inference-Header-Content-Length": "10"}, 400,
                                    "invalid_json"),
    "binary_data_size_string": (INFER, *binary_request(
        {"inputs": [{**fp32_input(data=None), "parameters": {"binary_data_size": "49152"}}]}, ZERO_BYTES), 400,
        "invalid_request"),
    "binary_data_size_float": (INFER, *binary_request(
        {"inputs": [{**fp32_input(data=None), "parameters": {"binary_data_size": 49152.0}}]}, ZERO_BYTES), 400,
        "invalid_request"),
    "binary_data_size_negative": (INFER, *binary_request(
        {"inputs": [{**fp32_input(data=None), "parameters": {"binary_data_size": -4}}]}, ZERO_BYTES), 400,
        "invalid_request"),
    "binary_data_size_wrong": (INFER, *binary_request(
        {"inputs": [{**fp32_input(data=None), "parameters": {"binary_data_size": 4}}]}, ZERO_BYTES[:4]), 400,
        "invalid_binary_data"),
    "binary_truncated": (INFER, *binary_request(BINARY_HEADER, ZERO_BYTES[:1000]), 400, "invalid_binary_data"),
    "binary_left_over": (INFER, *binary_request(BINARY_HEADER, ZERO_BYTES + b"\0" * 8), 400, "invalid_binary_data"),
    "binary_without_size": (INFER, *binary_request({"inputs": [fp32_input()]}, ZERO_BYTES), 400,
                            "invalid_binary_data"),
    "binary_nan": (INFER, *binary_request(BINARY_HEADER, NAN_BYTES), 400, "invalid_data"),
    "seventeen_outputs": (INFER, json.dumps({"inputs": [fp32_input()], "outputs": [{"name": "logits"}] * 17}).encode(),
                          {}, 400, "invalid_request"),
    "seventeen_inputs": (INFER, json.dumps({"inputs": [fp32_input(data=None)] * 17}).encode(), {}, 400,
                         "invalid_request"),
    "65_parameters": (INFER, json.dumps({"inputs": [fp32_input()], "parameters": {f"p{i}": i for i in range(65)}}
                                        ).encode(), {}, 400, "invalid_request"),
    "rank_17": (INFER, json.dumps({"inputs": [fp32_input(shape=(1,) * 17)]}).encode(), {}, 400, "invalid_request"),
    "classification_zero": (INFER, json.dumps({"inputs": [fp32_input()], "outputs": [
        {"name": "logits", "parameters": {"classification": 0}}]}).encode(), {}, 400, "invalid_request"),
    "classification_bool": (INFER, json.dumps({"inputs": [fp32_input()], "outputs": [
        {"name": "logits", "parameters": {"classification": True}}]}).encode(), {}, 400, "invalid_request"),
    "parameter_nan": (INFER, raw_json('{"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", '
                                      '"data": ZEROS, "parameters": {"x": NaN}}]}'), {}, 400, "invalid_request"),
    "unknown_model": ("/v2/models/resnet/infer", VALID, {}, 404, "model_not_found"),
    "unknown_version": ("/v2/models/atto/versions/7/infer", VALID, {}, 404, "model_not_found"),
    "image_as_fp32": (IMAGE_INFER, json.dumps({"inputs": [{**fp32_input(), "name": "IMAGE"}]}).encode(), {}, 400,
                      "invalid_datatype"),
    "image_not_base64": (IMAGE_INFER, json.dumps({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                                                              "data": ["not base64!"]}]}).encode(), {}, 400,
                         "invalid_data"),
    "image_element_too_long": (IMAGE_INFER, *binary_request(
        {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]},
        struct.pack("<I", 2**32 - 1) + b"abcd"), 400, "invalid_binary_data"),
    "image_count_differs": (IMAGE_INFER, *binary_request({"inputs": [{**image_input(b"a", b"b"), "shape": [3]}]},
                                                         bytes_elements(b"a", b"b")), 400, "invalid_binary_data"),
    "too_many_images": (IMAGE_INFER, *binary_request({"inputs": [image_input(*[b"x"] * 33)]},
                                                     bytes_elements(*[b"x"] * 33)), 413, "too_many_images"),
    "image_not_an_image": (IMAGE_INFER, *binary_request({"inputs": [image_input(b"plain text")]},
                                                        bytes_elements(b"plain text")), 400, "not_an_image"),
    "nested_data_not_the_shape": (INFER, json.dumps({"inputs": [fp32_input(data=[[0.0] * 192] * 64)]}).encode(), {},
                                  400, "invalid_data"),
    "gzip_header_on_plain_json": (INFER, VALID, {"Content-Encoding": "gzip"}, 400, "invalid_body"),
    "gzip_truncated": (INFER, gzip.compress(VALID)[:-12], {"Content-Encoding": "gzip"}, 400, "invalid_body"),
    "gzip_over_the_body_limit": (INFER, gzip.compress(b" " * (21 << 20)), {"Content-Encoding": "gzip"}, 413,
                                 "body_too_large"),  # ~21 KB on the wire, 21 MiB decompressed: the limit is 20 MiB
    "unknown_encoding": (INFER, VALID, {"Content-Encoding": "br"}, 415, "unsupported_media_type"),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_each_malformed_request_gets_a_json_4xx_with_its_code(service_url, case):
    path, body, headers, status, code = case
    response = httpx.post(f"{service_url}{path}", content=body, headers=headers)
    assert response.status_code == status, response.text
    body = response.json()  # the protocol's error body: "error" is the message string
    assert body["code"] == code and isinstance(body["error"], str) and body["error"]


def test_the_service_still_serves_after_the_malformed_requests(service_url):
    for case in MALFORMED.values():
        path, body, headers, _, _ = case
        httpx.post(f"{service_url}{path}", content=body, headers=headers)
    assert httpx.get(f"{service_url}/v2/health/ready").json() == {"ready": True}
    assert httpx.post(f"{service_url}{INFER}", content=VALID).status_code == 200
    assert httpx.post(f"{service_url}/v2/models/atto/versions/1/infer", content=VALID).status_code == 200
    body, headers = binary_request(BINARY_HEADER, ZERO_BYTES)
    assert httpx.post(f"{service_url}{INFER}", content=body, headers=headers).status_code == 200


def triton_strings(values) -> list[tuple[float, int, str]]:
    """b"score:index:label" (or str) -> (score, index, label)."""
    parsed = []
    for value in np.asarray(values).reshape(-1):
        score, index, label = (value.decode() if isinstance(value, bytes) else value).split(":", 2)
        parsed.append((float(score), int(index), label))
    return parsed


def test_classification_returns_the_top_k_as_triton_strings(service_url, version):
    batch = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    request = {"id": "req-1", "inputs": [fp32_input(shape=batch.shape, data=batch.reshape(-1).tolist())],
               "outputs": [{"name": "logits"}, {"name": "logits", "parameters": {"classification": 3}}]}
    response = httpx.post(f"{service_url}{INFER}", json=request)
    assert response.status_code == 400  # one output, named twice: refused
    request["outputs"] = [{"name": "logits", "parameters": {"classification": 3}}]
    plain = httpx.post(f"{service_url}{INFER}", json={"inputs": request["inputs"]}).json()
    logits = np.array(plain["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
    answer = httpx.post(f"{service_url}{INFER}", json=request).json()
    assert answer["id"] == "req-1"
    output = answer["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 3]
    labels = version.manifest.labels
    for row, strings in zip(logits, np.array(output["data"]).reshape(2, 3), strict=True):
        top = triton_strings(strings)
        assert [index for _, index, _ in top] == list(np.argsort(-row, kind="stable")[:3])
        assert [label for _, _, label in top] == [labels[i] for _, i, _ in top]
        assert [s for s, _, _ in top] == pytest.approx([row[i] for _, i, _ in top], abs=1e-5)


@pytest.mark.parametrize("k", [11, 2**62])
def test_classification_over_the_class_count_gives_every_class_as_triton_does(service_url, version, k):
    batch = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    inputs = [fp32_input(shape=batch.shape, data=batch.reshape(-1).tolist())]
    logits = np.array(httpx.post(f"{service_url}{INFER}", json={"inputs": inputs}).json()["outputs"][0]["data"],
                      dtype=np.float32).reshape(2, 10)
    response = httpx.post(f"{service_url}{INFER}", json={"inputs": inputs, "outputs": [
        {"name": "logits", "parameters": {"classification": k}}]})
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["shape"] == [2, 10] and len(output["data"]) == 20  # Triton: min(k, the class count)
    for row, strings in zip(logits, np.array(output["data"]).reshape(2, 10), strict=True):
        assert [index for _, index, _ in triton_strings(strings)] == list(np.argsort(-row, kind="stable"))


def test_image_model_metadata_says_it_decodes_like_classify(service_url):
    metadata = httpx.get(f"{service_url}/v2/models/atto_image").json()
    assert metadata["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert metadata["platform"] == "ensemble"  # the protocol's <project>_<format> names; Triton's for a pipeline
    assert "decodes and preprocesses like /classify" in metadata["parameters"]["pipeline"]
    assert httpx.get(f"{service_url}/v2/models/atto").json()["platform"] == "onnxruntime_onnx"
    assert "/classify" in metadata["parameters"]["preprocess"]
    assert httpx.get(f"{service_url}/v2/models/atto_image/ready").json() == {"name": "atto_image", "ready": True}


@pytest.mark.parametrize("binary", [False, True], ids=["json_base64", "binary"])
def test_image_model_gives_the_logits_of_classify_preprocessing(service_url, real_photos, reference, binary):
    images = [path.read_bytes() for path in real_photos[1:4]]  # a JPEG and two PNGs
    if binary:
        body, headers = binary_request({"inputs": [image_input(*images)]}, bytes_elements(*images))
        response = httpx.post(f"{service_url}{IMAGE_INFER}", content=body, headers=headers)
    else:
        data = [base64.b64encode(image).decode() for image in images]
        request = {"inputs": [{"name": "IMAGE", "shape": [len(images)], "datatype": "BYTES", "data": data}]}
        response = httpx.post(f"{service_url}{IMAGE_INFER}", json=request)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == "atto_image"
    logits = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(len(images), 10)
    np.testing.assert_allclose(logits, reference(images), atol=1e-4)


NOT_ASCII = ["é", "héllo", "☃☃☃", "\uffff", "𝕏"]


@pytest.mark.parametrize("padding", [0, INLINE_MAX_JSON_BYTES], ids=["inline", "worker_thread"])
@pytest.mark.parametrize("text", NOT_ASCII)
def test_image_model_json_text_that_is_not_ascii_is_400_invalid_data(service_url, padding, text):
    # b64decode refuses a str with non-ASCII characters with a plain ValueError, not binascii.Error: once a 500.
    data = [base64.b64encode(bytes(padding)).decode(), text] if padding else [text]
    body = json.dumps({"inputs": [{"name": "IMAGE", "shape": [len(data)], "datatype": "BYTES", "data": data}]},
                      ensure_ascii=False).encode()  # UTF-8 text, as tritonclient sends it
    assert (len(body) > INLINE_MAX_JSON_BYTES) == (padding > 0)  # the JSON part parsed on the loop, or in a thread
    response = httpx.post(f"{service_url}{IMAGE_INFER}", content=body)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_data" and "base64" in response.json()["error"]


def test_tritonclient_text_in_json_on_the_image_model_is_a_client_error(service_url):
    tensor = triton.InferInput("IMAGE", [1], "BYTES")
    tensor.set_data_from_numpy(np.array(["héllo".encode()], dtype=object), binary_data=False)  # sent as the text
    with pytest.raises(InferenceServerException, match="base64") as raised:
        client_for(service_url).infer("atto_image", [tensor])
    assert raised.value.status() == "400"
    assert httpx.get(f"{service_url}/v2/health/ready").json() == {"ready": True}


def test_openapi_declares_the_v2_infer_body_and_its_errors(service_url):
    operation = httpx.get(f"{service_url}/openapi.json").json()["paths"]["/v2/models/{name}/infer"]["post"]
    body = operation["requestBody"]["content"]
    assert body["application/json"]["schema"]["required"] == ["inputs"]
    shape = body["application/json"]["schema"]["properties"]["inputs"]["items"]["properties"]["shape"]
    assert shape["items"] == {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    assert "application/octet-stream" in body
    for status in ("400", "404", "413", "503"):
        schema = operation["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/V2ErrorResponse"}


def client_for(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_tensor_model_with_and_without_classification(service_url, real_photos, reference, binary,
                                                                   version):
    images = [path.read_bytes() for path in real_photos[:2]]
    batch = np.stack([preprocess(data, version.manifest.preprocess, 10**8) for data in images])
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    client = client_for(service_url)
    logits = client.infer("atto", [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
    expected = reference(images)
    np.testing.assert_allclose(logits.as_numpy("logits"), expected, atol=1e-4)
    top = client.infer("atto", [tensor], outputs=[
        triton.InferRequestedOutput("logits", binary_data=binary, class_count=4)]).as_numpy("logits")
    assert top.shape == (2, 4)
    for row, strings in zip(expected, top, strict=True):
        parsed = triton_strings(strings)
        assert [index for _, index, _ in parsed] == list(np.argsort(-row, kind="stable")[:4])
        assert [label for _, _, label in parsed] == [version.manifest.labels[i] for _, i, _ in parsed]


@pytest.mark.parametrize("class_count", [0, 2], ids=["logits", "classification"])
def test_tritonclient_image_model(service_url, real_photos, reference, version, class_count):
    images = [path.read_bytes() for path in real_photos[2:5]]
    client = client_for(service_url)
    assert client.is_model_ready("atto_image")
    assert client.get_model_metadata("atto_image")["inputs"][0]["datatype"] == "BYTES"
    tensor = triton.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    output = triton.InferRequestedOutput("logits", binary_data=True, class_count=class_count)
    result = client.infer("atto_image", [tensor], outputs=[output]).as_numpy("logits")
    expected = reference(images)
    if class_count == 0:
        np.testing.assert_allclose(result, expected, atol=1e-4)
        return
    assert result.shape == (len(images), class_count)
    for row, strings in zip(expected, result, strict=True):
        parsed = triton_strings(strings)
        assert [index for _, index, _ in parsed] == list(np.argsort(-row, kind="stable")[:class_count])
        assert [score for score, _, _ in parsed] == pytest.approx([row[i] for _, i, _ in parsed], abs=1e-4)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests_give_the_uncompressed_answer(service_url, version, algorithm):
    batch = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    client = client_for(service_url)
    answers = []
    for compression in (None, algorithm):
        tensor = triton.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=False)
        answers.append(client.infer("atto", [tensor], request_compression_algorithm=compression).as_numpy("logits"))
    np.testing.assert_array_equal(answers[1], answers[0])
    raw = httpx.post(f"{service_url}{INFER}", content=zlib.compress(VALID) if algorithm == "deflate" else
                     gzip.compress(VALID), headers={"Content-Encoding": algorithm, "Content-Type": "application/json"})
    assert raw.status_code == 200 and raw.json()["outputs"][0]["shape"] == [1, 10]


def test_nested_data_along_the_shape_is_accepted_flat_below_any_level(service_url):
    image = np.arange(3 * 64 * 64, dtype=np.float32).reshape(1, 3, 64, 64) / 5000
    answers = [httpx.post(f"{service_url}{INFER}", json={"inputs": [fp32_input(data=data)]}).json()["outputs"][0]
               ["data"] for data in (image.reshape(-1).tolist(), image.tolist(), image.reshape(1, -1).tolist(),
                                     image.reshape(1, 3, -1).tolist())]
    assert all(answer == answers[0] for answer in answers)


@pytest.mark.parametrize("queue_size", [1, 4, 256])
def test_data_nested_along_the_shape_for_the_largest_batch_is_within_the_container_bound(model_repository, queue_size):
    """The bound on a JSON part's arrays and objects lets through any request the model takes: queue_size images of
    data nested to the last dimension, with the envelope, shapes, outputs and parameters around them."""
    from runtime.repository import ModelRepository
    from service.settings import Settings
    from service.v2 import max_json_containers

    manifest = ModelRepository(model_repository).load("atto").manifest
    request = {"id": "r", "parameters": {"p": [[1], [2]]},
               "inputs": [fp32_input(shape=(queue_size, 3, 64, 64), data=np.zeros((queue_size, 3, 64, 64)).tolist(),
                                     parameters={"q": {"r": [1]}})],
               "outputs": [{"name": "logits", "parameters": {"classification": 3}}] * 16}
    body = json.dumps(request).encode()
    assert body.count(b"[") + body.count(b"{") <= max_json_containers(manifest, Settings(queue_size=queue_size))


def test_a_json_part_of_more_arrays_than_any_request_needs_is_refused_before_its_parse(service_url):
    """20 KiB of gzip inflating to a million empty arrays (~3 MB; a 20 MiB body holds 7 million): parsed, each a
    Python list, 0.8 GB and seconds of the GIL for 20 MiB; refused from a count of the bytes, the service still
    answering at once."""
    data = b"[]," * 1_000_000 + b"0"
    body = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": [' + data + b"]}]}"
    response = httpx.post(f"{service_url}{INFER}", content=gzip.compress(body), headers={"content-encoding": "gzip"},
                          timeout=30)
    assert response.status_code == 400 and response.json()["code"] == "invalid_json", response.text
    assert "1000005 arrays and objects" in response.json()["error"] and "binary data" in response.json()["error"]
    assert httpx.get(f"{service_url}/readyz").status_code == 200


def test_binary_data_without_the_header_length_says_which_header_is_missing(service_url):
    response = httpx.post(f"{service_url}{INFER}", content=BINARY_BODY)
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]


def test_error_messages_repeat_at_most_200_characters_of_what_the_client_sent(service_url):
    long_name = "x" * 100_000
    response = httpx.post(f"{service_url}{INFER}", json={"inputs": [fp32_input(name=long_name)]})
    assert response.status_code == 400 and response.json()["code"] == "invalid_input"
    assert len(response.json()["error"]) < 400 and "(100004 characters)" in response.json()["error"]


LONG = "x" * 3000
ECHO_CASES = {  # what a client sent that the message repeats: the path's model name, a datatype, a header
    "model name": lambda url: httpx.post(f"{url}/v2/models/{LONG}/infer", json={"inputs": [fp32_input()]}),
    "datatype": lambda url: httpx.post(f"{url}{INFER}", json={"inputs": [fp32_input(datatype=LONG)]}),
    "content type": lambda url: httpx.post(f"{url}/classify", content=b"x", headers={"Content-Type": LONG}),
    "reload content type": lambda url: httpx.post(f"{url}/admin/reload", content=b"{}",
                                                  headers={"Content-Type": LONG}),
    "content encoding": lambda url: httpx.post(f"{url}/classify", content=b"x",
                                               headers={"Content-Type": "image/png", "Content-Encoding": LONG}),
}


@pytest.mark.parametrize("case", ECHO_CASES)
def test_names_and_headers_are_repeated_clipped_too(service_url, case):
    response = ECHO_CASES[case](service_url)
    assert 400 <= response.status_code < 500, response.text
    assert response.text.count("x") <= 200 + 10 and "(3002 characters)" in response.text, response.text

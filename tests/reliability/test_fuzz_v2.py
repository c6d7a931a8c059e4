"""Open Inference Protocol (v2) infer, fuzzed from valid requests: every answer is 200 or a JSON 4xx, never a 5xx.

A seeded mutator starts from valid requests (JSON data, and the binary-data extension) with the served model's real
input, and breaks one thing at a time, by class: keys dropped or renamed, values of the wrong type, NaN and
infinities, bad shapes, wrong datatypes, truncated or extra binary bytes, bad Inference-Header-Content-Length,
bad binary_data_size, malformed outputs, a bad classification parameter, malformed JSON. Each class is its own test,
so a failure names the class; the service must still be ready and serving afterwards. The image model's JSON strings
(base64 with other characters put in, non-ASCII text among them) are fuzzed on their own.
"""
from __future__ import annotations

import base64
import copy
import json
import math
import random

import httpx
import numpy as np
import pytest

from tests.service.conftest import serve

pytest_plugins = ["tests.service.conftest"]

MODEL = "atto"
CASES_PER_CLASS = 30
WRONG_VALUES = (None, True, False, "text", "tëxt ☃", "", 1.5, -1, 0, 2**63, [], [[1, 2], [3]], {}, {"a": 1}, [None])
HUGE = 2**62


@pytest.fixture(scope="module")
def v2_url(model_repository):
    with serve(model_repository, max_batch_size=4, max_queue_delay_ms=2, max_body_bytes=2 * 1024 * 1024) as url:
        yield url


@pytest.fixture(scope="module")
def model_input(v2_url) -> tuple[str, list[int], str]:
    """The served model's input name and image shape (C, H, W) and its output name, from its metadata."""
    metadata = httpx.get(f"{v2_url}/v2/models/{MODEL}").json()
    (spec,) = metadata["inputs"]
    return spec["name"], spec["shape"][1:], metadata["outputs"][0]["name"]


class Request:
    """A v2 infer request as the mutator sees it: the JSON header, the binary tail (or None), the HTTP headers."""

    def __init__(self, header: dict, binary: bytes | None = None):
        self.header, self.binary, self.http_headers = header, binary, {}

    def encode(self) -> tuple[bytes, dict]:
        head = self.header if isinstance(self.header, bytes) else json.dumps(self.header).encode()
        headers = {"content-type": "application/json", **self.http_headers}
        if self.binary is None:
            return head, headers
        headers.setdefault("inference-header-content-length", str(len(head)))
        headers["content-type"] = "application/octet-stream"
        return head + self.binary, headers


def valid_request(rng: random.Random, model_input, binary: bool) -> Request:
    name, image_shape, output = model_input
    shape = [rng.randint(1, 2), *image_shape]
    values = np.random.default_rng(rng.randrange(2**32)).standard_normal(int(np.prod(shape))).astype("<f4")
    tensor = {"name": name, "shape": shape, "datatype": "FP32"}
    wanted = {"name": output}
    if binary:
        tensor["parameters"] = {"binary_data_size": values.nbytes}
        wanted["parameters"] = {"binary_data": rng.random() < 0.5}
        return Request({"id": f"case-{rng.randrange(10**6)}", "inputs": [tensor], "outputs": [wanted]},
                       values.tobytes())
    tensor["data"] = [round(float(v), 4) for v in values]
    return Request({"id": f"case-{rng.randrange(10**6)}", "inputs": [tensor], "outputs": [wanted]})


def paths(node, prefix=()):
    """Every (path, value) in a JSON tree, a data list counted as one leaf (its items are mutated elsewhere)."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list) and prefix[-1:] != ("data",):
        for index, value in enumerate(node):
            yield from paths(value, (*prefix, index))


def parent_and_key(header: dict, path: tuple):
    node = header
    for step in path[:-1]:
        node = node[step]
    return node, path[-1]


def drop_key(rng, request: Request) -> None:
    path = rng.choice([p for p, _ in paths(request.header) if p and isinstance(p[-1], str)])
    parent, key = parent_and_key(request.header, path)
    del parent[key]


def rename_key(rng, request: Request) -> None:
    path = rng.choice([p for p, _ in paths(request.header) if p and isinstance(p[-1], str)])
    parent, key = parent_and_key(request.header, path)
    parent[rng.choice([key.upper(), key + "s", key[:-1], "", "ïnput"])] = parent.pop(key)


def wrong_type(rng, request: Request) -> None:
    path = rng.choice([p for p, _ in paths(request.header) if p])
    parent, key = parent_and_key(request.header, path)
    parent[key] = copy.deepcopy(rng.choice(WRONG_VALUES))


def wrong_top_level(rng, request: Request) -> None:
    request.header = copy.deepcopy(rng.choice([None, [], "inputs", 3, [request.header], {}, {"inputs": {}}]))


def non_finite_data(rng, request: Request) -> None:
    tensor = request.header["inputs"][0]
    bad = rng.choice([math.nan, math.inf, -math.inf])
    if request.binary is None:
        tensor["data"][rng.randrange(len(tensor["data"]))] = bad
    else:
        values = np.frombuffer(request.binary, "<f4").copy()
        values[rng.randrange(values.size)] = bad
        request.binary = values.tobytes()


def data_items(rng, request: Request) -> None:
    tensor = request.header["inputs"][0]
    if request.binary is not None:
        tensor.pop("parameters", None)
        request.binary = None
    data = tensor.setdefault("data", [0.0] * 8)
    choice = rng.randrange(5)
    if choice == 0:
        data[rng.randrange(len(data))] = copy.deepcopy(rng.choice(WRONG_VALUES))
    elif choice == 1:
        tensor["data"] = data[: rng.randrange(len(data))]  # too few values
    elif choice == 2:
        tensor["data"] = data + [0.0] * rng.randint(1, 100)  # too many
    elif choice == 3:
        tensor["data"] = [data[i: i + 64] for i in range(0, len(data), 64)]  # nested: the right count, flattened
    else:
        data[rng.randrange(len(data))] = rng.choice([1e39, -1e39, 1e308])  # beyond float32


def bad_shape(rng, request: Request) -> None:
    shape = request.header["inputs"][0]["shape"]
    choice = rng.randrange(7)
    if choice == 0:
        shape[rng.randrange(len(shape))] = rng.choice([HUGE, 2**31, 2**32 + 1])
    elif choice == 1:
        shape[rng.randrange(len(shape))] = rng.choice([-1, -2**40, 0])
    elif choice == 2:
        shape[rng.randrange(len(shape))] = copy.deepcopy(rng.choice([1.5, 1.0, "1", None, True, [1], {}]))
    elif choice == 3:
        del shape[rng.randrange(len(shape))]
    elif choice == 4:
        shape.insert(rng.randrange(len(shape) + 1), 1)
    elif choice == 5:
        shape[0] = rng.choice([64, 1000, 10**6])  # a batch beyond the limits, data unchanged
    else:
        request.header["inputs"][0]["shape"] = []


def wrong_datatype(rng, request: Request) -> None:
    request.header["inputs"][0]["datatype"] = rng.choice(["FP16", "FP64", "INT64", "BYTES", "BOOL", "fp32", "",
                                                          "FP32 ", None, 32, ["FP32"]])


def binary_bytes(rng, request: Request) -> None:
    if request.binary is None:
        request.binary = b""  # a binary tail the header does not declare
        request.http_headers["inference-header-content-length"] = str(len(json.dumps(request.header)))
        return
    size = len(request.binary)
    request.binary = rng.choice([request.binary[: rng.randrange(size)], request.binary[:-1],
                                 request.binary + bytes(rng.randint(1, 64)), b""])


def header_length(rng, request: Request) -> None:
    head = len(json.dumps(request.header))
    # (a blank value cannot be sent: h11 refuses header values with surrounding whitespace)
    request.http_headers["inference-header-content-length"] = rng.choice([
        "abc", "-5", "1.5", "", "0", str(head - 1), str(head + 1), str(head * 1000), str(HUGE), "9" * 30,
        f"{head}, {head}", "0x10", "+12", "١٢".encode()])  # Arabic-Indic digits, which int() would take
    if request.binary is None:
        request.binary = b""


def binary_data_size(rng, request: Request) -> None:
    tensor = request.header["inputs"][0]
    tensor.setdefault("parameters", {})["binary_data_size"] = copy.deepcopy(rng.choice(
        ["x", "48", 1.5, -1, 0, None, True, HUGE, 2**64, [4], {"n": 4}, (request.binary and len(request.binary) + 4)]))
    if request.binary is None:
        request.binary = b""


def bad_outputs(rng, request: Request) -> None:
    request.header["outputs"] = copy.deepcopy(rng.choice([
        {"name": "logits"}, "logits", 3, None, True, [None], ["logits"], [[{}]], [{}], [{"name": "no-such-output"}],
        [{"name": 5}], [{"name": "logits", "parameters": "yes"}],
        [{"name": "logits", "parameters": {"binary_data": "no"}}], [{"name": "logits"}, {"name": "logits"}]]))


def bad_classification(rng, request: Request) -> None:
    wanted = request.header["outputs"][0]
    wanted.setdefault("parameters", {})["classification"] = copy.deepcopy(rng.choice(
        ["3", "x", -1, 0, 1.5, True, None, HUGE, 10**6, [3], {"k": 3}, math.nan]))


def bad_parameters(rng, request: Request) -> None:
    target = rng.choice([request.header, request.header["inputs"][0]])
    target["parameters"] = copy.deepcopy(rng.choice(["yes", 1, None, [], [1], {"binary_data_output": "yes"},
                                                     {"binary_data_output": 3}, {"unknown": {"x": 1}}]))


def malformed_json(rng, request: Request) -> None:
    text = json.dumps(request.header).encode()
    request.header = rng.choice([text[: rng.randrange(len(text))], b"", b"\xff\xfe{", text.replace(b'"', b"'", 3),
                                 text + b"}", b"{" * 10_000, b"[" * 100_000, b'{"inputs": [' + b"1," * 50_000 + b"1]}"])


MUTATIONS = {f.__name__: f for f in (
    drop_key, rename_key, wrong_type, wrong_top_level, non_finite_data, data_items, bad_shape, wrong_datatype,
    binary_bytes, header_length, binary_data_size, bad_outputs, bad_classification, bad_parameters, malformed_json)}


def failure_of(response: httpx.Response) -> str | None:
    """None for a 200 or a JSON 4xx in the protocol's error body (error: the message, code); else what is wrong."""
    if response.status_code == 200:
        return None
    if not 400 <= response.status_code < 500:
        return f"status {response.status_code}: {response.text[:200]!r}"
    try:
        body = response.json()
        assert isinstance(body["code"], str) and body["code"] and isinstance(body["error"], str) and body["error"]
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"status {response.status_code} without the JSON error body: {response.text[:200]!r}"
    return None


def described(request: Request) -> str:
    """The request in a line: the header with each data list as its length, the binary tail's size, HTTP headers."""
    header = copy.deepcopy(request.header)
    for path, value in list(paths(header)):
        if path[-1:] == ("data",) and isinstance(value, list):
            parent, key = parent_and_key(header, path)
            parent[key] = f"<{len(value)} values>"
    text = header[:200] if isinstance(header, bytes) else json.dumps(header)
    tail = "no binary" if request.binary is None else f"{len(request.binary)} binary bytes"
    return f"{text} + {tail}, headers {request.http_headers}"


def send(url: str, request: Request) -> httpx.Response:
    body, headers = request.encode()
    return httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=60)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_the_valid_requests_the_mutator_starts_from_are_served(v2_url, model_input, binary):
    for seed in range(3):
        response = send(v2_url, valid_request(random.Random(seed), model_input, binary))
        assert response.status_code == 200, response.text[:500]


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_mutated_request_gets_200_or_a_json_4xx(v2_url, model_input, mutation):
    rng = random.Random(f"v2-{mutation}")
    failures = []
    for case in range(CASES_PER_CLASS):
        request = valid_request(rng, model_input, binary=case % 2 == 1)
        MUTATIONS[mutation](rng, request)
        try:
            problem = failure_of(send(v2_url, request))
        except httpx.TransportError as err:  # a reset or a dropped connection
            problem = f"{type(err).__name__}: {err}"
        if problem is not None:
            failures.append(f"{problem}\n    sent {described(request)}")
    assert not failures, f"{len(failures)} of {CASES_PER_CLASS} {mutation} cases:\n" + "\n".join(failures[:5])
    # Still ready after this class: a class that broke the service fails here, not in whichever test runs next.
    assert httpx.get(f"{v2_url}/v2/health/ready").status_code == 200, f"not ready after the {mutation} cases"
    assert httpx.get(f"{v2_url}/readyz").json() == {"status": "ready"}


# Characters for the image model's JSON strings: base64's alphabet, ASCII outside it, and text beyond ASCII (Latin-1,
# the BMP, an astral character, a lone surrogate), which base64 decoding refuses in a way of its own.
STRING_CHARACTERS = ("ABCxyz019+/=", " \n!-_.*\x00", "éÿ", "☃\uffff中", "𝕏", "\ud800")


def image_strings(rng: random.Random) -> list[str]:
    """1..3 JSON elements for the image model: base64 of random bytes, some with random characters put in."""
    strings = []
    for _ in range(rng.randint(1, 3)):
        text = list(base64.b64encode(rng.randbytes(rng.randrange(64))).decode())
        for _ in range(rng.choice([0, 1, 1, 3])):
            text.insert(rng.randint(0, len(text)), rng.choice(rng.choice(STRING_CHARACTERS)))
        strings.append("".join(text))
    return strings


def test_image_model_json_strings_get_200_or_a_json_4xx(v2_url):
    rng = random.Random("v2-image-strings")
    failures = []
    for _ in range(CASES_PER_CLASS * 2):
        data = image_strings(rng)
        header = {"inputs": [{"name": "IMAGE", "shape": [len(data)], "datatype": "BYTES", "data": data}]}
        # The text as \u escapes or as UTF-8 (as tritonclient sends it); a lone surrogate in UTF-8 is not JSON (400).
        body = json.dumps(header, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        response = httpx.post(f"{v2_url}/v2/models/{MODEL}_image/infer", content=body, timeout=60)
        if (problem := failure_of(response)) is not None:
            failures.append(f"{problem}\n    sent {data!r}")
    assert not failures, f"{len(failures)} of {CASES_PER_CLASS * 2} cases:\n" + "\n".join(failures[:5])
    assert httpx.get(f"{v2_url}/v2/health/ready").status_code == 200


def test_the_service_is_still_ready_and_serving_after_the_fuzzing(v2_url, model_input):
    assert httpx.get(f"{v2_url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{v2_url}/readyz").json() == {"status": "ready"}
    for binary in (False, True):
        assert send(v2_url, valid_request(random.Random(99), model_input, binary)).status_code == 200

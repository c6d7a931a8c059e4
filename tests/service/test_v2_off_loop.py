"""A large v2 request is parsed and turned into tensors in a worker thread, off the event loop; small ones stay on it.
Its wait for that thread counts in its deadline and ends when its client leaves; a full service refuses it first.

Proven against the real server (HTTP and gRPC) with a spy on v2_core.parse_request / v2_core.prepare that records
whether it ran with a running event loop; the answers (logits, refusals: status, code, message) are the inline ones.
"""
from __future__ import annotations

import asyncio
import base64
import gc
import json
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest

from service import grpc_messages, grpc_server, v2, v2_core
from service.body_budget import BodyBudget
from service.errors import ApiError
from service.grpc_proto import open_inference_pb2 as pb
from service.metrics import ServiceMetrics
from service.pipeline import converted
from service.settings import Settings
from service.state import CONVERSIONS_AT_ONCE, ServiceState
from tests.service.conftest import free_port, metric
from tests.service.test_faults import Hold
from tests.service.test_grpc import grpc_address, raw_call

INFER = "/v2/models/atto/infer"
SHAPE = (2, 3, 64, 64)
BATCH = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
# Unknown to InferTensorContents (fields 1-8): field 15 varint 7, field 20 bytes b"abc". Kept by protobuf, re-sent
# after the known fields when the message is serialized again.
UNKNOWN_FIELDS = bytes([15 << 3, 7, (20 << 3 | 2) | 0x80, (20 << 3 | 2) >> 7, 3]) + b"abc"


@pytest.fixture(scope="module")
def served(model_repository, launch):
    with launch(model_repository, grpc_port=free_port(), max_batch_size=8, max_queue_delay_ms=1) as url:
        yield url


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, bool]]:
    """(function, ran on an event loop) for each v2_core.parse_request / v2_core.prepare call from now on."""
    seen: list[tuple[str, bool]] = []

    def spy(name: str) -> None:
        function = getattr(v2_core, name)

        def recorded(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                seen.append((name, True))
            except RuntimeError:  # no loop runs in this thread: a worker thread
                seen.append((name, False))
            return function(*args, **kwargs)

        monkeypatch.setattr(v2_core, name, recorded)

    spy("parse_request")
    spy("prepare")
    return seen


def json_request(data, shape=SHAPE, name="input", datatype="FP32") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}).encode()


def binary_request(batch: np.ndarray) -> tuple[bytes, dict]:
    raw = batch.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {v2.HEADER_LENGTH: str(len(head))}


def logits_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def test_a_large_json_request_is_parsed_and_converted_off_the_loop_with_the_same_logits(served, calls):
    body, headers = binary_request(BATCH)
    from_binary = logits_of(httpx.post(f"{served}{INFER}", content=body, headers=headers))
    assert calls == [("parse_request", True), ("prepare", True)]  # a small JSON part: no thread hop
    for data in (BATCH.reshape(-1).tolist(), BATCH.tolist()):  # flat, and nested along the shape
        calls.clear()
        body = json_request(data)
        assert len(body) > v2.INLINE_MAX_JSON_BYTES
        np.testing.assert_allclose(logits_of(httpx.post(f"{served}{INFER}", content=body)), from_binary, atol=1e-6)
        assert calls == [("parse_request", False), ("prepare", False)]


def test_a_large_base64_image_request_is_parsed_off_the_loop_with_the_binary_requests_logits(served, calls,
                                                                                            real_photos):
    """The encoded-image model's JSON (base64 strings) over INLINE_MAX_JSON_BYTES: parsed and prepared in a worker
    thread, answered as the same images sent as binary BYTES elements (a small JSON part, parsed on the loop)."""
    from tests.service.test_v2_protocol import binary_request as image_request
    from tests.service.test_v2_protocol import bytes_elements, image_input

    images = [path.read_bytes() for path in real_photos[1:4]]  # a JPEG and two PNGs
    body, headers = image_request({"inputs": [image_input(*images)]}, bytes_elements(*images))
    from_binary = logits_of(httpx.post(f"{served}/v2/models/atto_image/infer", content=body, headers=headers))
    assert calls == [("parse_request", True), ("prepare", True)]
    calls.clear()
    body = json_request([base64.b64encode(image).decode() for image in images], shape=(len(images),), name="IMAGE",
                        datatype="BYTES")
    assert len(body) > v2.INLINE_MAX_JSON_BYTES
    np.testing.assert_allclose(logits_of(httpx.post(f"{served}/v2/models/atto_image/infer", content=body)),
                               from_binary, atol=1e-6)
    assert calls == [("parse_request", False), ("prepare", False)]


def test_a_small_json_request_is_parsed_on_the_loop(served, calls):
    body = json_request([0.5] * 10, shape=(1, 3, 8, 8))
    assert len(body) <= v2.INLINE_MAX_JSON_BYTES
    response = httpx.post(f"{served}{INFER}", content=body)
    assert response.status_code == 400 and response.json()["code"] == "invalid_shape"
    assert calls == [("parse_request", True), ("prepare", True)]


ZEROS = [0.0] * (3 * 64 * 64)
LARGE = json_request(BATCH.reshape(-1).tolist())


def large_with(index: int, value: float) -> bytes:
    data = BATCH.reshape(-1).tolist()
    data[index] = value
    return json_request(data)


# (model, body, Inference-Header-Content-Length): each over INLINE_MAX_JSON_BYTES, each refused.
LARGE_REFUSED = {
    "nan": ("atto", large_with(3, float("nan")), None),
    "beyond_float32": ("atto", large_with(5, 1e39), None),
    "cut_json": ("atto", LARGE[:-10], None),
    "bytes_after_the_json": ("atto", LARGE + b"\0" * 8, None),
    "header_length_cuts_the_json": ("atto", LARGE, str(len(LARGE) // 2)),
    "count_differs": ("atto", json_request(ZEROS, shape=(2, 3, 64, 64)), None),
    "too_many_images": ("atto", json_request(ZEROS, shape=(10**6, 3, 64, 64)), None),
    "mixed_nesting": ("atto", json_request([ZEROS[:6144], *ZEROS[6144:]], shape=(1, 3, 64, 64)), None),
    "not_base64": ("atto_image", json_request(["not base64!" * 3000], shape=(1,), name="IMAGE",
                                              datatype="BYTES"), None),
}


def refusal(function, *args) -> ApiError:
    with pytest.raises(ApiError) as raised:
        function(*args)
    return raised.value


@pytest.mark.parametrize("case", LARGE_REFUSED.values(), ids=LARGE_REFUSED.keys())
def test_a_large_request_off_the_loop_is_refused_as_inline(served, calls, case):
    model, body, header_length = case
    state = served.app.state.service
    header, binary = v2.split_body(body, header_length)
    assert len(header) > v2.INLINE_MAX_JSON_BYTES
    expected = refusal(v2.prepared_request, state, model, None, header, binary, header_length)  # inline, as before
    calls.clear()
    headers = {} if header_length is None else {v2.HEADER_LENGTH: header_length}
    response = httpx.post(f"{served}/v2/models/{model}/infer", content=body, headers=headers)
    assert (response.status_code, response.json()) == (expected.status, {"error": expected.message,
                                                                        "code": expected.code})
    assert calls and not any(on_loop for _, on_loop in calls)


def test_fp32_contents_become_the_bytes_numpy_gives_unknown_fields_and_all():
    values = np.array([0.0, -0.0, 1.5, -2.25, 1e-45, 3.4028235e38, -1e-38, 7.0], dtype=np.float32)
    contents = pb.InferTensorContents.FromString(pb.InferTensorContents(fp32_contents=values).SerializeToString()
                                                 + UNKNOWN_FIELDS)
    assert contents.SerializeToString().endswith(b"abc")  # the unknown fields are there, after the floats
    expected = np.asarray(contents.fp32_contents, dtype="<f4").tobytes()
    assert expected == values.astype("<f4").tobytes()
    assert grpc_messages._fp32_bytes(contents) == expected


def grpc_infer(url, request: pb.ModelInferRequest) -> np.ndarray:
    response = pb.ModelInferResponse.FromString(raw_call(grpc_address(url), "ModelInfer", request.SerializeToString()))
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))


def test_grpc_fp32_contents_convert_on_the_loop_and_answer_as_raw_contents(served, calls):
    raw = pb.ModelInferRequest(model_name="atto", raw_input_contents=[BATCH.astype("<f4").tobytes()])
    raw.inputs.add(name="input", datatype="FP32", shape=SHAPE)
    typed = pb.ModelInferRequest(model_name="atto")
    contents = typed.inputs.add(name="input", datatype="FP32", shape=SHAPE).contents
    contents.fp32_contents.extend(BATCH.reshape(-1))
    contents.MergeFromString(UNKNOWN_FIELDS)
    np.testing.assert_array_equal(grpc_infer(served, typed), grpc_infer(served, raw))
    assert calls == [("prepare", True)] * 2  # fp32_contents are copied whole, not converted a float at a time


def many_elements(model: str, datatype: str, field: str, values: list) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="IMAGE" if model == "atto_image" else "input", datatype=datatype,
                                shape=[len(values)] if model == "atto_image" else [1, 3, 64, 64])
    getattr(tensor.contents, field).extend(values)
    return request


GRPC_REFUSED = {
    "bytes_elements": many_elements("atto_image", "BYTES", "bytes_contents", [b"x"] * 5000),
    "int_contents": many_elements("atto", "INT32", "int_contents", [0] * (3 * 64 * 64)),
}


@pytest.mark.parametrize("request_", GRPC_REFUSED.values(), ids=GRPC_REFUSED.keys())
def test_grpc_many_typed_elements_convert_off_the_loop_and_are_refused_as_inline(served, calls, request_):
    assert grpc_messages.typed_elements(request_) > grpc_server.INLINE_MAX_ELEMENTS
    expected = refusal(grpc_server.prepared_request, served.app.state.service, request_)
    calls.clear()
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(grpc_address(served), "ModelInfer", request_.SerializeToString())
    assert raised.value.code() == grpc_server.STATUS_CODES[expected.status]
    assert raised.value.details() == expected.message
    assert dict(raised.value.trailing_metadata())[grpc_server.ERROR_CODE_KEY] == expected.code
    if request_ is GRPC_REFUSED["bytes_elements"]:  # counted before any copy: refused before the core's prepare
        assert (expected.status, expected.code, calls) == (413, "too_many_images", [])
    else:
        assert calls == [("prepare", False)]


@pytest.fixture
def conversion_gate() -> Iterator[threading.Event]:
    """Open unless a test clears it; while it is closed each conversion (`conversions`) waits for it."""
    gate = threading.Event()
    gate.set()
    yield gate
    gate.set()  # a failed test leaves no conversion thread waiting


@pytest.fixture
def conversions(monkeypatch, conversion_gate) -> list[int]:
    """[running now, most at once, started] of v2_core.prepare calls from now on, each held 0.3 s so that they overlap
    (and for as long as conversion_gate is closed)."""
    lock, counts = threading.Lock(), [0, 0, 0]
    prepare = v2_core.prepare

    def counted(*args, **kwargs):
        with lock:
            counts[0] += 1
            counts[1] = max(counts[:2])
            counts[2] += 1
        try:
            time.sleep(0.3)
            conversion_gate.wait(30)
            return prepare(*args, **kwargs)
        finally:
            with lock:
                counts[0] -= 1

    monkeypatch.setattr(v2_core, "prepare", counted)
    return counts


def test_at_most_two_large_requests_are_converted_at_once(served, conversions):
    """A flood of large JSON requests queues for the conversion threads (service/state.py CONVERSIONS_AT_ONCE)
    instead of parsing all at once."""
    body = json_request(BATCH.reshape(-1).tolist())
    with ThreadPoolExecutor(6) as clients:
        answers = list(clients.map(lambda _: httpx.post(f"{served}{INFER}", content=body, timeout=60), range(6)))
    assert [a.status_code for a in answers] == [200] * 6, answers[0].text
    assert conversions[1] == CONVERSIONS_AT_ONCE == 2


def test_grpc_calls_cancelled_mid_conversion_still_hold_their_conversion_thread(served, conversions,
                                                                                conversion_gate):
    """A gRPC call cancelled (its client gone, or its deadline past) while its conversion runs: the conversion runs on
    in its thread, and the calls waiting for a conversion thread wait on (a semaphore would have been given back at
    the cancel, and the waiting calls' conversions would run beside the cancelled ones)."""
    request = GRPC_REFUSED["int_contents"].SerializeToString()  # > INLINE_MAX_ELEMENTS: converted off the loop
    disconnected = 'convnext_rejected_total{reason="client_disconnected"}'
    cancelled_before = metric(served, disconnected)
    conversion_gate.clear()  # the conversions started from here on run until the test opens the gate
    with grpc.insecure_channel(grpc_address(served)) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        cancelled = [infer.future(request, timeout=60) for _ in range(CONVERSIONS_AT_ONCE)]
        wait_until(lambda: conversions[0] == CONVERSIONS_AT_ONCE, "both conversion threads to be busy")
        waiting = [infer.future(request, timeout=60) for _ in range(4)]
        for call in cancelled:
            call.cancel()
        wait_until(lambda: metric(served, disconnected) == cancelled_before + CONVERSIONS_AT_ONCE,
                   "the server to cancel both calls")
        # A waiting call given a thread at the cancel would be converting now, held by the gate beside the two.
        assert conversions[1] == CONVERSIONS_AT_ONCE
        conversion_gate.set()
        codes = [call.code() for call in waiting]  # each converted in turn, then refused (INT32 data, as inline)
    assert [call.code() for call in cancelled] == [grpc.StatusCode.CANCELLED] * CONVERSIONS_AT_ONCE
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 4
    wait_until(lambda: conversions[0] == 0, "the conversions to end")
    assert conversions[1] == CONVERSIONS_AT_ONCE


def busy_converting(url: str, clients: ThreadPoolExecutor, conversions: list[int]) -> list[Future[httpx.Response]]:
    """Large JSON requests on every conversion thread (their conversions held by the closed conversion_gate)."""
    busy = [clients.submit(httpx.post, f"{url}{INFER}", content=LARGE, timeout=60) for _ in range(CONVERSIONS_AT_ONCE)]
    wait_until(lambda: conversions[0] == CONVERSIONS_AT_ONCE, "both conversion threads to be busy")
    return busy


def test_the_wait_for_a_conversion_thread_counts_in_the_request_deadline(model_repository, launch, conversions,
                                                                         conversion_gate):
    """request_timeout_ms runs from when the body has arrived: a request whose deadline passes while it waits for a
    conversion thread gets 504 and is never converted, and one whose conversion runs past it gets 504 too."""
    with launch(model_repository, request_timeout_ms=1000) as url, ThreadPoolExecutor(CONVERSIONS_AT_ONCE) as clients:
        conversion_gate.clear()
        busy = busy_converting(url, clients, conversions)
        late = httpx.post(f"{url}{INFER}", content=LARGE, timeout=60)
        conversion_gate.set()
        answers = [future.result() for future in busy]
        wait_until(lambda: conversions[0] == 0, "the conversions to end")
    assert (late.status_code, late.json()["code"]) == (504, "deadline")
    assert [(a.status_code, a.json()["code"]) for a in answers] == [(504, "deadline")] * CONVERSIONS_AT_ONCE
    assert conversions[2] == CONVERSIONS_AT_ONCE  # the late request's conversion never started


def test_a_client_gone_while_waiting_for_a_conversion_thread_is_never_converted(served, conversions,
                                                                                conversion_gate):
    disconnected = 'convnext_rejected_total{reason="client_disconnected"}'
    gone_before = metric(served, disconnected)
    with ThreadPoolExecutor(CONVERSIONS_AT_ONCE) as clients:
        conversion_gate.clear()
        busy = busy_converting(served, clients, conversions)
        with pytest.raises(httpx.ReadTimeout):  # the client stops waiting while both threads are busy
            httpx.post(f"{served}{INFER}", content=LARGE, timeout=httpx.Timeout(60, read=0.5))
        wait_until(lambda: metric(served, disconnected) == gone_before + 1, "the server to see the client leave")
        conversion_gate.set()
        answers = [future.result() for future in busy]
    wait_until(lambda: conversions[0] == 0, "the conversions to end")
    assert [a.status_code for a in answers] == [200] * CONVERSIONS_AT_ONCE
    assert conversions[2] == CONVERSIONS_AT_ONCE  # the request of the client gone was never converted


class Body(bytearray):
    """A request's JSON part, weakly referenceable: alive while anything holds it."""


@pytest.mark.parametrize("ends", ["client gone", "deadline"])
def test_a_request_answered_while_waiting_for_a_conversion_thread_leaves_no_body_behind(ends):
    """A request answered (499 / 504) while both conversion threads are busy held nothing afterwards: its job waited
    in the pool's queue, cancelled but still holding its arguments (the body, up to max_body_bytes, already given
    back to the body budget) until a thread took it. It now waits for a slot on the event loop; the running
    conversions keep theirs."""
    started, release = threading.Semaphore(0), threading.Event()

    def hold() -> bool:
        started.release()
        return release.wait(60)

    async def scenario() -> tuple[tuple[int, str], bool, list[bool]]:
        state = ServiceState(Settings(), ServiceMetrics(), BodyBudget(256 * 1024 * 1024))
        far = time.monotonic() + 60
        try:
            busy = [asyncio.ensure_future(converted(state, hold, client_gone=None, deadline=far))
                    for _ in range(CONVERSIONS_AT_ONCE)]
            for _ in busy:
                await asyncio.to_thread(started.acquire)
            gone, body = asyncio.Event(), Body(8 * 1024 * 1024)
            alive = weakref.ref(body)
            waiting = asyncio.ensure_future(converted(
                state, len, body, client_gone=gone.wait, deadline=far if ends == "client gone" else time.monotonic()))
            del body
            for _ in range(10):  # a few loop steps take it to its wait for a slot
                if state.conversion_slots._waiters:
                    break
                await asyncio.sleep(0)
            gone.set()
            try:
                await waiting
            except ApiError as err:  # its traceback (and the frames holding the body) is dropped with it
                answer = err.status, err.code
            del waiting
            for _ in range(3):  # the cancelled wait for a slot ends in the loop's next steps
                await asyncio.sleep(0)
            gc.collect()
            held = alive() is not None  # while both threads still convert
            release.set()
            return answer, held, await asyncio.gather(*busy)
        finally:
            release.set()
            state.conversion_pool.shutdown(wait=True)
            state.preprocess_pool.shutdown(wait=True)

    answer, held, results = asyncio.run(scenario())
    assert answer == ((499, "client_disconnected") if ends == "client gone" else (504, "deadline"))
    assert not held, "the answered request's body was still held by the conversion pool"
    assert results == [True] * CONVERSIONS_AT_ONCE


def test_at_capacity_a_large_json_request_is_refused_before_it_is_parsed(model_repository, launch, calls):
    """Its images are counted in only once it is converted: a full service answers 503 + Retry-After first, without
    parsing and converting (~90 ms of CPU for 1 MB of JSON) a request it would refuse."""
    hold = Hold()
    with launch(model_repository, hold.factory, max_batch_size=1, queue_size=1, warmup_runs=0) as url:
        hold.start()  # from here on, batches wait for hold.finish
        admission = url.app.state.service.admission
        one_image, headers = binary_request(BATCH[:1])
        holding = [threading.Thread(target=httpx.post, args=(f"{url}{INFER}",),
                                    kwargs={"content": one_image, "headers": headers, "timeout": 60})
                   for _ in range(admission.capacity)]
        for thread in holding:
            thread.start()
        wait_until(lambda: admission.admitted == admission.capacity, "the held requests to fill every admission slot")
        calls.clear()
        refused = httpx.post(f"{url}{INFER}", content=LARGE, timeout=60)
        hold.finish(holding)
    assert (refused.status_code, refused.json()["code"], refused.headers["retry-after"]) == (503, "queue_full", "1")
    assert calls == []


def wait_until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)

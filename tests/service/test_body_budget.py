"""The body budget (max_buffered_body_bytes): room reserved for gRPC messages still arriving, first come first served
and refused as HTTP chunks are; and what a request holds while it waits for its batch is what the budget counts, over
gRPC and HTTP v2 alike (its body is let go once converted)."""
from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.body_budget import BodyBudget
from service.errors import ApiError
from service.grpc_proto import open_inference_pb2 as pb
from tests.service.conftest import free_port, metric
from tests.service.test_grpc import grpc_address, raw_call
from tests.service.test_hot_swap import wait_for
from tests.service.test_limits import Gate, connect, read_response

MIB = 1024 * 1024
QUEUED_IMAGES = 128  # 6 MiB of 64 px FP32 images: far above anything else the server allocates meanwhile
LONG_S = 30  # a deadline no waiter in these tests should reach


async def reserved_in_turn(budget: BodyBudget, size: int, order: list[str], name: str, deadline: float) -> None:
    await budget.reserve(size, deadline)
    order.append(name)


def test_reservations_wait_in_turn_while_messages_still_arriving_hold_the_room():
    async def scenario():
        budget, order = BodyBudget(2 * MIB), []
        deadline = asyncio.get_running_loop().time() + LONG_S
        await budget.reserve(MIB, deadline)
        await budget.reserve(MIB, deadline)
        waiting = [asyncio.create_task(reserved_in_turn(budget, MIB, order, name, deadline)) for name in "ab"]
        await asyncio.sleep(0)
        assert (order, budget.held_bytes, budget.reserved_bytes) == ([], 2 * MIB, 2 * MIB)
        budget.received(MIB, 0)  # a call ended without its message: its room goes to the first in line
        await asyncio.sleep(0)
        assert order == ["a"]
        budget.received(MIB, 300 * 1024)  # a message arrived: its own size stays counted, no room for b yet
        await asyncio.sleep(0)
        assert (order, budget.held_bytes, budget.reserved_bytes) == (["a"], MIB + 300 * 1024, MIB)
        budget.give_back(300 * 1024)  # that message's call is answered
        await asyncio.gather(*waiting)
        assert order == ["a", "b"] and (budget.held_bytes, budget.reserved_bytes) == (2 * MIB, 2 * MIB)
        budget.received(MIB, 0)
        budget.received(MIB, 0)
        assert (budget.held_bytes, budget.reserved_bytes) == (0, 0)

    asyncio.run(scenario())


def test_a_reservation_is_refused_at_once_when_bodies_received_leave_no_room_as_an_http_chunk_is():
    async def scenario():
        budget = BodyBudget(2 * MIB)
        budget.take(1800 * 1024)  # HTTP bodies received
        with pytest.raises(ApiError) as refused:
            await budget.reserve(MIB, asyncio.get_running_loop().time() + LONG_S)
        assert (refused.value.status, refused.value.code) == (503, "body_buffer_full")
        assert refused.value.headers["Retry-After"] == "1"
        assert budget.held_bytes == 1800 * 1024

    asyncio.run(scenario())


def test_a_wait_that_ends_gives_its_place_up_and_holds_nothing():
    async def scenario():
        loop = asyncio.get_running_loop()
        budget, order = BodyBudget(2 * MIB), []
        await budget.reserve(2 * MIB, loop.time() + LONG_S)
        with pytest.raises(ApiError) as late:  # the deadline passes while it waits
            await budget.reserve(MIB, loop.time() + 0.05)
        assert late.value.code == "body_buffer_full" and "body_deadline_s" in late.value.message
        cancelled = asyncio.create_task(budget.reserve(MIB, loop.time() + LONG_S))  # its client leaves
        queued = asyncio.create_task(reserved_in_turn(budget, MIB, order, "queued", loop.time() + LONG_S))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        budget.received(2 * MIB, 0)
        await queued
        assert order == ["queued"] and (budget.held_bytes, budget.reserved_bytes) == (MIB, MIB)

    asyncio.run(scenario())


def queued_tensors() -> np.ndarray:
    return np.zeros((QUEUED_IMAGES, 3, 64, 64), np.float32)


def large_allocations_now() -> int:
    """Bytes in blocks of 1 MiB or more allocated since tracing began and still held (Python objects, numpy data)."""
    return sum(trace.size for trace in tracemalloc.take_snapshot().traces if trace.size >= MIB)


def held_while_queued(url: str, gate: Gate, send) -> tuple[int, int, int]:
    """With the engine held by another request, `send(QUEUED_IMAGES)` (in a thread): once its images are all queued,
    the bytes the server holds in large blocks, the bytes the body budget counts, and the gRPC messages of over 1 MiB
    still alive (parsed, they live outside the traced blocks)."""
    gate.close()
    with ThreadPoolExecutor(2) as clients:
        holding = clients.submit(send, 1)
        assert gate.batch_started.wait(20)  # that request holds the engine (max_batch_size 1)
        tracemalloc.start()  # the test's own request bytes were made before: only the server's are traced
        try:
            queued = clients.submit(send, QUEUED_IMAGES)
            wait_for(lambda: metric(url, "convnext_queue_depth") == QUEUED_IMAGES, "the request to be queued")
            gc.collect()
            held = large_allocations_now()
            messages = sum(type(o) is pb.ModelInferRequest and o.ByteSize() > MIB for o in gc.get_objects())
        finally:
            tracemalloc.stop()
        counted = int(metric(url, "convnext_buffered_body_bytes"))
        gate.open.set()
        holding.result(timeout=30)
        queued.result(timeout=30)
    return held, counted, messages


def test_a_grpc_call_waiting_for_its_batch_holds_no_more_than_the_budget_counts(model_repository, launch):
    """Once converted, the message's bytes (the body grpc handed over, and the parsed message) are let go: the call
    holds its tensors alone. Before, body, message and tensors: ~3x what the budget counted."""
    messages = {}
    for images in (1, QUEUED_IMAGES):
        request = pb.ModelInferRequest(model_name="atto", raw_input_contents=[queued_tensors()[:images].tobytes()])
        request.inputs.add(name="input", datatype="FP32", shape=[images, 3, 64, 64])
        messages[images] = request.SerializeToString()
    del request
    gate = Gate()
    with launch(model_repository, gate.factory, grpc_port=free_port(), max_batch_size=1, warmup_runs=0) as url:
        def send(images: int) -> None:
            response = pb.ModelInferResponse.FromString(raw_call(grpc_address(url), "ModelInfer", messages[images]))
            assert list(response.outputs[0].shape) == [images, 10]

        held, counted, parsed = held_while_queued(url, gate, send)
    assert counted == len(messages[1]) + len(messages[QUEUED_IMAGES])
    assert parsed == 0
    assert 0 < held <= counted, f"{held} bytes held, {counted} counted"


def test_an_http_v2_request_waiting_for_its_batch_holds_no_more_than_the_budget_counts(model_repository, launch):
    """The binary-data body and its split-off binary part are let go once converted (and Starlette's request no
    longer caches the body): the request holds its tensors alone. Before: body, binary part and tensors, ~3x."""
    bodies = {}
    for images in (1, QUEUED_IMAGES):
        data = queued_tensors()[:images].tobytes()
        header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [images, 3, 64, 64],
                                         "parameters": {"binary_data_size": len(data)}}]}).encode()
        bodies[images] = (header, data)
    gate = Gate()
    with launch(model_repository, gate.factory, max_batch_size=1, warmup_runs=0) as url:
        def send(images: int) -> None:
            header, data = bodies[images]
            client = connect(url)
            client.settimeout(30)
            client.sendall(b"POST /v2/models/atto/infer HTTP/1.1\r\nHost: test\r\n"
                           b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: %d\r\n"
                           b"Content-Length: %d\r\n\r\n" % (len(header), len(header) + len(data)))
            client.sendall(header)
            client.sendall(data)
            status, _, answer = read_response(client)
            client.close()
            assert status == 200 and json.loads(answer)["outputs"][0]["shape"] == [images, 10], answer[:200]

        held, counted, _ = held_while_queued(url, gate, send)
    assert counted == sum(len(header) + len(data) for header, data in bodies.values())
    assert 0 < held <= counted, f"{held} bytes held, {counted} counted"

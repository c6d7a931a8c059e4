"""gRPC calls are held to the HTTP side's limits before their message is read: a call without the key is refused at
once (its message never read), and a message that does not arrive within body_deadline_s ends the call, so neither
holds a call slot and up to max_body_bytes of memory for as long as it likes; a message being received holds its
room in the body budget, waiting for it in line, while grpc core takes in no more than a small window of a stream
nobody reads; refusals are labelled and carry their retry hint as over HTTP; and no error message, HTTP or gRPC,
carries a client's megabytes back."""
from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from service.grpc_proto import open_inference_pb2 as pb
from service.grpc_server import (
    ERROR_CODE_KEY,
    PROBE_CONNECTIONS,
    RETRY_PUSHBACK_KEY,
    SERVICE_NAME,
    UNREAD_STREAM_WINDOW_BYTES,
)
from tests.service.conftest import free_port, metric
from tests.service.h2c import DATA, END_STREAM, H2Connection, grpc_frame
from tests.service.test_grpc import grpc_address, raw_call
from tests.service.test_hot_swap import wait_for
from tests.service.test_limits import BUDGET_LIMITS, Gate, finish_upload, slow_upload

README = Path(__file__).resolve().parents[2] / "README.md"
MIB = 1024 * 1024
MODEL_INFER = f"/{SERVICE_NAME}/ModelInfer"
OK_INFERS = 'convnext_grpc_requests_total{code="OK",method="ModelInfer"}'
MODEL_READY = f"/{SERVICE_NAME}/ModelReady"  # a request with fields: read (ServerMetadata's has none: never read)


def stalled_call(address: str, metadata: tuple = (), timeout_s: float = 30) -> tuple[grpc.StatusCode, dict]:
    """A call whose request message never comes (the client holds its stream open), as grpc's client sees it."""

    async def call() -> tuple[grpc.StatusCode, dict]:
        never = asyncio.Event()

        async def no_message():
            await never.wait()
            yield b""

        async with grpc.aio.insecure_channel(address) as channel:
            method = channel.stream_unary(MODEL_READY, request_serializer=bytes, response_deserializer=bytes)
            try:
                await method(no_message(), metadata=metadata, timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                return err.code(), dict(err.trailing_metadata() or ())
            finally:
                never.set()
        return grpc.StatusCode.OK, {}

    return asyncio.run(call())


def test_a_call_without_the_key_is_refused_before_its_message_arrives(model_repository, launch):
    with launch(model_repository, grpc_port=free_port(), api_key="grpc-secret") as url:
        code, trailers = stalled_call(grpc_address(url))
        assert (code, trailers.get(ERROR_CODE_KEY)) == (grpc.StatusCode.UNAUTHENTICATED, "unauthorized")


@pytest.mark.parametrize("with_key", [False, True])
def test_a_message_that_never_arrives_ends_the_call_at_body_deadline_s(model_repository, launch, with_key):
    settings = dict(api_key="grpc-secret") if with_key else {}
    metadata = (("x-api-key", "grpc-secret"),) if with_key else ()
    with launch(model_repository, grpc_port=free_port(), body_deadline_s=1, **settings) as url:
        code, trailers = stalled_call(grpc_address(url), metadata)
        assert (code, trailers.get(ERROR_CODE_KEY)) == (grpc.StatusCode.DEADLINE_EXCEEDED, "body_timeout")


def test_an_error_never_carries_a_clients_megabytes_back(model_repository, launch):
    """A 1 MB model name, over HTTP and gRPC: the 404 names it clipped, in a message of at most ~1000 characters."""
    import httpx

    name = "m" * 1_000_000
    with launch(model_repository, grpc_port=free_port()) as url:
        answer = httpx.get(f"{url}/v2/models/{name[:60_000]}", timeout=30)  # under the 64 KiB head limit
        assert answer.status_code == 404 and len(answer.json()["error"]) < 1100  # v2: the protocol's error string
        with grpc.insecure_channel(grpc_address(url)) as channel:
            metadata = channel.unary_unary(f"/{SERVICE_NAME}/ModelMetadata",
                                           request_serializer=pb.ModelMetadataRequest.SerializeToString,
                                           response_deserializer=pb.ModelMetadataResponse.FromString)
            with pytest.raises(grpc.RpcError) as refused:
                metadata(pb.ModelMetadataRequest(name=name), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND  # not RESOURCE_EXHAUSTED: the trailer fits
    assert len(refused.value.details()) < 1100


def infer_message(images: int) -> bytes:
    """A ModelInfer request of `images` 64 px FP32 images (48 KiB each) as raw contents."""
    request = pb.ModelInferRequest(model_name="atto",
                                   raw_input_contents=[np.zeros((images, 3, 64, 64), "<f4").tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[images, 3, 64, 64])
    return request.SerializeToString()


def test_a_message_waits_in_line_for_room_in_the_body_budget_and_is_taken_in_only_then(model_repository, launch):
    """A message being received holds max_body_bytes of the budget (grpc core takes in up to its declared size once it
    is asked for it); a call that finds no room waits, its stream let in only a small window meanwhile, and goes on
    when room comes. Before: every stalled stream held its megabytes in grpc core, the budget counting none."""
    with launch(model_repository, grpc_port=free_port(), **BUDGET_LIMITS) as url:  # 1 MiB a body, 2 MiB in all
        connection = H2Connection(grpc_address(url))
        stalled = grpc_frame(bytes(900 * 1024), declared=MIB - 1000)  # 900 KiB of a message, then nothing more
        for stream in (1, 3):
            connection.open(stream, MODEL_INFER)
            assert connection.send(stream, stalled, stall_s=10) == len(stalled)
        wait_for(lambda: metric(url, "convnext_buffered_body_bytes") == 2 * MIB, "the two messages' room")
        waiting = grpc_frame(infer_message(10))  # 480 KiB
        connection.open(5, MODEL_INFER)
        let_in = connection.send(5, waiting, stall_s=2)
        assert let_in <= 2 * UNREAD_STREAM_WINDOW_BYTES, f"{let_in} bytes of a message nobody reads were taken in"
        assert 5 not in connection.ended  # waiting, not refused: only messages still arriving hold the room
        assert metric(url, "convnext_buffered_body_bytes") == 2 * MIB
        connection.reset(1)  # a stalled client gives up: its room goes to the call in line
        assert connection.send(5, waiting[let_in:], end=True, stall_s=10) == len(waiting) - let_in
        assert connection.wait_ended(5)
        wait_for(lambda: metric(url, OK_INFERS) == 1, "the waiting call to be answered")
        connection.reset(3)
        wait_for(lambda: metric(url, "convnext_buffered_body_bytes") == 0, "the room to come back")
        connection.close()


def test_what_a_client_sends_after_its_one_message_is_not_taken_in(model_repository, launch):
    """The call reads one message; grpc core takes in only a small window of anything the client sends after it,
    however long the call waits for its batch. Before: megabytes a call, outside the budget."""
    gate = Gate()
    with launch(model_repository, gate.factory, grpc_port=free_port(), max_batch_size=1, warmup_runs=0) as url:
        gate.close()
        connection = H2Connection(grpc_address(url))
        message = grpc_frame(infer_message(1))
        connection.open(1, MODEL_INFER)
        assert connection.send(1, message, stall_s=10) == len(message)
        assert gate.batch_started.wait(20)  # read, converted and running: the call asks for nothing more
        let_in = connection.send(1, grpc_frame(bytes(MIB), declared=4 * MIB), stall_s=2)
        assert let_in <= 2 * UNREAD_STREAM_WINDOW_BYTES, f"{let_in} bytes after the message were taken in"
        assert metric(url, "convnext_buffered_body_bytes") == len(message) - 5  # the message, without its prefix
        gate.open.set()
        assert connection.wait_ended(1)
        wait_for(lambda: metric(url, OK_INFERS) == 1, "the call to be answered")
        connection.close()


def test_a_message_over_max_body_bytes_is_counted_as_the_resource_exhausted_it_gets(model_repository, launch):
    """grpc core refuses it (RESOURCE_EXHAUSTED) and ends the handler's read: the metrics say body_too_large and
    RESOURCE_EXHAUSTED too, not invalid_message and INVALID_ARGUMENT."""
    with launch(model_repository, grpc_port=free_port(), max_body_bytes=100_000) as url:
        with pytest.raises(grpc.RpcError) as refused:
            raw_call(grpc_address(url), "ModelInfer", infer_message(3))  # 147 KB
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        exhausted = 'convnext_grpc_requests_total{code="RESOURCE_EXHAUSTED",method="ModelInfer"}'
        wait_for(lambda: metric(url, exhausted) == 1, "the refusal to be counted")
        assert metric(url, 'convnext_rejected_total{reason="body_too_large"}') == 1
        assert metric(url, 'convnext_rejected_total{reason="invalid_message"}') == 0
        assert metric(url, "convnext_buffered_body_bytes") == 0


def test_a_refusal_that_http_answers_with_retry_after_carries_grpc_retry_pushback_ms(model_repository, launch):
    with launch(model_repository, grpc_port=free_port(), **BUDGET_LIMITS) as url:
        slow = [slow_upload(url), slow_upload(url)]  # HTTP bodies received: 1800 KiB of 2 MiB
        with pytest.raises(grpc.RpcError) as refused:  # no room for it: refused at once, as an HTTP body is
            raw_call(grpc_address(url), "ModelInfer", infer_message(6))  # 288 KiB: over what is left
        trailers = dict(refused.value.trailing_metadata())
        assert (refused.value.code(), trailers[ERROR_CODE_KEY]) == (grpc.StatusCode.UNAVAILABLE, "body_buffer_full")
        assert trailers[RETRY_PUSHBACK_KEY] == "1000"  # HTTP's Retry-After: 1
        for upload in slow:
            finish_upload(upload)


def test_health_calls_answer_while_messages_arriving_hold_the_whole_body_budget(model_repository, launch):
    """ServerLive, ServerReady and ServerMetadata take no request fields: they are answered without reading one, so
    they reserve no room and never wait behind uploads (before: each waited in line for max_body_bytes of room, up to
    body_deadline_s, while streams that sent nothing held the budget)."""
    with launch(model_repository, grpc_port=free_port(), **BUDGET_LIMITS) as url:  # 1 MiB a body, 2 MiB in all
        connection = H2Connection(grpc_address(url))
        stalled = grpc_frame(bytes(900 * 1024), declared=MIB - 1000)
        for stream in (1, 3):
            connection.open(stream, MODEL_INFER)
            assert connection.send(stream, stalled, stall_s=10) == len(stalled)
        wait_for(lambda: metric(url, "convnext_buffered_body_bytes") == 2 * MIB, "the two messages' room")
        address = grpc_address(url)
        assert pb.ServerLiveResponse.FromString(raw_call(address, "ServerLive", b"")).live
        assert pb.ServerReadyResponse.FromString(raw_call(address, "ServerReady", b"")).ready
        assert pb.ServerMetadataResponse.FromString(raw_call(address, "ServerMetadata", b"")).name
        assert metric(url, "convnext_buffered_body_bytes") == 2 * MIB  # they took none of it
        connection.close()


def test_a_call_closed_without_its_message_is_an_invalid_message_not_a_message_too_large(model_repository, launch):
    """A client that half-closes its stream without sending a message gets INVALID_ARGUMENT invalid_message, as
    before the read learned to tell an oversized message (cancelled by grpc core) from it."""
    with launch(model_repository, grpc_port=free_port()) as url:
        connection = H2Connection(grpc_address(url))
        connection.open(1, MODEL_INFER)
        connection._frame(DATA, END_STREAM, 1, b"")  # the request side ends with no message
        assert connection.wait_ended(1)
        invalid = 'convnext_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}'
        wait_for(lambda: metric(url, invalid) == 1, "the refusal to be counted")
        assert metric(url, 'convnext_rejected_total{reason="invalid_message"}') == 1
        assert metric(url, 'convnext_rejected_total{reason="body_too_large"}') == 0
        assert metric(url, "convnext_buffered_body_bytes") == 0
        connection.close()


def test_one_client_holds_the_room_of_at_most_grpc_messages_per_client_messages(model_repository, launch):
    """A stream that sends nothing holds max_body_bytes of the budget until body_deadline_s: one client address gets
    at most grpc_messages_per_client such places; its further calls wait holding no room, so HTTP uploads still find
    it, and go on once one of its messages has arrived or gone. Before: two such streams took the whole budget."""
    with launch(model_repository, grpc_port=free_port(), grpc_messages_per_client=1, **BUDGET_LIMITS) as url:
        connection = H2Connection(grpc_address(url))
        stalled = grpc_frame(bytes(900 * 1024), declared=MIB - 1000)
        connection.open(1, MODEL_INFER)
        assert connection.send(1, stalled, stall_s=10) == len(stalled)
        wait_for(lambda: metric(url, "convnext_buffered_body_bytes") == MIB, "the first message's room")
        waiting = grpc_frame(infer_message(10))  # 480 KiB
        connection.open(3, MODEL_INFER)
        let_in = connection.send(3, waiting, stall_s=2)
        assert let_in <= 2 * UNREAD_STREAM_WINDOW_BYTES, f"{let_in} bytes of a message nobody reads were taken in"
        assert 3 not in connection.ended  # waiting, not refused
        assert metric(url, "convnext_buffered_body_bytes") == MIB  # the waiting call holds no room
        finish_upload(slow_upload(url))  # an HTTP body finds the room the client's second call would have held
        connection.reset(1)  # the client's first message gives up: its place goes to the waiting call
        assert connection.send(3, waiting[let_in:], end=True, stall_s=10) == len(waiting) - let_in
        assert connection.wait_ended(3)
        wait_for(lambda: metric(url, OK_INFERS) == 1, "the waiting call to be answered")
        wait_for(lambda: metric(url, "convnext_buffered_body_bytes") == 0, "the room to come back")
        connection.close()



def test_calls_past_max_connections_are_refused_unavailable_counted_and_told_when_to_retry(model_repository, launch):
    """max_connections bounds gRPC calls in flight as it bounds HTTP requests: past it, UNAVAILABLE
    too_many_connections with grpc-retry-pushback-ms, before the call's key is checked or its message read, counted in
    convnext_grpc_requests_total and convnext_rejected_total; ServerLive and ServerReady still answer, as HTTP's probes
    do. Before: grpc core answered RESOURCE_EXHAUSTED itself, before any handler: in no metric, with no retry hint."""
    with launch(model_repository, grpc_port=free_port(), max_connections=1) as url:
        address = grpc_address(url)
        connection = H2Connection(address)
        connection.open(1, MODEL_INFER)  # a call whose message never comes: the one call in flight
        wait_for(lambda: metric(url, "convnext_grpc_inflight_calls") == 1, "the call to be in flight")
        code, trailers = stalled_call(address)  # ModelReady, its message never sent: refused without it
        assert (code, trailers.get(ERROR_CODE_KEY)) == (grpc.StatusCode.UNAVAILABLE, "too_many_connections")
        assert trailers.get(RETRY_PUSHBACK_KEY) == "1000"  # HTTP's Retry-After: 1
        assert metric(url, 'convnext_grpc_requests_total{code="UNAVAILABLE",method="ModelReady"}') == 1
        assert metric(url, 'convnext_rejected_total{reason="too_many_connections"}') == 1
        assert pb.ServerLiveResponse.FromString(raw_call(address, "ServerLive", b"")).live
        assert pb.ServerReadyResponse.FromString(raw_call(address, "ServerReady", b"")).ready
        connection.reset(1)
        wait_for(lambda: metric(url, "convnext_grpc_inflight_calls") == 0, "the call's place to come back")
        assert pb.ServerMetadataResponse.FromString(raw_call(address, "ServerMetadata", b"")).name  # served again
        connection.close()


def readme_metric_row(name: str) -> str:
    """The meaning README's Metrics table gives `name`."""
    return next(line.split("|")[3] for line in README.read_text().splitlines() if line.startswith(f"| {name} |"))


def test_the_in_flight_gauges_count_http_requests_and_grpc_calls_apart_as_the_readme_says(model_repository, launch):
    """convnext_inflight_requests counts HTTP requests only, the scrape that reads it among them; gRPC calls are in
    convnext_grpc_inflight_calls. Before: README said "requests being handled", as if gRPC calls were in it."""
    with launch(model_repository, grpc_port=free_port()) as url:
        connection = H2Connection(grpc_address(url))
        connection.open(1, MODEL_INFER)  # a call whose message never comes: in flight until reset
        wait_for(lambda: metric(url, "convnext_grpc_inflight_calls") == 1, "the call to be in flight")
        assert metric(url, "convnext_inflight_requests") == 1  # the scrape itself, not the gRPC call
        connection.reset(1)
        wait_for(lambda: metric(url, "convnext_grpc_inflight_calls") == 0, "the call to end")
        connection.close()
    http = readme_metric_row("convnext_inflight_requests")
    assert "HTTP requests" in http and "scrape" in http
    assert "gRPC calls" in readme_metric_row("convnext_grpc_inflight_calls")


@pytest.mark.parametrize("model_name, status", [("nope", grpc.StatusCode.NOT_FOUND),  # refused in the handler
                                                ("atto", grpc.StatusCode.INVALID_ARGUMENT)])  # in the conversion
def test_a_refused_call_leaves_no_reference_cycle_holding_its_message(model_repository, launch, model_name, status):
    """A refusal aborted from inside the except block that caught it chained the caught error, whose traceback held
    the handler's frames and the parsed message in a cycle only the garbage collector frees: a flood of refused
    20 MB messages grew the server by ~1 GB a call (gzip makes each a few KB on the wire). Nothing of the call is
    left for the collector now."""
    import gc
    import types

    contents = [bytes(4 * 3 * 64 * 64)] + ([bytes(8)] if model_name == "atto" else [])  # "atto": two for one input
    message = pb.ModelInferRequest(model_name=model_name, raw_input_contents=contents)
    message.inputs.add(name="input", datatype="FP32", shape=[1, 3, 64, 64])
    with launch(model_repository, grpc_port=free_port(), warmup_runs=0) as url:
        gc.collect()
        gc.disable()  # what the calls leave in cycles stays until the collect below, which saves it in gc.garbage
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as raised:
                    raw_call(grpc_address(url), "ModelInfer", message.SerializeToString())
                assert raised.value.code() == status
            gc.collect()
            frames = [o for o in gc.garbage if isinstance(o, types.FrameType)]
            # grpc's own abort leaves a cycle through the call's outermost frame, which holds no message
            holding = {frame.f_code.co_qualname for frame in frames
                       if any(isinstance(value, (pb.ModelInferRequest, bytes)) and len(value.SerializeToString()
                              if isinstance(value, pb.ModelInferRequest) else value) >= 4096
                              for value in frame.f_locals.values())}
            ours = {frame.f_code.co_qualname for frame in frames if "/service/" in frame.f_code.co_filename}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert not holding, holding
    assert ours <= {"_Method.call"}, ours


def closed_within(connection: H2Connection, timeout_s: float) -> bool:
    with connection._changed:
        return connection._changed.wait_for(lambda: connection.closed, timeout_s)


def test_grpc_connections_beyond_max_connections_and_the_probes_room_are_closed_at_once(model_repository, launch):
    """At most max_connections + PROBE_CONNECTIONS gRPC connections are open: one more is closed at once, those open
    stay, and HTTP still answers. Before, idle connections had no bound: 2000 stayed open until file descriptors ran
    out, and HTTP stopped answering too."""
    with launch(model_repository, grpc_port=free_port(), max_connections=3, warmup_runs=0) as url:
        held = [H2Connection(grpc_address(url)) for _ in range(3 + PROBE_CONNECTIONS)]
        try:
            time.sleep(0.3)  # each accepted (its preface read) before the next is counted
            try:
                extra = H2Connection(grpc_address(url))
            except OSError:  # closed before its preface was all sent
                pass
            else:
                assert closed_within(extra, 2.0)
            assert not any(connection.closed for connection in held)
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        finally:
            for connection in held:
                connection.close()


def test_grpc_connections_without_a_preface_or_a_call_are_closed(model_repository, launch):
    """A connection that sends no HTTP/2 preface is closed at header_timeout_s (grpc's default: 120 s), and one that
    makes no call for timeout_keep_alive_s is sent GOAWAY and closed (it stayed open for ever), as HTTP closes a
    connection whose head does not come and an idle kept-alive one; a client's channel connects again for its next
    call."""
    with launch(model_repository, grpc_port=free_port(), header_timeout_s=1.0, timeout_keep_alive_s=1.0,
                warmup_runs=0) as url:
        host, port = grpc_address(url).rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as silent:
            started = time.monotonic()
            while silent.recv(65536):  # the server's SETTINGS, then the close
                pass
            assert time.monotonic() - started < 5
        idle = H2Connection(grpc_address(url))
        assert closed_within(idle, 6.0)
        with grpc.insecure_channel(grpc_address(url)) as channel:  # a channel across the idle close
            ready = channel.unary_unary(f"/{SERVICE_NAME}/ServerReady", request_serializer=lambda b: b,
                                        response_deserializer=pb.ServerReadyResponse.FromString)
            assert ready(b"", timeout=10).ready
            time.sleep(2.0)
            assert ready(b"", timeout=10).ready

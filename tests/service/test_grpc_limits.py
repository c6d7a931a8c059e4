"""gRPC calls are held to the HTTP side's limits before their message is read: a call without the key is refused at
once (its message never read), and a message that does not arrive within body_deadline_s ends the call, so neither
holds a call slot and up to max_body_bytes of memory for as long as it likes; and no error message, HTTP or gRPC,
carries a client's megabytes back."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from service.grpc_server import ERROR_CODE_KEY
from tests.service.conftest import free_port
from tests.service.test_grpc import grpc_address

SERVER_METADATA = "/inference.GRPCInferenceService/ServerMetadata"


def stalled_call(address: str, metadata: tuple = ()) -> tuple[grpc.StatusCode, dict]:
    """A call whose request message never comes (the client holds its stream open), as grpc's client sees it."""

    async def call() -> tuple[grpc.StatusCode, dict]:
        never = asyncio.Event()

        async def no_message():
            await never.wait()
            yield b""

        async with grpc.aio.insecure_channel(address) as channel:
            method = channel.stream_unary(SERVER_METADATA, request_serializer=bytes, response_deserializer=bytes)
            try:
                await method(no_message(), metadata=metadata, timeout=30)
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

    from service.grpc_proto import open_inference_pb2 as pb
    from service.grpc_server import SERVICE_NAME

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

"""The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService` on its own port (grpc.aio).

A thin adapter over service/v2_core.py, like the HTTP one (service/v2.py): the same models (`<name>` and
`<name>_image`), checks, classification extension, admission, batcher and limits, because it shares the lifespan's
ServiceState. Tensors travel as raw_input_contents / raw_output_contents (typed `contents` are accepted too).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from service import v2_core
from service.api_keys import key_accepted
from service.errors import ApiError
from service.grpc_calls import CallsInFlight
from service.grpc_messages import check_message_bounds, inference_request_of, typed_elements
from service.grpc_proto import open_inference_pb2 as pb
from service.metrics import ServiceMetrics
from service.pipeline import ClientGone, converted, request_deadline
from service.request_ids import REQUEST_ID_METADATA, request_id_of_metadata
from service.settings import C_INT_MAX
from service.state import ServiceState

# The protocol's service name on the wire; the .proto's own package differs (open_inference.proto says why).
SERVICE_NAME = "inference.GRPCInferenceService"
# The health checks, like /v2/health/live and /ready: open without a key (service.security.PUBLIC_PATHS), and answered
# beyond max_connections (service.server.PROBE_PATHS).
HEALTH_METHODS = frozenset({"ServerLive", "ServerReady"})
UNMATCHED_METHOD = "unmatched"  # the metrics' method label of a call of no method here (answered UNIMPLEMENTED)
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED, 409: grpc.StatusCode.ABORTED, 413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT, 499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Codes the HTTP status alone does not give: a message over max_body_bytes is refused by grpc core itself with
# RESOURCE_EXHAUSTED (413 is otherwise INVALID_ARGUMENT: a batch over the request limit, which no retry can fix).
ERROR_STATUS_CODES = {"body_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED}
MAX_STREAMS_PER_CONNECTION = 128
# Connections open beyond max_connections (which bounds calls): room for health probes (ServerLive and ServerReady are
# answered past max_connections), each on a connection of its own, while the calls' connections are all taken.
PROBE_CONNECTIONS = 64
# What grpc core takes in of a stream whose message nobody is reading (a call waiting for room in the body budget,
# a health call answered without reading, or bytes a client sends after its one message): without BDP probing, the
# stream's flow-control window stays at this (with it, the default, the window grows to megabytes a stream, outside
# the budget). A pending read takes the message in whole before the handler sees it, up to max_body_bytes, which the
# budget has reserved (_Method); without BDP probing the window it opens is ~1 MiB at a time (measured on loopback:
# 1.06 MiB, against 5 MiB with probing), so a large message over a long round trip arrives more slowly.
UNREAD_STREAM_WINDOW_BYTES = 64 * 1024
# How long a read that ended without a message waits for grpc core to cancel the call (an oversized message, a reset,
# a deadline: it does so at once) before taking it for a client that closed its side without sending one.
EOF_SETTLE_S = 2.0
# The server's deadline for a call is the client's timeout counted from the headers' arrival, so it falls later than the
# client's own by their transit; when the client's deadline passes it cancels the call, which reaches the server that
# long before the server's deadline (up to 7 ms measured on a loaded loopback): a call ended this close to its deadline
# is taken for the deadline, not for a client that left (grpc tells the server no more). At most a tenth of the call's
# timeout: a call of 50 ms would otherwise count every cancel as its deadline.
DEADLINE_SLACK_S = 0.1
# Typed contents elements converted on the event loop; more (each one is Python work) go to a worker thread.
INLINE_MAX_ELEMENTS = 4096
ERROR_CODE_KEY = "convnext-error-code"  # trailing metadata: the machine-readable code of the HTTP API's JSON errors
# Trailing metadata of a refusal the HTTP API answers with Retry-After (gRPC's retry design: when to try again).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# How long grpc's stop waits, past the grace period, for the calls the shutdown cut off (service/grpc_calls.py) to
# send their UNAVAILABLE: each does so at once, its task cancelled; grpc then resets the streams of any left.
CUT_OFF_S = 1.0
# The answer of a call still in flight when the shutdown's grace period is over (the code /admin/reload answers then).
SHUTTING_DOWN = ApiError(503, "shutting_down", "the server is shutting down; retry, on another replica if there is one",
                         headers={"Retry-After": "1"})
# uvicorn's configured logger: the gRPC address is logged beside the HTTP one ("Uvicorn running on ...").
logger = logging.getLogger("uvicorn.error")

Handler = Callable[[ServiceState, Any, grpc.aio.ServicerContext], Awaitable[Message]]  # Any: its own request type


async def server_live(state: ServiceState, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
    return pb.ServerLiveResponse(live=v2_core.server_live(state))


async def server_ready(state: ServiceState, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
    return pb.ServerReadyResponse(ready=v2_core.server_ready(state))


async def server_metadata(state: ServiceState, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
    metadata = v2_core.server_metadata()
    return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version, extensions=metadata.extensions)


async def model_ready(state: ServiceState, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
    # A model this server does not serve is not ready, not an error: Triton answers OK with ready=false (its
    # InferenceServer::ModelIsReady), so tritonclient.grpc's is_model_ready returns False instead of raising.
    # Over HTTP the 404 stays: there, any status but 200 means not ready.
    try:
        return pb.ModelReadyResponse(ready=v2_core.model_ready(state, request.name, request.version or None))
    except ApiError as err:
        if err.status != 404:
            raise
        return pb.ModelReadyResponse(ready=False)


async def model_metadata(state: ServiceState, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
    metadata = v2_core.model_metadata(state, request.name, request.version or None)
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=metadata.name, versions=metadata.versions or [], platform=metadata.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs])


def prepared_request(state: ServiceState, request: pb.ModelInferRequest) -> v2_core.PreparedRequest:
    inference_request, binary = inference_request_of(request, state.settings.max_files_per_request)
    return v2_core.prepare(state, request.model_name, request.model_version or None, inference_request, binary)


async def model_infer(state: ServiceState, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
    deadline = request_deadline(state)  # the message has arrived: request_timeout_ms counts its conversion too
    client_gone = grpc_client_gone(context)
    check_message_bounds(request)
    if typed_elements(request) <= INLINE_MAX_ELEMENTS:
        prepared = prepared_request(state, request)
    else:  # bytes_contents, say, 10^6 short elements: seconds of Python work, in a worker thread
        prepared = await converted(state, prepared_request, state, request, client_gone=client_gone, deadline=deadline)
    del request  # converted: the call holds its tensors or images while it waits for its batch, not the message too
    result = await v2_core.infer(state, prepared, client_gone, deadline)
    response = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version,
                                     id=result.id or "")
    for output in result.outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(output.raw())
    return response


HANDLERS: dict[str, Handler] = {"ServerLive": server_live, "ServerReady": server_ready,
                                "ServerMetadata": server_metadata, "ModelReady": model_ready,
                                "ModelMetadata": model_metadata, "ModelInfer": model_infer}


def grpc_client_gone(context: grpc.aio.ServicerContext) -> ClientGone:
    """Completes when the call ends early (client cancel, its deadline): the pipeline then drops its queued images."""
    ended = asyncio.Event()
    # The stubs declare the callback as a class no function matches (types-grpcio); grpc calls it with the context.
    context.add_done_callback(lambda _: ended.set())  # type: ignore[arg-type]
    return ended.wait


def _has_key(context: grpc.aio.ServicerContext, api_key: bytes) -> bool:
    """The key from metadata `authorization: Bearer <key>` or `x-api-key: <key>`, as over HTTP."""
    headers = [(key.encode(), value if isinstance(value, bytes) else value.encode())
               for key, value in context.invocation_metadata() or ()]
    return key_accepted(headers, api_key)


class _Method:
    """One RPC: the calls-in-flight limit, key check, parsing (a malformed message is INVALID_ARGUMENT), the handler,
    status and metrics.

    Served as stream-unary, one request message read by hand: a unary handler runs only once grpc has received the
    whole message, so a caller without the key (or one that never finishes its message) would hold a call slot and
    up to max_body_bytes of memory for as long as it liked. Here the key is checked first, from the call's metadata
    (a refused call is answered at once and its message never read), and the message must arrive within
    body_deadline_s, as an HTTP body must, in room reserved in the body budget before grpc is asked for it (a pending
    read lets grpc core take in the message's declared size). Clients call it as the unary RPC it is in the .proto:
    the wire is the same.
    """

    def __init__(self, name: str, handler: Handler, request_type: type[Message], state: ServiceState):
        self.name, self.handler, self.request_type, self.state = name, handler, request_type, state
        # A request with no fields (ServerLive, ServerReady, ServerMetadata) is answered without reading it: no room
        # is reserved for it, so uploads that fill the body budget never hold up a health check (grpc core takes in
        # at most UNREAD_STREAM_WINDOW_BYTES of whatever a client sends on such a call).
        self.reads_request = bool(request_type.DESCRIPTOR.fields)
        self.probe = name in HEALTH_METHODS
        api_key = state.settings.api_key
        self.api_key = None if api_key is None or name in HEALTH_METHODS else api_key.get_secret_value().encode()

    async def call(self, messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Message:
        """The RPC. Its message is read with context.read(), not from `messages`: that iterator's generator would
        hold the message's bytes until the call ends. Every answer's trailing metadata carries the call's id
        (x-request-id: the client's when safe, else a fresh one; service/request_ids.py)."""
        metrics, started, code = self.state.metrics, time.perf_counter(), grpc.StatusCode.OK
        slack_s = _deadline_slack_s(context)
        id_trailer = (REQUEST_ID_METADATA, request_id_of_metadata(context.invocation_metadata()))
        # The refusal is sent after the except blocks, never from one: abort raises, and an error raised inside an
        # except block chains the caught one, whose traceback holds the handler's frames and the parsed message in a
        # cycle only the garbage collector frees (a refused 20 MB message stayed in memory, call after call).
        message: str = ""
        trailers: tuple[tuple[str, str], ...] = ()
        try:
            # First, as over HTTP: past the limit the call costs no key check and its message is never read.
            with self.state.grpc_calls.held(self.probe):
                response = await self._answer(context, slack_s)
            # set_trailing_metadata replaces: whatever the handler set is kept beside the id.
            context.set_trailing_metadata((*(context.trailing_metadata() or ()), id_trailer))
            return response
        except ApiError as err:
            code = ERROR_STATUS_CODES.get(err.code) or STATUS_CODES.get(err.status, grpc.StatusCode.UNKNOWN)
            reason = err.code
            if err.status == 499 and _deadline_passed(context, slack_s):  # it ended (grpc_client_gone) by its deadline
                code, reason = grpc.StatusCode.DEADLINE_EXCEEDED, "client_deadline"
            metrics.rejected.labels(reason).inc()
            message, trailers = err.message, (*error_trailers(err), id_trailer)
        except asyncio.CancelledError:  # grpc cancels this task (the client left, its deadline passed), or the shutdown
            code, reason = _why_cancelled(context, self.state.grpc_calls, slack_s)
            metrics.rejected.labels(reason).inc()
            if code != grpc.StatusCode.UNAVAILABLE:
                raise  # the call is over: nothing to answer
            message, trailers = SHUTTING_DOWN.message, (*error_trailers(SHUTTING_DOWN), id_trailer)
        except Exception as err:  # a bug, not the client's fault: logged, answered INTERNAL, and the server carries on
            code = grpc.StatusCode.INTERNAL
            logger.exception("gRPC %s failed (request %s, %s)", self.name, id_trailer[1], type(err).__name__)
            message = "internal error (logged by the server)"
            trailers = ((ERROR_CODE_KEY, "internal_error"), id_trailer)
        finally:
            metrics.grpc_requests.labels(self.name, code.name).inc()
            metrics.grpc_request_duration.labels(self.name, code.name).observe(time.perf_counter() - started)
        await context.abort(code, message, trailing_metadata=trailers)

    async def _answer(self, context: grpc.aio.ServicerContext, slack_s: float) -> Message:
        """The call's answer, within the limit: its key checked, its message read (when it has fields) and handled."""
        if self.api_key is not None and not _has_key(context, self.api_key):
            raise ApiError(401, "unauthorized", "the call carries no or a wrong API key; send metadata "
                           "`authorization: Bearer <key>` or `x-api-key: <key>`")
        if not self.reads_request:
            return await self.handler(self.state, self.request_type(), context)
        body = await self._request_message(context, slack_s)
        size = len(body)  # counted in the body budget until answered
        try:
            # The handler alone holds the parsed message (model_infer lets it go once converted), and the body goes
            # once parsed: a call waiting for its batch holds about the one copy the budget counts.
            handled = self.handler(self.state, self._parsed(body), context)
            del body
            return await handled
        finally:
            self.state.body_budget.give_back(size)

    def _parsed(self, body: bytes) -> Message:
        try:
            return self.request_type.FromString(body)
        except DecodeError as err:
            raise ApiError(400, "invalid_message", f"not a {self.request_type.DESCRIPTOR.name} message: "
                           f"{err}") from None

    async def _request_message(self, context: grpc.aio.ServicerContext, slack_s: float) -> bytes:
        """The call's one request message, within body_deadline_s of the call's start, its size counted in the body
        budget from its arrival: until then the budget holds max_body_bytes for it, waiting for that room first."""
        settings, budget = self.state.settings, self.state.body_budget
        deadline_s, reserved = settings.body_deadline_s, settings.max_body_bytes
        deadline = asyncio.get_running_loop().time() + deadline_s
        # a place among its client's messages arriving first (service/grpc_clients.py), then room in the budget
        async with self.state.grpc_arrivals.place(context.peer(), deadline):
            await budget.reserve(reserved, deadline)  # 503 body_buffer_full (UNAVAILABLE) when no room comes
            size = 0
            try:
                async with asyncio.timeout_at(deadline):
                    message = await context.read()
                if message is grpc.aio.EOF:
                    await _why_no_message(context, reserved, self.state.grpc_calls, slack_s)
                size = len(message)
                return message
            except TimeoutError:
                raise ApiError(408, "body_timeout", f"the request message did not arrive within {deadline_s:g} s; "
                               "send it at once") from None
            finally:
                budget.received(reserved, size)  # no await from here to the caller's count of it


async def _why_no_message(context: grpc.aio.ServicerContext, limit: int, calls: CallsInFlight,
                          slack_s: float) -> None:
    """A read that ended without a message: raise what ended it. grpc core ends the read of a message over
    max_receive_message_length (answering the client RESOURCE_EXHAUSTED itself), and of a call the client reset or
    whose deadline passed, then cancels this task at its next await; a client that closed its side without sending a
    message is not cancelled: it is answered after EOF_SETTLE_S, a wait only a client that breaks the protocol sees. A
    reset while its message was arriving reads as an oversized message: grpc tells them apart to no handler."""
    try:
        await asyncio.sleep(EOF_SETTLE_S)
    except asyncio.CancelledError:
        if _deadline_passed(context, slack_s) or calls.was_cut_off():
            raise  # the client's deadline, or the shutdown: _Method.call counts it (_why_cancelled)
        raise ApiError(413, "body_too_large", f"the request message is over the limit of {limit} bytes "
                       "(max_body_bytes)") from None
    raise ApiError(400, "invalid_message", "the call ended without a request message; send one")


def _deadline_slack_s(context: grpc.aio.ServicerContext) -> float:
    """How close to its deadline a call must end to be taken for it (DEADLINE_SLACK_S), asked as the call starts: its
    time remaining then is its timeout."""
    timeout_s = context.time_remaining()
    return DEADLINE_SLACK_S if timeout_s is None else min(DEADLINE_SLACK_S, timeout_s / 10)


def _deadline_passed(context: grpc.aio.ServicerContext, slack_s: float) -> bool:
    """The client's deadline for the call has passed (its client sees DEADLINE_EXCEEDED), within slack_s."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= slack_s


def _why_cancelled(context: grpc.aio.ServicerContext, calls: CallsInFlight,
                   slack_s: float) -> tuple[grpc.StatusCode, str]:
    """The status and the reason counted of a call whose task was cancelled: its deadline passed (DEADLINE_EXCEEDED,
    as its client sees), the shutdown's grace period ended (UNAVAILABLE shutting_down, answered so: CallsInFlight), or
    its client left (CANCELLED client_disconnected)."""
    if _deadline_passed(context, slack_s):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "client_deadline"
    if calls.was_cut_off():
        return grpc.StatusCode.UNAVAILABLE, "shutting_down"
    return grpc.StatusCode.CANCELLED, "client_disconnected"


def error_trailers(err: ApiError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a refusal: its code, and when the HTTP API would say Retry-After, the same wait."""
    retry_after = (err.headers or {}).get("Retry-After")
    if retry_after is None:
        return ((ERROR_CODE_KEY, err.code),)
    return (ERROR_CODE_KEY, err.code), (RETRY_PUSHBACK_KEY, str(round(float(retry_after) * 1000)))


def inference_service(state: ServiceState) -> grpc.GenericRpcHandler:
    """Every RPC of the .proto's service, served under the protocol's name with the state's limits and key."""
    methods: dict[str, grpc.RpcMethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request_type = getattr(pb, method.input_type.name)
        # No request deserializer: the handler parses, so a malformed message gets INVALID_ARGUMENT, not UNKNOWN.
        # Stream-unary on this side (_Method): the key is checked before the message is read.
        methods[method.name] = grpc.stream_unary_rpc_method_handler(
            _Method(method.name, HANDLERS[method.name], request_type, state).call,  # a coroutine function, for grpc
            response_serializer=lambda message: message.SerializeToString())
    return InferenceService(methods, state.metrics)


class InferenceService(grpc.GenericRpcHandler):
    """The service's methods by their full name (`/inference.GRPCInferenceService/ModelInfer`); a call of any other
    (another service's, a protocol RPC this service leaves out: ModelConfig, RepositoryIndex, ModelStatistics) is
    answered UNIMPLEMENTED by grpc core, and counted here under the method "unmatched", as HTTP counts an unknown path:
    a client's method name is no label."""

    def __init__(self, methods: dict[str, grpc.RpcMethodHandler], metrics: ServiceMetrics):
        self.methods = {f"/{SERVICE_NAME}/{name}": handler for name, handler in methods.items()}
        self.metrics = metrics

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self.methods.get(handler_call_details.method)
        if handler is None:
            code = grpc.StatusCode.UNIMPLEMENTED.name
            self.metrics.grpc_requests.labels(UNMATCHED_METHOD, code).inc()
            self.metrics.grpc_request_duration.labels(UNMATCHED_METHOD, code).observe(0.0)
        return handler


class GrpcService:
    """The running gRPC server and its one graceful stop: begun when the HTTP server's shutdown begins
    (service.app.begin_drain), so both protocols drain side by side, and awaited by the lifespan's shutdown."""

    def __init__(self, server: grpc.aio.Server, grace_s: float, calls: CallsInFlight):
        self.server, self.grace_s, self.calls = server, grace_s, calls
        self._stopped: asyncio.Future[None] | None = None

    def begin_stop(self) -> asyncio.Future[None]:
        """New calls are refused from now on (UNAVAILABLE); calls in flight get up to grace_s to finish, then are
        answered UNAVAILABLE shutting_down (CallsInFlight.cut_off_all; grpc's own stop would reset them CUT_OFF_S
        later). The same future for every caller."""
        if self._stopped is None:
            cut_off = asyncio.get_running_loop().call_later(self.grace_s, self.calls.cut_off_all)
            self._stopped = asyncio.ensure_future(self.server.stop(self.grace_s + CUT_OFF_S))
            self._stopped.add_done_callback(lambda _: cut_off.cancel())  # every call ended within the grace
        return self._stopped


def c_int(value: float) -> int:
    """A setting as a grpc channel argument: a C int from 1 (0 ms of idle time would refuse every call) to INT_MAX."""
    return max(1, min(round(value), C_INT_MAX))


async def start_grpc_server(state: ServiceState) -> GrpcService:
    """Listen on host:grpc_port; messages up to max_body_bytes (larger: RESOURCE_EXHAUSTED), as HTTP bodies, and at
    most UNREAD_STREAM_WINDOW_BYTES taken in of a stream nobody reads. Connections as HTTP's: a connection's HTTP/2
    preface within header_timeout_s, one with no call for timeout_keep_alive_s closed (GOAWAY: a client's channel
    connects again for its next call), and at most max_connections + PROBE_CONNECTIONS open (one more is closed at
    once); without these, idle connections stayed open for ever, without bound, until the process ran out of file
    descriptors and HTTP stopped answering too. Calls in flight at shutdown get the request timeout to finish."""
    settings = state.settings
    server = grpc.aio.server(
        # No maximum_concurrent_rpcs: the handler bounds calls in flight (_Method, service/grpc_calls.py), so a call
        # refused at max_connections is counted and carries a retry hint (grpc core's refusal has neither).
        handlers=[inference_service(state)],
        options=[("grpc.max_receive_message_length", settings.max_body_bytes),
                 # Calls at once on one connection (HTTP/2 streams; grpc core's default has no bound): one client
                 # cannot take every call slot; a client with more waits for a stream, not an error.
                 ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                 ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", UNREAD_STREAM_WINDOW_BYTES),
                 ("grpc.max_send_message_length", -1),
                 # grpc's channel arguments are C ints: each bounded to one (valid settings must start).
                 ("grpc.max_allowed_incoming_connections", c_int(settings.max_connections + PROBE_CONNECTIONS)),
                 ("grpc.server_handshake_timeout_ms", c_int(settings.header_timeout_s * 1000)),
                 ("grpc.max_connection_idle_ms", c_int(settings.timeout_keep_alive_s * 1000)),
                 ("grpc.so_reuseport", 0)])  # a port another server holds is an error, not a silent share
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as err:
        raise RuntimeError(f"cannot listen for gRPC on {address} ({err}); free the port, or choose another with "
                           "--grpc-port (0: no gRPC server)") from None
    await server.start()
    logger.info("Open Inference Protocol over gRPC on %s (inference.GRPCInferenceService)", address)
    return GrpcService(server, settings.request_timeout_ms / 1000, state.grpc_calls)

"""The Open Inference Protocol (KServe v2) over HTTP: a thin adapter over service/v2_core.py (JSON or binary data)."""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from runtime.repository import Manifest
from service import v2_core
from service.errors import V2_PREFIX, ApiError, error_responses
from service.pipeline import ClientGone, converted, http_client_gone, read_body, request_deadline, service_state
from service.settings import Settings
from service.state import ServiceState
from service.v2_core import InferResult
from service.v2_models import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ServerLiveResponse,
    ServerMetadataResponse,
    ServerReadyResponse,
)

router = APIRouter(prefix=V2_PREFIX, tags=["v2"])
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_HEADER_LENGTH_DIGITS = 20
# A JSON part up to this is parsed on the event loop (~0.2 ms); a larger one in a worker thread (a hop: ~0.1 ms).
INLINE_MAX_JSON_BYTES = 16 * 1024
# Arrays and objects a request's envelope may hold beside its data: the request, its inputs and outputs (MAX_TENSORS
# each) with their shapes and parameters (MAX_PARAMETERS entries of scalar values), many times over.
ENVELOPE_CONTAINERS = 4096


def inlined_schema(model) -> dict:
    """A pydantic model's JSON schema with its $defs inlined, so it can stand inside an OpenAPI operation."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


INFER_OPENAPI = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": inlined_schema(InferenceRequest)},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": (
            f"binary-data extension: the JSON inference request ({HEADER_LENGTH} bytes), then each input's "
            "binary_data_size bytes in input order")}},
    }},
    "parameters": [{"name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer",
                    "minimum": 0}, "description": "binary-data extension: the length of the JSON part of the body"}],
}
INFER_RESPONSES = {
    200: {"model": InferenceResponse, "description": "the outputs; with binary outputs, application/octet-stream: "
          f"the JSON response ({HEADER_LENGTH} bytes in the response header), then each output's bytes",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(400, 404, 408, 413, 415, 500, 503, 504),  # 401: service/openapi.py, with a key
}


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The body's JSON header and the binary data after it, split where Inference-Header-Content-Length says."""
    if header_length is None:
        return body, b""
    value = header_length.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_HEADER_LENGTH_DIGITS) or int(value) > len(body):
        raise ApiError(400, "invalid_header_length", f"{HEADER_LENGTH} must be a whole number of bytes from 0 to the "
                       f"body's {len(body)}, got {header_length[:MAX_HEADER_LENGTH_DIGITS]!r}")
    split = int(value)
    return body[:split], body[split:]


def infer_response(result: InferResult) -> Response:
    """JSON, or the JSON header followed by the binary outputs (binary-data extension) when any output asks."""
    outputs, binary = [], []
    for output in result.outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if output.binary:
            raw = output.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = output.json_data()
        outputs.append(entry)
    response = {"model_name": result.model_name, "model_version": result.model_version, "outputs": outputs}
    if result.id is not None:
        response["id"] = result.id
    if not binary:
        return JSONResponse(response)
    head = json.dumps(response).encode()
    return Response(b"".join([head, *binary]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})


@router.get("", response_model=ServerMetadataResponse)
async def server_metadata():
    return v2_core.server_metadata()


@router.get("/health/live", response_model=ServerLiveResponse,
            responses={503: {"model": ServerLiveResponse, "description": "the engine cannot be rebuilt here"}})
async def live(request: Request):
    is_live = v2_core.server_live(service_state(request))
    return JSONResponse({"live": is_live}, status_code=200 if is_live else 503)


@router.get("/health/ready", response_model=ServerReadyResponse,
            responses={503: {"model": ServerReadyResponse, "description": "not ready"}})
async def ready(request: Request):
    is_ready = v2_core.server_ready(service_state(request))
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


METADATA_RESPONSES = error_responses(404, 503)
READY_RESPONSES = {503: {"model": ModelReadyResponse, "description": "not ready"}, **error_responses(404)}


@router.get("/models/{name}", response_model=ModelMetadataResponse, response_model_exclude_none=True,
            responses=METADATA_RESPONSES)
async def model_metadata(request: Request, name: str):
    return v2_core.model_metadata(service_state(request), name)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadataResponse,
            response_model_exclude_none=True, responses=METADATA_RESPONSES)
async def model_version_metadata(request: Request, name: str, version: str):
    return v2_core.model_metadata(service_state(request), name, version)


def ready_response(request: Request, name: str, version: str | None) -> JSONResponse:
    is_ready = v2_core.model_ready(service_state(request), name, version)
    return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{name}/ready", response_model=ModelReadyResponse, responses=READY_RESPONSES)
async def model_ready(request: Request, name: str):
    return ready_response(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReadyResponse, responses=READY_RESPONSES)
async def model_version_ready(request: Request, name: str, version: str):
    return ready_response(request, name, version)


def parsed_request(header: bytes, header_length: str | None) -> InferenceRequest:
    """The JSON header as InferenceRequest; 400 invalid_json saying which header is missing when bytes follow it."""
    try:
        return v2_core.parse_request(header)
    except ApiError as err:
        if header_length is None and err.code == "invalid_json" and "trailing" in err.message:  # bytes after the JSON
            raise ApiError(400, err.code, f"{err.message}; binary data after the JSON needs the JSON part's length "
                           f"in the {HEADER_LENGTH} header") from None
        raise


def max_json_containers(manifest: Manifest, settings: Settings) -> int:
    """The JSON arrays and objects a request to this model can need: its data nested along the shape for the largest
    batch a request carries (queue_size images of C x H x W: C x H rows of W numbers each, one array per channel and
    per image), or max_files_per_request images as strings, plus the envelope."""
    spec = manifest.input
    per_image = spec.channels * spec.height + spec.channels + 1
    return max(settings.queue_size, settings.max_files_per_request) * per_image + ENVELOPE_CONTAINERS


def check_json_containers(header: bytes, manifest: Manifest, settings: Settings) -> None:
    """400 invalid_json for a JSON part with more arrays and objects than any request to this model needs, counted in
    its bytes before the parse (~14 ms for 20 MiB): parsed, each empty `[]` of 3 bytes would be a Python list of 56
    (a gzip body of 20 KiB inflates to 20 MiB, ~7 million lists: 0.8 GB and seconds of the GIL). Brackets inside
    strings count too; a request's strings (names, base64 images) hold none in numbers that matter."""
    containers = header.count(b"[") + header.count(b"{")
    limit = max_json_containers(manifest, settings)
    if containers > limit:
        raise ApiError(400, "invalid_json", f"the JSON has {containers} arrays and objects, more than any request to "
                       f"model {manifest.name!r} needs ({limit}); send the data flat, or as binary data")


def prepared_request(state: ServiceState, name: str, version: str | None, header: bytes, binary: bytes,
                     header_length: str | None) -> v2_core.PreparedRequest:
    check_json_containers(header, v2_core.resolve_model(state, name, version).manifest, state.settings)
    return v2_core.prepare(state, name, version, parsed_request(header, header_length), binary)


async def prepared_from_body(request: Request, state: ServiceState, name: str, version: str | None,
                             client_gone: ClientGone) -> tuple[v2_core.PreparedRequest, float]:
    """The request read and converted, and its deadline (request_timeout_ms from when the body has arrived). The body
    and its split parts are let go on return, so a request waiting for its batch holds its tensors or images alone:
    about the one copy of its body that the body budget counts."""
    header_length = request.headers.get(HEADER_LENGTH)
    header, binary = split_body(await read_body(request, state), header_length)
    deadline = request_deadline(state)
    args = (state, name, version, header, binary, header_length)
    if len(header) <= INLINE_MAX_JSON_BYTES:
        return prepared_request(*args), deadline
    # A Python object per JSON number (8x3x224x224 FP32: ~12 MB, ~170 ms of CPU) in a worker thread; pydantic's parse
    # holds the GIL throughout (~80 ms the loop still waits), the conversion after it lets the loop run
    return await converted(state, prepared_request, *args, client_gone=client_gone, deadline=deadline), deadline


async def infer_response_for(request: Request, name: str, version: str | None) -> Response:
    state = service_state(request)
    v2_core.resolve_model(state, name, version)  # 404 before reading the body of a request for no model
    client_gone = http_client_gone(request)
    prepared, deadline = await prepared_from_body(request, state, name, version, client_gone)
    return infer_response(await v2_core.infer(state, prepared, client_gone, deadline, request.scope))


@router.post("/models/{name}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_OPENAPI)
async def infer(request: Request, name: str):
    return await infer_response_for(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_OPENAPI)
async def infer_version(request: Request, name: str, version: str):
    return await infer_response_for(request, name, version)

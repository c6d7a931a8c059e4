"""Open Inference Protocol (KServe v2) over HTTP: FP32 NCHW preprocessed input, JSON or binary-data tensors."""
from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from convnext_common import project_version
from service import pipeline
from service.errors import ApiError
from service.pipeline import http_client_gone, read_body, service_state

router = APIRouter(prefix="/v2", tags=["v2"])
BINARY_HEADER = "inference-header-content-length"


def _model(request: Request, name: str, version: str | None = None):
    state = service_state(request)
    manifest = state.version.manifest if state.version is not None else None
    if manifest is None or name != manifest.name or (version not in (None, str(manifest.version))):
        raise ApiError(404, "model_not_found", f"model {name!r} version {version or 'latest'} is not served here")
    return manifest


@router.get("")
async def server_metadata():
    return {"name": "convnext", "version": project_version(), "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live(request: Request):
    """Like /healthz: not live once the engine cannot be rebuilt in this process, so the orchestrator restarts it."""
    is_live = service_state(request).not_live_reason is None
    return JSONResponse({"live": is_live}, status_code=200 if is_live else 503)


@router.get("/health/ready")
async def ready(request: Request):
    is_ready = service_state(request).is_ready
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None):
    manifest = _model(request, name, version)
    spec = manifest.input
    platform = service_state(request).engine.describe().name
    return {
        "name": manifest.name, "versions": [str(manifest.version)], "platform": platform,
        "inputs": [{"name": spec.name, "datatype": "FP32", "shape": [-1, spec.channels, spec.height, spec.width]}],
        "outputs": [{"name": manifest.output_name, "datatype": "FP32", "shape": [-1, manifest.num_classes]}],
    }


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None):
    _model(request, name, version)
    is_ready = service_state(request).is_ready
    return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)


def _parse_request(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    split = int(header_length) if header_length else len(body)
    try:
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, "invalid_json", f"the inference request is not valid JSON: {err}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or len(header["inputs"]) != 1:
        raise ApiError(400, "invalid_request", "the request needs exactly one input tensor in 'inputs'")
    return header, body[split:]


def _input_tensor(spec_in: dict, binary: bytes, expected: tuple[int, int, int], max_batch: int) -> np.ndarray:
    if spec_in.get("datatype") != "FP32":
        raise ApiError(400, "invalid_datatype", f"input datatype must be FP32, got {spec_in.get('datatype')!r}")
    shape = tuple(int(s) for s in spec_in.get("shape", []))
    if len(shape) != 4 or shape[1:] != expected or not 1 <= shape[0] <= max_batch:
        raise ApiError(400, "invalid_shape", f"input shape must be [1..{max_batch}, {', '.join(map(str, expected))}], "
                       f"got {list(shape)}")
    count = int(np.prod(shape))
    size = (spec_in.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if int(size) != count * 4 or len(binary) < int(size):
            raise ApiError(400, "invalid_binary_data", f"binary_data_size {size} does not fit shape {list(shape)}")
        array = np.frombuffer(binary[: int(size)], dtype="<f4")
    else:
        try:
            array = np.asarray(spec_in.get("data"), dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as err:
            raise ApiError(400, "invalid_data", f"input data is not a list of numbers: {err}") from None
        if array.size != count:
            raise ApiError(400, "invalid_data", f"{array.size} values for shape {list(shape)}")
    return array.reshape(shape)


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str, version: str | None = None):
    manifest = _model(request, name, version)
    state = service_state(request)
    body = await read_body(request, state)
    header, binary = _parse_request(body, request.headers.get(BINARY_HEADER))
    spec = manifest.input
    batch = _input_tensor(header["inputs"][0], binary, (spec.channels, spec.height, spec.width),
                          state.settings.queue_size)
    items = await pipeline.infer(state, list(batch), http_client_gone(request))
    logits = np.stack([item.future.result() for item in items]).astype("<f4")
    wanted = header.get("outputs") or [{"name": manifest.output_name}]
    binary_out = bool((header.get("parameters") or {}).get("binary_data_output")) or any(
        (o.get("parameters") or {}).get("binary_data") for o in wanted)
    output = {"name": manifest.output_name, "datatype": "FP32", "shape": list(logits.shape)}
    ran = items[0].served_by  # the version whose engine ran the batch (a hot-swap may have happened meanwhile)
    response = {"model_name": ran.name, "model_version": str(ran.version), "outputs": [output]}
    if "id" in header:
        response["id"] = header["id"]
    if not binary_out:
        output["data"] = logits.reshape(-1).tolist()
        return response
    raw = logits.tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(response).encode()
    return Response(head + raw, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})

"""The Open Inference Protocol (KServe v2) without a transport: models, metadata, request checks and infer.

Adapters (HTTP: service/v2.py; gRPC: service/grpc_server.py) call only these; the messages are the pydantic models
of service/v2_models.py (InferenceRequest, RequestInput, RequestOutput, their parameters, and the responses):

    parse_request(header: bytes) -> InferenceRequest          the JSON header (HTTP)
    build_request(fields: dict) -> InferenceRequest           the same fields as plain dicts/lists (gRPC; strict:
        lists not tuples or repeated fields, bool is not a number); both raise 400 invalid_json / invalid_request
    prepare(state, name, version, request, binary) -> PreparedRequest     checks + the input as tensors or images
        binary: the bytes that follow the JSON header; an input with parameters.binary_data_size takes its next
        binary_data_size bytes, in input order. BYTES elements in binary are 4-byte little-endian length + bytes
        (serialize_bytes), which is also gRPC's raw_input_contents / raw_output_contents layout: a gRPC input's
        raw contents (or its bytes_contents, serialized) go in `binary` with binary_data_size = their length.
        The input conversion (JSON data, binary slices, BYTES elements) is service/v2_tensors.py's.
        CPU only, no await: an adapter runs parse + prepare of a large request in a worker thread, off the loop.
    await infer(state, prepared, client_gone, deadline) -> InferResult   the pipeline (admission, batcher, limits)
    InferResult(model_name, model_version, id, outputs: [OutputTensor(name, datatype, shape, array, binary)]);
        OutputTensor.raw() is its binary form, OutputTensor.json_data() its JSON `data` list
    model_metadata(state, name, version) -> ModelMetadataResponse;   model_ready(state, name, version) -> bool
    server_metadata() -> ServerMetadataResponse;   server_live(state) / server_ready(state) -> bool
    resolve_model(state, name, version) -> V2Model            404 before any work for a model not served here
Every refusal is an ApiError(status, code, message) (service/errors.py): 400 bad request, 404 unknown model,
413 over a limit, 499 client gone, 500 engine failed, 503 not ready / full, 504 deadline; a gRPC adapter maps the
status to its own code.

Two v2 models serve the one loaded repository model `<name>`: `<name>` takes the preprocessed FP32 NCHW tensor,
and `<name>_image` (IMAGE_SUFFIX) takes encoded images (BYTES input `IMAGE`, one JPEG/PNG/... per element: raw bytes
in binary data, base64 strings in JSON) and decodes and preprocesses them exactly like /classify.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError
from starlette.types import Scope

from convnext_common import project_version
from runtime.preprocess import RGB_CHANNELS
from runtime.repository import Manifest
from service import pipeline
from service.batcher import Item, ServedModel
from service.errors import ApiError, clipped, shown
from service.pipeline import ClientGone, labels_of, require_ready, served_by
from service.state import ServiceState
from service.v2_models import (
    InferenceRequest,
    MetadataTensor,
    ModelMetadataResponse,
    RequestInput,
    ServerMetadataResponse,
)
from service.v2_tensors import encoded_images, fp32_batch, serialize_bytes

EXTENSIONS = ["binary_tensor_data", "classification"]
# The protocol's platform names are <project>_<format> (Triton's model configuration names them so).
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "openvino": "openvino"}
IMAGE_SUFFIX = "_image"
IMAGE_INPUT = "IMAGE"
MAX_ERRORS_SHOWN = 3


@dataclass(frozen=True)
class V2Model:
    """One v2 model over the served repository version: the tensor model, or the encoded-image one (`is_image`)."""

    name: str
    manifest: Manifest
    is_image: bool


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str  # "FP32" (logits) or "BYTES" (classification strings)
    shape: list[int]
    array: np.ndarray  # float32, or an object array of bytes for BYTES
    binary: bool  # the client asked for this output as binary data

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return serialize_bytes(self.array.reshape(-1))
        return self.array.astype("<f4").tobytes()

    def json_data(self) -> list:
        if self.datatype == "BYTES":
            return [value.decode() for value in self.array.reshape(-1)]
        return self.array.reshape(-1).tolist()


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[OutputTensor]


@dataclass(frozen=True)
class _WantedOutput:
    name: str
    classification: int | None  # top k, or None for the logits themselves
    binary: bool



def _refused(err: ValidationError) -> ApiError:
    errors = err.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        return ApiError(400, "invalid_json", f"the inference request is not valid JSON: {errors[0]['msg']}")
    shown = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in errors[:MAX_ERRORS_SHOWN])
    return ApiError(400, "invalid_request", f"the inference request does not follow the protocol: {shown}")


def parse_request(header: bytes) -> InferenceRequest:
    """The JSON inference header -> InferenceRequest; 400 invalid_json / invalid_request naming what is wrong."""
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as err:
        raise _refused(err) from None


def build_request(fields: dict) -> InferenceRequest:
    """Plain Python fields (dicts, lists, ints, floats, str, bool: the JSON's shape) -> InferenceRequest, or 400."""
    try:
        return InferenceRequest.model_validate(fields)
    except ValidationError as err:
        raise _refused(err) from None


def server_metadata() -> ServerMetadataResponse:
    return ServerMetadataResponse(name="convnext", version=project_version(), extensions=EXTENSIONS)


def server_live(state: ServiceState) -> bool:
    """Like /healthz: not live once the engine cannot be rebuilt in this process, so the orchestrator restarts it."""
    return state.not_live_reason is None


def server_ready(state: ServiceState) -> bool:
    return state.is_ready


def resolve_model(state: ServiceState, name: str, version: str | None = None) -> V2Model:
    """The v2 model `name` (optionally at `version`): 404 model_not_found, 503 before any model is loaded."""
    manifest = (state.version or require_ready(state)).manifest
    # The image model exists where images make the model's input: a model of another channel count serves tensors.
    image_model = manifest.name + IMAGE_SUFFIX if manifest.input.channels == RGB_CHANNELS else None
    is_image = name == image_model
    if (name != manifest.name and not is_image) or version not in (None, str(manifest.version)):
        served = f"{manifest.name!r} and {image_model!r}" if image_model else f"{manifest.name!r} (its input is " \
            f"{manifest.input.channels}-channel tensors, so no image model)"
        raise ApiError(404, "model_not_found", f"model {shown(name)} version {clipped(version or 'latest')} is not "
                       f"served here; this server has {served}")
    return V2Model(name, manifest, is_image)


def model_ready(state: ServiceState, name: str, version: str | None = None) -> bool:
    """False before any model is loaded; 404 model_not_found for a name this server does not serve."""
    if state.version is None:
        return False
    resolve_model(state, name, version)
    return state.is_ready


def model_metadata(state: ServiceState, name: str, version: str | None = None) -> ModelMetadataResponse:
    model = resolve_model(state, name, version)
    manifest, spec = model.manifest, model.manifest.input
    engine = state.engine.describe().name if state.engine is not None else "none"
    platform = PLATFORMS.get(engine, engine)
    outputs = [MetadataTensor(name=manifest.output_name, datatype="FP32", shape=[-1, manifest.num_classes])]
    versions = [str(manifest.version)]
    if not model.is_image:
        inputs = [MetadataTensor(name=spec.name, datatype="FP32", shape=[-1, spec.channels, spec.height, spec.width])]
        return ModelMetadataResponse(name=model.name, versions=versions, platform=platform, inputs=inputs,
                                     outputs=outputs)
    p = manifest.preprocess
    return ModelMetadataResponse(
        name=model.name, versions=versions, platform="ensemble",
        inputs=[MetadataTensor(name=IMAGE_INPUT, datatype="BYTES", shape=[-1])], outputs=outputs,
        parameters={"pipeline": f"decodes and preprocesses like /classify, then runs {manifest.name} on {platform}",
                    "input": "one encoded image per element (JPEG, PNG, WebP, BMP, GIF, TIFF): raw bytes as binary "
                             "data, base64 strings in JSON",
                    "preprocess": f"as POST /classify: RGB, resize {p.resize_px} px {p.interpolation} "
                                  f"({p.crop_mode}), crop {p.crop_px} px, normalize by the model's mean/std",
                    "model": manifest.name})


def _wanted_outputs(request: InferenceRequest, manifest: Manifest) -> list[_WantedOutput]:
    default_binary = bool(request.parameters and request.parameters.binary_data_output)
    if not request.outputs:  # none named: every output (the logits), as the protocol says
        return [_WantedOutput(manifest.output_name, None, default_binary)]
    names = [o.name for o in request.outputs]
    if len(set(names)) != len(names) or any(n != manifest.output_name for n in names):
        raise ApiError(400, "invalid_output", f"the model has one output, {manifest.output_name!r}; asked for "
                       f"{shown(names)}")
    wanted = []
    for output in request.outputs:
        params = output.parameters
        k = params.classification if params is not None else None
        if k is not None:  # >= 1 by the protocol's types; more than the classes gives them all, as Triton does
            k = min(k, manifest.num_classes)
        binary = params.binary_data if params is not None and params.binary_data is not None else default_binary
        wanted.append(_WantedOutput(output.name, k, binary))
    return wanted


def _only_input(request: InferenceRequest, expected_name: str) -> RequestInput:
    names = [tensor.name for tensor in request.inputs]
    if names != [expected_name]:
        raise ApiError(400, "invalid_input", f"the model takes one input, {expected_name!r}; got {shown(names)}")
    return request.inputs[0]


def _top_k_strings(logits: np.ndarray, labels: tuple[str, ...], k: int) -> np.ndarray:
    """Triton's classification extension: per row the top k as b"score:index:label", score = the output's value."""
    rows = []
    for row in logits:
        order = np.argsort(-row, kind="stable")[:k]
        rows.append([f"{row[i]:f}:{i}:{labels[i]}".encode() for i in order])
    return np.array(rows, dtype=object).reshape(len(rows), k)


@dataclass(frozen=True)
class PreparedRequest:
    """A checked request with its input converted: the tensor model's batch or the image model's encoded images."""

    model: V2Model
    version: str | None  # the version the request named (None: the latest)
    id: str | None
    wanted: list[_WantedOutput]
    images: list[tuple[str, bytes]]  # the image model's encoded images ([] for the tensor model)
    tensors: list[np.ndarray]  # the tensor model's float32 CHW images ([] for the image model)


def prepare(state: ServiceState, name: str, version: str | None, request: InferenceRequest,
            binary: bytes) -> PreparedRequest:
    """Check the request and convert its input (400 / 404 / 413); CPU work only, safe in a worker thread."""
    model = resolve_model(state, name, version)
    manifest, settings = model.manifest, state.settings
    wanted = _wanted_outputs(request, manifest)
    if model.is_image:
        images = encoded_images(_only_input(request, IMAGE_INPUT), binary, settings.max_files_per_request)
        return PreparedRequest(model, version, request.id, wanted, images, [])
    batch = fp32_batch(_only_input(request, manifest.input.name), binary, manifest, settings.queue_size)
    return PreparedRequest(model, version, request.id, wanted, [], list(batch))


async def infer(state: ServiceState, prepared: PreparedRequest, client_gone: ClientGone | None,
                deadline: float, scope: Scope | None = None) -> InferResult:
    """Run a prepared request through the shared pipeline (admission, batcher, limits) by `deadline`
    (pipeline.request_deadline, taken when its body or message had arrived), build the outputs. `scope`: an HTTP
    request's, whose classified images are counted with its answer (pipeline.count_classified)."""
    require_ready(state)
    if prepared.model.is_image:
        items = await pipeline.classify(state, prepared.images, client_gone, deadline)
    else:
        items = await pipeline.infer(state, prepared.tensors, client_gone, deadline)
    ran = _one_version_ran(items, prepared.version)
    logits = np.stack([item.future.result() for item in items]).astype(np.float32)
    if not np.isfinite(logits).all():
        raise ApiError(500, "inference_failed", "the engine returned values that are not finite numbers")
    pipeline.count_classified(state, items, scope)
    labels = labels_of(items[0])
    outputs = []
    for output in prepared.wanted:
        if output.classification is None:
            outputs.append(OutputTensor(output.name, "FP32", list(logits.shape), logits, output.binary))
        else:
            top = _top_k_strings(logits, labels, output.classification)
            outputs.append(OutputTensor(output.name, "BYTES", list(top.shape), top, output.binary))
    ran_name = ran.name + IMAGE_SUFFIX if prepared.model.is_image else ran.name
    return InferResult(ran_name, str(ran.version), prepared.id, outputs)


def _one_version_ran(items: list[Item], version: str | None) -> ServedModel:
    """The version whose engine ran every row; 503 version_changed when a hot-swap came between the request's
    engine batches (one response names one model_version) or replaced the version the request named."""
    served = {(model.name, model.version): model for model in map(served_by, items)}
    ran = served_by(items[0])
    if len(served) > 1 or (version is not None and str(ran.version) != version):
        names = ", ".join(str(v) for _, v in sorted(served))
        raise ApiError(503, "version_changed", f"the model was reloaded while this request ran (its rows ran on "
                       f"version {names}{'' if version is None else f', it asked for version {version}'}); "
                       "send it again", headers={"Retry-After": "1"})
    return ran

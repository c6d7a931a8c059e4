"""gRPC ModelInferRequest messages as the Open Inference Protocol's InferenceRequest (service/v2_models.py).

The JSON form's bounds checked on the message before any of it is converted, typed `contents` turned into the bytes
raw contents would hold (or into JSON data), and the request built as the HTTP API builds it (service/v2_core.py).
"""
from __future__ import annotations

from typing import Any

from service import v2_core, v2_tensors
from service.errors import ApiError, clipped, shown
from service.grpc_proto import open_inference_pb2 as pb
from service.v2_models import MAX_PARAMETERS, MAX_RANK, MAX_TENSORS, InferenceRequest

# The typed contents field of each datatype (FP16/BF16 have none: raw_input_contents only).
CONTENTS_FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                   "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                   "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                   "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def typed_elements(request: pb.ModelInferRequest) -> int:
    """The typed contents elements the conversion handles one at a time (all but fp32_contents: see _fp32_bytes)."""
    return sum(len(values) for tensor in request.inputs for field, values in tensor.contents.ListFields()
               if field.name != "fp32_contents")


def check_message_bounds(request: pb.ModelInferRequest) -> None:
    """The JSON form's bounds (service/v2_models.py), checked on the message before any of it is converted: counting
    entries costs nothing, converting a million outputs or parameters holds the event loop for seconds."""
    if len(request.inputs) > MAX_TENSORS or len(request.outputs) > MAX_TENSORS:
        raise ApiError(400, "invalid_request", f"{len(request.inputs)} inputs and {len(request.outputs)} outputs; "
                       f"at most {MAX_TENSORS} of each")
    maps = [request.parameters, *(t.parameters for t in request.inputs), *(o.parameters for o in request.outputs)]
    if any(len(entries) > MAX_PARAMETERS for entries in maps):
        raise ApiError(400, "invalid_request", f"a parameters map over the limit of {MAX_PARAMETERS} entries")
    if any(len(t.shape) > MAX_RANK for t in request.inputs):
        raise ApiError(400, "invalid_request", f"a shape of more than {MAX_RANK} dimensions")


def parameters_of(parameters) -> dict:
    """A protobuf map<string, InferParameter> as the JSON form's parameters object (unset values left out)."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def _contents_as_binary(tensor: pb.ModelInferRequest.InferInputTensor,
                        max_images: int) -> tuple[bytes | None, list | None]:
    """Typed contents as the bytes raw contents would hold (FP32, BYTES), or any other typed list as JSON data.

    Only the datatype's own field may hold them (the protocol's InferTensorContents: FP32 in fp32_contents, ...).
    BYTES elements are images, at most max_images of them: counted before they are copied (a 20 MB message holds
    ten million empty ones, ~70x that in memory once expanded).
    """
    contents = tensor.contents
    expected = CONTENTS_FIELDS.get(tensor.datatype)
    filled = [field.name for field, _ in contents.ListFields()]
    if any(name != expected for name in filled):
        raise ApiError(400, "invalid_data", f"input {shown(tensor.name)} is {clipped(tensor.datatype)} but its "
                       f"contents are in {', '.join(filled)}; send them in {expected or 'raw_input_contents'}")
    if contents.fp32_contents:
        return _fp32_bytes(contents), None
    if contents.bytes_contents:
        if len(contents.bytes_contents) > max_images:
            raise ApiError(413, "too_many_images", f"input {clipped(tensor.name)!r} has {len(contents.bytes_contents)} "
                           f"BYTES elements (images), over the limit of {max_images} per request")
        return v2_tensors.serialize_bytes(contents.bytes_contents), None
    fields = contents.ListFields()  # another type: the core refuses its datatype with its usual message
    return None, list(fields[0][1]) if fields else []


def _fp32_bytes(contents: pb.InferTensorContents) -> bytes:
    """fp32_contents (the only field set) as little-endian float32 bytes, at memcpy speed: a packed repeated float
    serializes as its tag and byte length (two varints), then exactly those bytes (protobuf's encoding guide, "Packed
    Repeated Fields"). np.asarray(fp32_contents) makes a Python float per element: ~140 ms for 8x3x224x224."""
    # Unknown fields the client sent would serialize after the floats. (A Message method types-protobuf leaves out.)
    contents.DiscardUnknownFields()  # type: ignore[attr-defined]
    wire = contents.SerializeToString()
    return wire[len(wire) - 4 * len(contents.fp32_contents):]


def inference_request_of(request: pb.ModelInferRequest, max_images: int) -> tuple[InferenceRequest, bytes]:
    """The gRPC request as the protocol's InferenceRequest plus the binary data its inputs point into (in order);
    BYTES contents of at most max_images elements."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ApiError(400, "invalid_binary_data", f"raw_input_contents has {len(raw)} entries for "
                       f"{len(request.inputs)} inputs; send one per input, in input order")
    inputs, chunks = [], []
    for index, tensor in enumerate(request.inputs):
        data: bytes | None
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                 "parameters": parameters_of(tensor.parameters)}
        if raw:
            if tensor.HasField("contents"):
                raise ApiError(400, "invalid_data", f"input {shown(tensor.name)} has both contents and "
                               "raw_input_contents; send one of them")
            data, values = raw[index], None
        else:
            data, values = _contents_as_binary(tensor, max_images)
        if data is not None:
            entry["parameters"]["binary_data_size"] = len(data)
            chunks.append(data)
        else:
            entry["data"] = values
        inputs.append(entry)
    outputs = [{"name": o.name, "parameters": parameters_of(o.parameters)} for o in request.outputs]
    fields = {"id": request.id or None, "parameters": parameters_of(request.parameters), "inputs": inputs,
              "outputs": outputs or None}
    return v2_core.build_request(fields), b"".join(chunks)

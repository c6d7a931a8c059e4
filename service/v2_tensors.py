"""A v2 request's input tensors as arrays: the FP32 batch for the tensor model, the encoded images for the image model.

An input comes as JSON `data` (flat, or nested along its shape's leading dimensions) or as its slice of the binary
data after the header (parameters.binary_data_size bytes); BYTES elements in binary data are each a 4-byte
little-endian length, then the bytes (serialize_bytes; gRPC's raw_input_contents / raw_output_contents use the same
layout), and BYTES elements in JSON are base64 strings. Shapes, datatypes and sizes are checked against the model and
the request limits before anything the size of the data is made; every refusal is an ApiError (400 bad input, 413 a
batch over the limit). The protocol itself (models, which input, outputs) is service/v2_core.py's.
"""
from __future__ import annotations

import base64
import itertools
import math
import struct
from typing import Annotated

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from runtime.repository import Manifest
from service.errors import ApiError, clipped, shown
from service.v2_models import RequestInput

LENGTH_PREFIX = struct.Struct("<I")  # BYTES elements in binary data: uint32 little-endian length, then the bytes
FP32_VALUES = TypeAdapter(list[Annotated[float, Field(strict=True, allow_inf_nan=False)]])
STRING_VALUES = TypeAdapter(list[Annotated[str, Field(strict=True)]])


def serialize_bytes(elements) -> bytes:
    """BYTES elements as the binary-data extension (and gRPC raw contents) lay them out: length + bytes each."""
    return b"".join(LENGTH_PREFIX.pack(len(e)) + e for e in elements)


def _check_batch(batch: int, limit: int, what: str) -> None:
    if batch < 1:
        raise ApiError(400, "invalid_shape", f"the batch dimension is {batch}; send at least one {what}")
    if batch > limit:
        raise ApiError(413, "too_many_images", f"a batch of {batch} {what}s, over the limit of {limit} per request")


def _binary_slice(tensor: RequestInput, binary: bytes, expected_size: int | None) -> bytes | None:
    """The input's binary data (None when it is sent as JSON); its size checked before anything reads it."""
    size = tensor.parameters.binary_data_size if tensor.parameters is not None else None
    if size is None:
        if binary:
            raise ApiError(400, "invalid_binary_data", f"{len(binary)} bytes of binary data follow the header but no "
                           "input has a binary_data_size")
        if tensor.data is None:
            raise ApiError(400, "invalid_data", f"input {shown(tensor.name)} has neither data nor a binary_data_size")
        return None
    if tensor.data is not None:
        raise ApiError(400, "invalid_binary_data", f"input {shown(tensor.name)} has both data and a binary_data_size")
    if expected_size is not None and size != expected_size:
        raise ApiError(400, "invalid_binary_data", f"binary_data_size is {size} bytes; shape {tensor.shape} of "
                       f"{tensor.datatype} needs {expected_size}")
    if size != len(binary):
        raise ApiError(400, "invalid_binary_data", f"binary_data_size is {size} bytes but {len(binary)} bytes follow "
                       "the header")
    return binary


def _flat(data: list, shape: list[int], name: str) -> list:
    """Row-major data, flat or nested along the shape's leading dimensions, as one flat list. A nested level holds
    its dimension's count of lists, each as long as the next dimension (nesting goes on) or as all the remaining
    ones together (flat below); the flat count is checked by the caller."""
    for depth in range(len(shape) - 1):
        # Per-element passes in C (a flat 8x3x224x224 list: ~20 ms, ~50 in a loop); parsed data holds plain lists.
        kinds = set(map(type, data))
        if list not in kinds:
            break
        if kinds != {list}:
            raise ApiError(400, "invalid_data", f"input {shown(name)}: nested data mixes lists and values")
        lengths = {shape[depth + 1], math.prod(shape[depth + 1:])}
        if len(data) != math.prod(shape[:depth + 1]) or any(len(row) not in lengths for row in data):
            raise ApiError(400, "invalid_data", f"input {shown(name)}: nested data does not follow shape {shape}")
        data = list(itertools.chain.from_iterable(data))
    return data


def fp32_batch(tensor: RequestInput, binary: bytes, manifest: Manifest, max_batch: int) -> np.ndarray:
    """The FP32 NCHW input as an array: shape within the limits before anything the size of the data is made."""
    spec = manifest.input
    chw = (spec.channels, spec.height, spec.width)
    if tensor.datatype != "FP32":
        raise ApiError(400, "invalid_datatype", f"input datatype must be FP32, got {shown(tensor.datatype)}")
    if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != chw:
        raise ApiError(400, "invalid_shape", f"input shape must be [1..{max_batch}, {', '.join(map(str, chw))}], "
                       f"got {tensor.shape}")
    _check_batch(tensor.shape[0], max_batch, "image")
    count = math.prod(tensor.shape)  # bounded now: at most max_batch images of the model's size
    raw = _binary_slice(tensor, binary, count * 4)
    if raw is not None:
        array = np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)
    else:
        values = _flat(tensor.data, tensor.shape, tensor.name)  # type: ignore[arg-type]  # see below
        if len(values) != count:
            raise ApiError(400, "invalid_data", f"{len(values)} values for shape {tensor.shape} ({count} needed)")
        try:
            with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
                array = np.asarray(FP32_VALUES.validate_python(values), dtype=np.float32)
        except ValidationError as err:
            first = err.errors(include_url=False, include_input=False)[0]
            raise ApiError(400, "invalid_data", f"input {shown(tensor.name)} data[{first['loc'][0]}]: {first['msg']}"
                           ) from None
    if not np.isfinite(array).all():  # NaN/inf in binary data, or JSON numbers beyond float32's range
        raise ApiError(400, "invalid_data",
                       f"input {shown(tensor.name)} has values that are not finite float32 numbers")
    return array.reshape(tensor.shape)


def _split_bytes(raw: bytes, count: int) -> list[bytes]:
    """`count` length-prefixed elements that fill `raw` exactly; each length checked against what is left."""
    elements, offset = [], 0
    for index in range(count):
        if len(raw) - offset < LENGTH_PREFIX.size:
            raise ApiError(400, "invalid_binary_data", f"BYTES element {index}: its 4-byte length is missing")
        (length,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
        if length > len(raw) - offset:
            raise ApiError(400, "invalid_binary_data", f"BYTES element {index} says {length} bytes, "
                           f"{len(raw) - offset} are left")
        elements.append(raw[offset:offset + length])
        offset += length
    if offset != len(raw):
        raise ApiError(400, "invalid_binary_data", f"{len(raw) - offset} bytes left over after {count} BYTES elements")
    return elements


def encoded_images(tensor: RequestInput, binary: bytes, max_images: int) -> list[tuple[str, bytes]]:
    """The BYTES input as (name[i], encoded image) pairs, one image per element; 1..max_images of them."""
    if tensor.datatype != "BYTES":
        raise ApiError(400, "invalid_datatype",
                       f"input {shown(tensor.name)} datatype must be BYTES, got {shown(tensor.datatype)}")
    if len(tensor.shape) != 1:
        raise ApiError(400, "invalid_shape", f"input {shown(tensor.name)} shape must be [n] (one image per element), "
                       f"got {tensor.shape}")
    count = tensor.shape[0]
    _check_batch(count, max_images, "image")
    raw = _binary_slice(tensor, binary, None)
    if raw is not None:
        images = _split_bytes(raw, count)
    else:
        # Not None: _binary_slice refuses an input with neither data nor binary data.
        values = _flat(tensor.data, tensor.shape, tensor.name)  # type: ignore[arg-type]
        if len(values) != count:
            raise ApiError(400, "invalid_data", f"{len(values)} images for shape {tensor.shape}")
        # Each refusal is a ValueError: pydantic's ValidationError (not strings), binascii.Error (not base64), and a
        # plain ValueError for a str with non-ASCII characters, which b64decode refuses before reading the alphabet.
        try:
            images = [base64.b64decode(v, validate=True) for v in STRING_VALUES.validate_python(values)]
        except ValueError as err:
            raise ApiError(400, "invalid_data", f"input {shown(tensor.name)}: JSON elements must be base64 strings of "
                           f"the image bytes ({type(err).__name__})") from None
    return [(f"{clipped(tensor.name)}[{i}]", image) for i, image in enumerate(images)]

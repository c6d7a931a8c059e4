"""The Open Inference Protocol's (KServe v2) messages as strict pydantic models, the binary-data extension included.

Shaped like KServe's data models (kserve/protocol/rest/v2_datamodels.py): unknown top-level fields are ignored as
there, but every field the protocol defines is strictly typed: shapes are non-negative JSON integers (no floats, no
booleans, no null), parameters are bool / int / finite float / string, and the extension parameters have their own
types (`binary_data_size` an int >= 0, `binary_data` / `binary_data_output` booleans, `classification` an int >= 1).
Tensor `data` stays a JSON list here: its element type depends on the datatype, checked by service/v2_tensors.py.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

INT64_MAX = 2**63 - 1  # shapes are int64 in the protocol (and in its gRPC form)
# Bounds on a message's shape, far above any real request (every model served has one input and one output): a
# 20 MB message of a million outputs or parameters would otherwise hold the GIL for seconds while it is converted.
MAX_TENSORS = 16  # inputs, or outputs, in one request
MAX_PARAMETERS = 64  # entries in one parameters object
MAX_RANK = 16  # dimensions of one shape

InferParameter = bool | int | float | str
Dimension = Annotated[int, Field(ge=0, le=INT64_MAX)]


class _Message(BaseModel):
    # strict: 1.0 is not an int and true is not a number; no NaN or infinity where a number is required.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class _Parameters(_Message):
    """A parameters object: the named fields typed, any other key kept, its value a bool, int, float or string."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"maxProperties": MAX_PARAMETERS})
    __pydantic_extra__: dict[str, InferParameter]

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > MAX_PARAMETERS:
            raise ValueError(f"{len(data)} parameters, over the limit of {MAX_PARAMETERS}")
        return data


class RequestParameters(_Parameters):
    binary_data_output: bool | None = Field(None, description="binary-data extension: every output in binary "
                                            "unless the output says otherwise")


class InputParameters(_Parameters):
    binary_data_size: int | None = Field(None, ge=0, le=INT64_MAX, description="binary-data extension: this "
                                         "input's bytes follow the JSON header (in input order)")


class OutputParameters(_Parameters):
    binary_data: bool | None = Field(None, description="binary-data extension: this output's bytes follow the "
                                     "JSON header of the response")
    classification: int | None = Field(None, ge=1, le=INT64_MAX, description="classification extension: the "
                                       "top k as BYTES 'score:index:label'; a k over the class count gives "
                                       "every class, as Triton does")


class RequestInput(_Message):
    name: str
    shape: list[Dimension] = Field(max_length=MAX_RANK)
    datatype: str
    parameters: InputParameters | None = None
    data: list[Any] | None = Field(None, description="row-major, flat or nested; numbers for FP32, base64 "
                                   "strings for BYTES (absent when the bytes are binary data)")


class RequestOutput(_Message):
    name: str
    parameters: OutputParameters | None = None


class InferenceRequest(_Message):
    id: str | None = None
    parameters: RequestParameters | None = None
    inputs: list[RequestInput] = Field(max_length=MAX_TENSORS)
    outputs: list[RequestOutput] | None = Field(None, max_length=MAX_TENSORS)


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, InferParameter] | None = None
    data: list[float] | list[str] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, InferParameter] | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, str] | None = None


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLiveResponse(BaseModel):
    live: bool


class ServerReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool
